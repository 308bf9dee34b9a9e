"""Merging attention parts by log-sum-exp (`kernels/merge.py`): the reference's handling of reversed parts, and the
Triton kernel against the reference (GPU)."""
import pytest
import torch

from ahn_runtime.kernels import merge as M
from ahn_runtime.kernels.attention import attention_ref


def _parts(H, T, D, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def part(rev, empty=0, strided=False):
        Tp = T - 1 if rev else T
        o = torch.randn(Tp, H, D, generator=g).transpose(0, 1) if strided else torch.randn(H, Tp, D, generator=g)
        lse = torch.randn(H, Tp, generator=g) * 3
        lse[:, :empty] = float("-inf")  # rows with no key in this part
        return o.to(device, dtype), lse.to(device), rev
    return [part(False), part(True, empty=5), part(False, strided=True), part(False, empty=T)]


def test_reference_merge_is_softmax_over_the_union_of_key_sets():
    """Split one query set's keys into a normal part and a reversed part (queries reversed, last query dropped:
    how the keys leaving the window are computed); merging gives attention over all keys."""
    torch.manual_seed(0)
    T, N, H, D = 12, 20, 2, 8
    q, k, v = torch.randn(T, H, D), torch.randn(N, H, D), torch.randn(N, H, D)
    qpos, kpos = N + torch.arange(T), torch.arange(N)  # queries after every key: all visible
    full = attention_ref(q, k, v, qpos, kpos, float("inf"), N, 0.3)  # every key visible to every query

    def part(sel, qsel):
        s = torch.einsum("thd,nhd->htn", q[qsel], k[sel]) * 0.3
        lse = torch.logsumexp(s, -1)
        return torch.einsum("htn,nhd->htd", torch.softmax(s, -1), v[sel]), lse
    o1, l1 = part(slice(0, 15), slice(None))
    rq = torch.arange(T - 2, -1, -1)  # queries T-2 .. 0
    o2, l2 = part(slice(15, N), rq)
    out = M.merge_ref([(o1, l1, False), (o2, l2, True)], torch.float32)
    # the last query saw only the first part; the others saw every key
    assert torch.allclose(out[:-1], full[:-1], atol=1e-5)
    last = attention_ref(q[-1:], k[:15], v[:15], qpos[-1:], kpos[:15], float("inf"), N, 0.3)
    assert torch.allclose(out[-1:], last, atol=1e-5)
    assert M.merge_parts([(o1, l1, False), (o2, l2, True)], T, torch.float32).equal(out)  # CPU: the reference


@pytest.mark.skipif(not torch.cuda.is_available() or M.triton is None, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("H,T,D", [(16, 4096, 128), (4, 77, 64)])
def test_triton_merge_matches_reference(n, H, T, D):
    parts = _parts(H, T, D, "cuda", torch.bfloat16)[:n]
    assert M._fits(parts)
    out, ref = M.merge_parts(parts, T, torch.bfloat16), M.merge_ref(parts, torch.bfloat16)
    assert out.shape == (T, H, D) and out.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


@pytest.mark.skipif(not torch.cuda.is_available() or M.triton is None, reason="needs a CUDA GPU and triton")
def test_triton_merge_compiles_once_for_every_question_length():
    """A question of T tokens merges parts of T and (the keys leaving the window, reversed) T - 1 rows. Triton
    specialises integers divisible by 16 or equal to 1, so T = 17 (16 reversed rows) or 32 once compiled their
    own variants: a fresh process paid 100-170 ms in its first question of such a length. None is made now."""
    import triton
    hook = triton.knobs.runtime.jit_cache_hook
    compiled = []
    try:
        triton.knobs.runtime.jit_cache_hook = lambda *, repr, **kw: compiled.append(repr.split("[")[0]) and None
        for T in (100, 17, 23, 32, 33, 48, 2):
            parts = _parts(16, T, 128, "cuda", torch.bfloat16, seed=T)[:3]
            out, ref = M.merge_parts(parts, T, torch.bfloat16), M.merge_ref(parts, torch.bfloat16)
            assert (out.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()
            if T == 100:
                compiled.clear()  # the first may compile (or load from Triton's disk cache)
    finally:
        triton.knobs.runtime.jit_cache_hook = hook
    assert compiled == []


def test_a_failing_kernel_falls_back_to_the_reference(monkeypatch):
    """If the Triton merge cannot compile or launch (here: forced onto the CPU, where it cannot run), the prefill
    keeps going with the reference and stops trying the kernel."""
    parts = _parts(4, 40, 64, "cpu", torch.float32)
    monkeypatch.setattr(M, "_BROKEN", [])
    monkeypatch.setattr(M, "_fits", lambda parts: not M._BROKEN)
    out = M.merge_parts(parts, 40, torch.float32)
    assert out.equal(M.merge_ref(parts, torch.float32)) and len(M._BROKEN) == 1
    M.merge_parts(parts, 40, torch.float32)
    assert len(M._BROKEN) == 1  # not tried again
