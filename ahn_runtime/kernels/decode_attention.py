"""One decode query over a whole fixed-shape KV buffer, split along the keys (flash-decoding), in two Triton
kernels: each program takes one KV head and `split` keys and computes the G query heads of that KV head against
them (online softmax, float32), writing a partial output and its log-sum-exp; a second kernel merges the parts.
The plain PyTorch reference is `attention.static_decode_attention` (same arguments, same result up to rounding):
it needs about nine kernels per layer (two matmuls, the softmax pieces, the split sum), this two.

    fixed_decode_attention(q [1, H, D], k [Hkv, N, D], v [Hkv, N, D], bias [N] float32, scale) -> [1, H, D]

bias is 0 on valid slots and -inf on empty ones (the static decoder's buffer). The kernel is picked by device:
Triton on CUDA (where triton imports), the reference elsewhere.
"""
from __future__ import annotations

import torch

from .attention import static_decode_attention

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  the CPU build of torch has no triton
    triton = None

BLOCK = 64  # keys per inner step
MERGE = 64  # parts per step of the merge


if triton is not None:
    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, lse_ptr, scale, N, n_parts,
                        sk_h, sk_n, sv_h, sv_n,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                        SPLIT: tl.constexpr):
        """Program (h, s): query heads h*G .. h*G+G-1 against keys s*SPLIT .. of KV head h.
        o [Hkv, n_parts, GP, D] float32 (normalised within the part), lse [Hkv, n_parts, GP] (-inf: no key)."""
        h = tl.program_id(0)
        s = tl.program_id(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (h * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for i in range(0, SPLIT, BLOCK):
            n = s * SPLIT + i + tl.arange(0, BLOCK)
            nm = n < N
            k = tl.load(k_ptr + h * sk_h + n[:, None] * sk_n + d[None, :], mask=nm[:, None], other=0.0)
            b = tl.load(bias_ptr + n, mask=nm, other=float("-inf"))
            sc = tl.dot(q, tl.trans(k)) * scale + b[None, :]  # [GP, BLOCK] float32
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + h * sv_h + n[:, None] * sv_n + d[None, :], mask=nm[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
        base = (h * n_parts + s) * GP + g
        tl.store(o_ptr + base[:, None] * D + d[None, :], acc / l_safe[:, None])
        tl.store(lse_ptr + base, lse)

    @triton.jit
    def _merge_kernel(o_ptr, lse_ptr, out_ptr, n_parts, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      DB: tl.constexpr, MERGE: tl.constexpr):
        """Program (h, g, c): dims c*DB .. c*DB+DB-1 of query head h*G+g, its parts merged by their log-sum-exp
        -> out [H, D]."""
        h = tl.program_id(0)
        g = tl.program_id(1)
        d = tl.program_id(2) * DB + tl.arange(0, DB)
        m = tl.full([MERGE], float("-inf"), tl.float32)
        for s0 in range(0, n_parts, MERGE):
            s = s0 + tl.arange(0, MERGE)
            m = tl.maximum(m, tl.load(lse_ptr + (h * n_parts + s) * GP + g, mask=s < n_parts, other=float("-inf")))
        mx = tl.max(m, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        tot = tl.zeros([MERGE], tl.float32)
        acc = tl.zeros([DB], tl.float32)
        for s0 in range(0, n_parts, MERGE):
            s = s0 + tl.arange(0, MERGE)
            sm = s < n_parts
            w = tl.exp(tl.load(lse_ptr + (h * n_parts + s) * GP + g, mask=sm, other=float("-inf")) - mx)
            o = tl.load(o_ptr + ((h * n_parts + s) * GP + g)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
            acc += tl.sum(w[:, None] * o, 0)
            tot += w
        out = acc / tl.sum(tot, 0)
        tl.store(out_ptr + (h * G + g) * D + d, out.to(out_ptr.dtype.element_ty))


def _split(N: int, Hkv: int) -> int:
    """Keys per program: about 2-4 programs per SM of a large GPU for the decode buffers of interest."""
    split = 256
    while split < 4096 and Hkv * triton.cdiv(N, split) > 2048:
        split *= 2
    return split


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    D = q.shape[-1]
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and D in (64, 128, 256) and k.stride(-1) == 1 and q.shape[1] % k.shape[0] == 0)


def triton_decode_attention(q, k, v, bias, scale, split: int | None = None):
    """The two-kernel form. q [1, H, D]; k, v [Hkv, N, D] (last dim contiguous); bias [N] float32."""
    H, D = q.shape[1], q.shape[2]
    Hkv, N = k.shape[0], k.shape[1]
    G = H // Hkv
    GP = max(16, triton.next_power_of_2(G))
    split = split or _split(N, Hkv)
    n_parts = triton.cdiv(N, split)
    q = q.contiguous()
    o = torch.empty(Hkv, n_parts, GP, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(Hkv, n_parts, GP, dtype=torch.float32, device=q.device)
    _partial_kernel[(Hkv, n_parts)](q, k, v, bias, o, lse, scale, N, n_parts, k.stride(0), k.stride(1),
                                    v.stride(0), v.stride(1), G=G, GP=GP, D=D, BLOCK=BLOCK, SPLIT=split,
                                    num_warps=4, num_stages=2)
    out = torch.empty(1, H, D, dtype=q.dtype, device=q.device)
    DB = 32
    _merge_kernel[(Hkv, G, D // DB)](o, lse, out, n_parts, G=G, GP=GP, D=D, DB=DB, MERGE=MERGE, num_warps=2)
    return out


def fixed_decode_attention(q, k, v, bias, scale, split: int = 512, reference=static_decode_attention):
    """Triton on CUDA, else `reference` (by default the plain PyTorch one; `split`: its split of P @ V)."""
    if supported(q, k):
        return triton_decode_attention(q, k, v, bias, scale)
    return reference(q, k, v, bias, scale, split)
