"""The prefill's elementwise pieces (`ahn_runtime/pieces.py`): torch.compile'd (dynamic shapes, as on CUDA) against
the same functions run eagerly, on the CPU with real memory modules. The GPU run of the compiled pieces inside a
prefill is in test_runtime_gpu.py."""
import pytest
import torch

from ahn_runtime import pieces
from ahn_runtime.memory import VARIANTS


def close(a, b, tol):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item() < tol


@pytest.fixture(scope="module")
def compiled():
    if pieces._FAILED:
        pytest.fail(f"a compile failed earlier: {pieces._FAILED[0]}")
    return pieces.compiled()


@pytest.mark.parametrize("variant", ["GatedDeltaNet", "DeltaNet", "Mamba2"])
def test_compiled_memory_pieces_match_eager(compiled, variant):
    h, H, Hkv, D = 64, 4, 2, 16
    g = torch.Generator().manual_seed(1)
    mod = VARIANTS[variant](h, H, D)
    mod.reset_parameters(g)
    mod.o_proj.weight.data.normal_(0, 0.1, generator=g)
    for n in (37, 100):  # two lengths: one compiled graph with a symbolic length
        xq = torch.randn(n, h, generator=g)
        q = torch.randn(n, H, D, generator=g)
        kv = torch.randn(n, Hkv, 2 * D, generator=g)  # k, v as strided views, as the prefill passes them
        k, v = kv[..., :D], kv[..., D:]
        gates = mod.gates(xq)
        got = compiled.mem_in(mod, q, k, v, gates, H // Hkv)
        ref = pieces.mem_in(mod, q, k, v, gates, H // Hkv)
        for a, b in zip(got, ref):
            assert (a is None and b is None) or (a.shape == b.shape and close(a, b, 1e-5))
        r = torch.randn(n, H, D, generator=g)
        o = torch.randn(n + 5, H, D, generator=g)
        o1, o2 = o.clone(), o.clone()
        compiled.mem_add(mod, o1[3:3 + n], r, xq)  # in place, into a view of the attention output
        pieces.mem_add(mod, o2[3:3 + n], r, xq)
        assert close(o1, o2, 1e-5) and torch.equal(o1[:3], o[:3]) and torch.equal(o1[3 + n:], o[3 + n:])
        assert not torch.equal(o1, o)
    assert not pieces._FAILED


def test_compiled_layer_pieces_match_eager(compiled):
    g = torch.Generator().manual_seed(2)
    for T in (5, 64):
        x, y, w = torch.randn(T, 32, generator=g), torch.randn(T, 32, generator=g), torch.randn(32, generator=g)
        for a, b in zip(compiled.add_norm(x, y, w, 1e-6), pieces.add_norm(x, y, w, 1e-6)):
            assert close(a, b, 1e-5)
        assert close(compiled.silu_mul(x, y), pieces.silu_mul(x, y), 1e-5)
        q, k = torch.randn(T, 4, 16, generator=g), torch.randn(T, 2, 16, generator=g)
        cos, sin = torch.randn(T, 16, generator=g), torch.randn(T, 16, generator=g)
        for a, b in zip(compiled.rope(q, k, cos, sin), pieces.apply_rope(q, k, cos, sin)):
            assert close(a, b, 1e-5)
    assert not pieces._FAILED
