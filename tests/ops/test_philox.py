"""lmc's random numbers (lmc/ops/philox.py): Triton's tl.rand(seed, i), bit for bit, in torch
and in a Triton kernel; Philox4x32-10 itself checked against Random123's test vector."""
import pytest
import torch

from lmc.ops import philox


def test_philox_rounds_match_random123_known_answer():
    """Philox4x32-10, counter (0, 0, 0, 0), key (0, 0): Random123's kat_vectors give
    6627e8d5 e169c58d bc57ac4c 9b00dbd8."""
    c = [torch.zeros(1, dtype=torch.int64) for _ in range(4)]
    k0 = k1 = 0
    for _ in range(10):
        hi_b, lo_b = philox._mul_hi_lo(philox._ROUND_B, c[2])
        hi_a, lo_a = philox._mul_hi_lo(philox._ROUND_A, c[0])
        c = [hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a]
        k0, k1 = (k0 + philox._KEY_A) & 0xFFFFFFFF, (k1 + philox._KEY_B) & 0xFFFFFFFF
    assert [int(v) for v in c] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("seed", [0, 1, 1234, 2 ** 31 + 5, 2 ** 40 + 123, 2 ** 63 - 1])
def test_torch_equals_the_triton_kernel_bit_for_bit(seed):
    n = 3001                              # not a multiple of the kernel's block
    a = philox.uniform_torch(seed, n)
    b = philox.uniform_triton(seed, n, "cpu")     # Triton's interpreter
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) < 1
    assert abs(float(a.mean()) - 0.5) < 0.03
    assert not torch.equal(a, philox.uniform_torch(seed + 1, n))


def test_bad_draws_are_refused():
    with pytest.raises(ValueError, match="seed"):
        philox.uniform(-1, 4)
    with pytest.raises(ValueError, match="2\\^31"):
        philox.uniform(0, 1 << 31)
    assert philox.uniform(3, 0).shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_equals_torch_on_cpu():
    for seed in (0, 99, 2 ** 62 + 7):
        got = philox.uniform(seed, 100_003, "cuda").cpu()
        assert torch.equal(got, philox.uniform_torch(seed, 100_003))
