"""The ring_update template (lmc/codegen/ring_update.py) in Triton's interpreter: a sliding-
window attention's ring of W slots updated in place with T new entries, against the decode
pass's definition (gather(concat(R, x), src) along the slots, src its slot map), for T fewer
than, equal to and more than W, past lengths that wrap the ring, the slots on axis 1 or 2, and
x a strided view."""
import pytest
import torch

from lmc.codegen.ring_update import launch_template
from lmc.passes.decode import _pos_fn, _ring_src_fn


def _want(ring, x, axis, P, T):
    W = ring.shape[axis]
    src = _ring_src_fn(W)(torch.tensor([P]), T)
    shape = [1] * ring.dim()
    shape[axis] = W
    idx = src.reshape(shape).expand(ring.shape)
    return torch.gather(torch.cat([ring, x.to(ring.dtype)], axis), axis, idx)


@pytest.mark.parametrize("W", [1, 5])
@pytest.mark.parametrize("T", [1, 2, 4, 5, 6, 13])
@pytest.mark.parametrize("P", [0, 3, 11])
def test_the_ring_takes_the_last_entries_at_their_slots_in_place(W, T, P):
    gen = torch.Generator().manual_seed(100 * W + 10 * T + P)
    B, H, D = 2, 3, 37
    ring = torch.randn(B, H, W, D, generator=gen)
    wide = torch.randn(B, T, H, D + 5, generator=gen)
    x = wide[..., 2:2 + D].transpose(1, 2)            # [B, H, T, D], strides of its own
    want = _want(ring, x, 2, P, T)
    ptr = ring.data_ptr()
    launch_template("ring_update", [ring, x, None, _pos_fn(torch.tensor([P]), T)], [ring],
                    {"axis": 2})
    assert ring.data_ptr() == ptr
    torch.testing.assert_close(ring, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_slots_on_axis_1_and_steps_one_at_a_time(dtype):
    """[B, W, C] rings (a value projection's output cached before its head split), stepped
    one token at a time past several wraps: each step equals the definition."""
    gen = torch.Generator().manual_seed(3)
    B, W, C = 2, 4, 19
    ring = torch.randn(B, W, C, generator=gen).to(dtype)
    for P in range(11):
        x = torch.randn(B, 1, C, generator=gen).to(dtype)
        want = _want(ring, x, 1, P, 1)
        launch_template("ring_update", [ring, x, None, _pos_fn(torch.tensor([P]), 1)], [ring],
                        {"axis": -2})
        torch.testing.assert_close(ring, want, rtol=0, atol=0)


def test_into_another_buffer_the_ring_is_copied_first():
    ring = torch.randn(1, 3, 4)
    x = torch.randn(1, 2, 4)
    out = torch.full_like(ring, float("nan"))
    want = _want(ring, x, 1, 7, 2)
    launch_template("ring_update", [ring.clone(), x, None, _pos_fn(torch.tensor([7]), 2)],
                    [out], {"axis": 1})
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["heads-after-slots", "three-outer-axes", "pos-strided"])
def test_new_entries_read_through_their_strides(layout):
    """x of rank 5 with two axes after the slots (a [B, T, H, D] value cached before its
    head split, seen transposed), with three outer axes no stride pattern merges (copied
    first), and positions read at a stride: the same ring as the definition."""
    gen = torch.Generator().manual_seed(7)
    T, P = 3, 9
    pos = torch.arange(P, P + T)
    if layout == "heads-after-slots":
        ring = torch.randn(2, 4, 3, 5, generator=gen)                    # [B, W, H, D]
        x = torch.randn(2, 5, T, 3, generator=gen).permute(0, 2, 3, 1)   # [B, T, H, D]
        axis = 1
    elif layout == "three-outer-axes":
        ring = torch.randn(2, 3, 2, 4, 6, generator=gen)                 # [A, B, C, W, D]
        x = torch.randn(3, 2, 2, T, 6, generator=gen).permute(1, 0, 2, 3, 4)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)                # B, C not mergeable
        axis = 3
    else:
        ring = torch.randn(2, 4, 7, generator=gen)
        x = torch.randn(2, T, 7, generator=gen)
        pos = torch.stack([pos, pos * 0 - 1], 1)[:, 0]                   # stride 2
        axis = 1
    want = _want(ring, x, axis, P, T)
    launch_template("ring_update", [ring, x, None, pos], [ring], {"axis": axis})
    torch.testing.assert_close(ring, want, rtol=0, atol=0)
