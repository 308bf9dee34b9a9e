"""Merging attention results computed over disjoint key sets (log-sum-exp weighting), for the prefill.

A part is (o [H, T', D] any float dtype, lse [H, T'] float32, rev): rev=False means row t of the part is query
t (T' = T); rev=True means the part was computed on the queries reversed and without the last one (T' = T - 1:
row r is query T - 2 - r, and the last query has no key in it), which is how `attention._edge` computes the keys
leaving the window. The result is out [T, H, D] (the runtime's layout) in `dtype`.

`merge_ref` is the PyTorch reference (float32); `merge_parts` runs one Triton kernel on CUDA (one read of every
part, one write, instead of ~15 elementwise passes over float32 copies) and the reference elsewhere.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  the CPU build of torch has no triton
    triton = None

MAX_PARTS = 4


def unreverse(o: torch.Tensor, lse: torch.Tensor, rev: bool):
    """A part in query order, T rows (the reversed form's missing last query gets no keys: lse -inf, o 0)."""
    if not rev:
        return o, lse
    H, _, D = o.shape
    o = torch.cat([o.flip(1), o.new_zeros(H, 1, D)], 1)
    lse = torch.cat([lse.flip(1), lse.new_full((H, 1), float("-inf"))], 1)
    return o, lse


def merge_ref(parts, dtype) -> torch.Tensor:
    parts = [unreverse(o, lse, rev) for o, lse, rev in parts]
    if len(parts) == 1:
        out = parts[0][0].float()
    else:
        lse = torch.stack([p[1] for p in parts])  # [P, H, T]
        m = lse.max(0).values
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(lse - m)  # 0 where a part had no keys
        tot = w.sum(0)
        out = sum(p[0].float() * w[i][..., None] for i, p in enumerate(parts)) / tot[..., None]
    return out.transpose(0, 1).to(dtype)


if triton is not None:
    @triton.jit
    def _load_part(o_ptr, l_ptr, so_h, so_t, sl_h, sl_t, h, t, d, T, REV: tl.constexpr):
        """Rows t (query indices) of one part: (o [BT, D] float32, lse [BT])."""
        if REV:
            r = T - 2 - t
            ok = (t < T - 1)
        else:
            r = t
            ok = t < T
        r = tl.where(ok, r, 0)
        lse = tl.load(l_ptr + h * sl_h + r * sl_t, mask=ok, other=float("-inf"))
        o = tl.load(o_ptr + h * so_h + r[:, None] * so_t + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        return o, lse

    # The query count and the log-sum-exps' head strides (T, or T - 1 for a reversed part) change with every
    # prefill length; specialised (Triton does for integers divisible by 16 or equal to 1) they compiled a new
    # variant for some question lengths: 100-170 ms in the first question of a process on an H200. The outputs'
    # strides stay specialised (multiples of D): their loads are vectorised on that.
    @triton.jit(do_not_specialize=["T", "sl0h", "sl1h", "sl2h", "sl3h"])
    def _merge_kernel(out_ptr, s_out_t, s_out_h, T,
                      o0, l0, so0h, so0t, sl0h, sl0t,
                      o1, l1, so1h, so1t, sl1h, sl1t,
                      o2, l2, so2h, so2t, sl2h, sl2t,
                      o3, l3, so3h, so3t, sl3h, sl3t,
                      NP: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
                      D: tl.constexpr, BT: tl.constexpr):
        """Program (i, h): queries i*BT .. of head h, all parts merged -> out[t, h, :]."""
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        h = tl.program_id(1)
        d = tl.arange(0, D)
        a0, e0 = _load_part(o0, l0, so0h, so0t, sl0h, sl0t, h, t, d, T, R0)
        m = e0
        if NP > 1:
            a1, e1 = _load_part(o1, l1, so1h, so1t, sl1h, sl1t, h, t, d, T, R1)
            m = tl.maximum(m, e1)
        if NP > 2:
            a2, e2 = _load_part(o2, l2, so2h, so2t, sl2h, sl2t, h, t, d, T, R2)
            m = tl.maximum(m, e2)
        if NP > 3:
            a3, e3 = _load_part(o3, l3, so3h, so3t, sl3h, sl3t, h, t, d, T, R3)
            m = tl.maximum(m, e3)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(e0 - m)
        tot = w
        acc = a0 * w[:, None]
        if NP > 1:
            w = tl.exp(e1 - m)
            tot += w
            acc += a1 * w[:, None]
        if NP > 2:
            w = tl.exp(e2 - m)
            tot += w
            acc += a2 * w[:, None]
        if NP > 3:
            w = tl.exp(e3 - m)
            tot += w
            acc += a3 * w[:, None]
        out = acc / tl.where(tot == 0.0, 1.0, tot)[:, None]
        tl.store(out_ptr + t[:, None] * s_out_t + h * s_out_h + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(t < T)[:, None])


_BROKEN: list = []  # set when the kernel failed to compile or launch on this machine: the reference from then on


def _fits(parts) -> bool:
    o0 = parts[0][0]
    D = o0.shape[-1]
    return (triton is not None and not _BROKEN and o0.is_cuda and 1 <= len(parts) <= MAX_PARTS and D in (64, 128, 256)
            and all(o.stride(-1) == 1 and lse.dtype == torch.float32 for o, lse, _ in parts))


def merge_parts(parts, T: int, dtype: torch.dtype) -> torch.Tensor:
    """The parts (see the module docstring) merged: out [T, H, D] in dtype."""
    if not _fits(parts):
        return merge_ref(parts, dtype)
    H, D = parts[0][0].shape[0], parts[0][0].shape[-1]
    out = torch.empty(T, H, D, dtype=dtype, device=parts[0][0].device)
    args, flags = [], {}
    for i in range(MAX_PARTS):
        o, lse, rev = parts[min(i, len(parts) - 1)]
        args += [o, lse, o.stride(0), o.stride(1), lse.stride(0), lse.stride(1)]
        flags[f"R{i}"] = bool(rev)
    BT = 32
    try:
        _merge_kernel[(triton.cdiv(T, BT), H)](out, out.stride(0), out.stride(1), T, *args, NP=len(parts), D=D,
                                               BT=BT, **flags, num_warps=4)
    except Exception as e:  # noqa: BLE001  e.g. a GPU this Triton cannot compile for: stay correct, slower
        if isinstance(e, torch.OutOfMemoryError):
            raise
        log.warning("the Triton attention merge failed (%s); using the PyTorch merge", e)
        _BROKEN.append(str(e))
        return merge_ref(parts, dtype)
    return out
