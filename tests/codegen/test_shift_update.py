"""The shift_update template (lmc/codegen/shift_update.py) in Triton's interpreter: a decoded
causal shift's history H [B, S, C] replaced in place by the last S of concat(H, x) along time,
for T new tokens fewer than, equal to and more than S, x a strided view."""
import pytest
import torch

from lmc.codegen.shift_update import launch_template


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("T", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_history_is_the_last_s_positions_in_place(S, T, dtype):
    gen = torch.Generator().manual_seed(10 * S + T)
    B, C = 2, 37
    hist = torch.randn(B, S, C, generator=gen).to(dtype)
    wide = torch.randn(B, T, C + 11, generator=gen)
    x = wide[:, :, 5:5 + C]                         # a column slice: row stride C + 11
    want = torch.cat([hist.float(), x], 1)[:, T:T + S].to(dtype)
    ptr = hist.data_ptr()
    launch_template("shift_update", [hist, x], [hist], {})
    assert hist.data_ptr() == ptr
    torch.testing.assert_close(hist, want, rtol=0, atol=0)


def test_into_another_buffer_the_history_is_copied_first():
    hist = torch.randn(1, 3, 5)
    x = torch.randn(1, 1, 5)
    out = torch.empty_like(hist)
    launch_template("shift_update", [hist.clone(), x], [out], {})
    torch.testing.assert_close(out, torch.cat([hist, x], 1)[:, 1:])


def test_a_long_history_is_updated_by_torch():
    """Past MAX_S slots (a register tile of S rows) the same update runs as torch ops."""
    from lmc.codegen.shift_update import MAX_S
    hist = torch.randn(2, MAX_S + 5, 7)
    x = torch.randn(2, 3, 7)
    want = torch.cat([hist, x], 1)[:, 3:]
    launch_template("shift_update", [hist, x], [hist], {})
    torch.testing.assert_close(hist, want, rtol=0, atol=0)
