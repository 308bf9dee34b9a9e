"""The Triton flash-decoding kernels of the CUDA-graph decode step (`kernels/decode_attention.py`) against the
PyTorch reference `static_decode_attention`."""
import pytest
import torch

from ahn_runtime.kernels import decode_attention as da
from ahn_runtime.kernels.attention import attention_ref, static_decode_attention


def _case(H, Hkv, D, N, valid, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, D, generator=g).to(device, dtype)
    k = torch.randn(Hkv, N, D, generator=g).to(device, dtype)
    v = torch.randn(Hkv, N, D, generator=g).to(device, dtype)
    bias = torch.full((N,), float("-inf"), device=device)
    bias[:valid] = 0.0
    return q, k, v, bias


def test_cpu_uses_the_reference():
    q, k, v, bias = _case(8, 2, 64, 1024, 700, "cpu")
    assert not da.supported(q, k)
    assert torch.equal(da.fixed_decode_attention(q, k, v, bias, 0.125), static_decode_attention(q, k, v, bias, 0.125))
    # and the reference is attention over the valid slots
    pos = torch.arange(700)
    ref = attention_ref(q, k[:, :700].transpose(0, 1), v[:, :700].transpose(0, 1), torch.tensor([699]), pos,
                        float("inf"), 0, 0.125)
    assert (static_decode_attention(q, k, v, bias, 0.125).float() - ref.float()).abs().max() < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available() or da.triton is None, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("H,Hkv,D,N,valid", [
    (16, 2, 128, 33280, 32769),   # Qwen2.5-3B, window full
    (16, 2, 128, 33280, 1),       # one valid slot: every other part is empty
    (28, 4, 128, 9216, 8200),     # Qwen2.5-7B (G = 7, padded)
    (4, 4, 64, 1000, 999),        # no GQA, N not a multiple of the split
    (32, 8, 128, 132096, 131100),  # a long full-attention buffer (larger splits)
])
def test_triton_decode_attention_matches_reference(H, Hkv, D, N, valid):
    q, k, v, bias = _case(H, Hkv, D, N, valid, "cuda")
    assert da.supported(q, k)
    ref = static_decode_attention(q.float(), k.float(), v.float(), bias, D ** -0.5, 512 if N % 512 == 0 else N)
    out = da.fixed_decode_attention(q, k, v, bias, D ** -0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = (out.float() - ref).abs().max().item()
    assert err < 1e-2 * max(1.0, ref.abs().max().item()), err
    # a strided view of a larger buffer (the decoder passes state.k[l] of [L, Hkv, cap, D])
    big = torch.zeros(2, Hkv, N, D, device="cuda", dtype=k.dtype)
    big[1] = k
    assert torch.equal(da.fixed_decode_attention(q, big[1], v, bias, D ** -0.5), out)
