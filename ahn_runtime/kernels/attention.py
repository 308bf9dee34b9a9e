"""Softmax attention over sinks + a sliding window, without dense masks where the structure allows.

Shapes (one sequence, no batch dimension):
    q: [T, H, D]      queries at absolute positions qpos[0..T)
    k, v: [N, Hkv, D] keys at absolute positions kpos[0..N)
Key p is visible to query t iff  p <= t  and  (p < sinks  or  p > t - window).

`attention_ref` is the plain PyTorch reference (dense boolean mask, float32 softmax).
The fast path splits the keys into blocks that are fully visible, causal, or need a (small) mask, runs one
fused call per block that returns the log-sum-exp, and merges the blocks exactly (flash-decoding style merge;
`merge.merge_parts`, one Triton kernel on CUDA).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from .merge import merge_parts

NEG_INF = float("-inf")


def visible(qpos: torch.Tensor, kpos: torch.Tensor, window: float, sinks: int) -> torch.Tensor:
    """[T, N] bool visibility mask from absolute positions."""
    t = qpos[:, None]
    p = kpos[None, :]
    return (p <= t) & ((p < sinks) | (p > t - window))


def attention_ref(q, k, v, qpos, kpos, window: float, sinks: int, scale: float) -> torch.Tensor:
    """Reference: repeat K/V to H heads, dense mask, float32 softmax. Returns [T, H, D] in q's dtype."""
    H, Hkv = q.shape[1], k.shape[1]
    kr = k.repeat_interleave(H // Hkv, dim=1).float()
    vr = v.repeat_interleave(H // Hkv, dim=1).float()
    s = torch.einsum("thd,nhd->htn", q.float(), kr) * scale
    s = s.masked_fill(~visible(qpos, kpos, window, sinks)[None], NEG_INF)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("htn,nhd->thd", p, vr).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# building blocks returning (out [H, T, D] (q's dtype from the fused kernels, float32 otherwise), lse [H, T] float32)

def _sdpa_lse_math(q, k, v, scale, mask=None, causal=False):
    """q [H, T, D], k/v [H, N, D] (same head count). Float32 math; lse = -inf for rows with no key."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        T, N = s.shape[-2:]
        mask = torch.ones(T, N, dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(p, v.float()), lse


def _flash(q, k, v, scale, causal):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q[None], k[None], v[None], 0.0, causal, False, scale=scale)[:2]
    return out[0], lse[0].float()


def _cudnn(q, k, v, scale, causal):
    """cuDNN's fused attention. It takes grouped-query heads as they are (k/v with fewer heads than q) and any
    strides with a unit last one, so q, k, v are views of the runtime's buffers (no copies); the output has
    q's layout."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q[None], k[None], v[None], None, True, 0.0, causal, False, scale=scale)[:2]
    return out[0], lse[0].reshape(q.shape[0], q.shape[1]).float()


_CUDA_BACKEND: dict = {}


def cuda_backend(device: torch.device, dtype: torch.dtype) -> str:
    """'flash' (FlashAttention-2) or 'cudnn' for the fused blocks on this GPU: AHN_ATTENTION=flash|cudnn forces
    one; by default cuDNN is used where it returns the same result and is measurably faster (checked once per
    device on a chunk-shaped problem)."""
    env = os.environ.get("AHN_ATTENTION", "auto")
    if env in ("flash", "cudnn"):
        return env
    key = (device.index, dtype)
    if key not in _CUDA_BACKEND:
        _CUDA_BACKEND[key] = _probe(device, dtype)
    return _CUDA_BACKEND[key]


def _probe(device, dtype) -> str:
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(2, 8192, 128, device=device, dtype=dtype, generator=g)
        k = torch.randn(2, 8192, 128, device=device, dtype=dtype, generator=g)
        v = torch.randn(2, 8192, 128, device=device, dtype=dtype, generator=g)
        for causal in (False, True):
            of, lf = _flash(q, k, v, 0.088, causal)
            oc, lc = _cudnn(q, k, v, 0.088, causal)
            if not ((of - oc).abs().max() < 2e-2 and (lf - lc).abs().max() < 1e-2):
                return "flash"
        times = {}
        for name, fn in (("flash", _flash), ("cudnn", _cudnn)):
            fn(q, k, v, 0.088, False)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(5):
                fn(q, k, v, 0.088, False)
            torch.cuda.synchronize(device)
            times[name] = time.perf_counter() - t0
        return "cudnn" if times["cudnn"] < 0.9 * times["flash"] else "flash"
    except Exception:  # noqa: BLE001  no cuDNN attention for this GPU / dtype / build
        return "flash"


# T * N * H * D of an unmasked or causal call from which cuDNN pays for a new plan (37-57 ms on an H200) within
# one prefill chunk, whose layers share the shape: it ran such calls at ~580 TFLOP/s against FlashAttention-2's
# ~340 (T = 5000, N = 14,484, 16 heads of 128: 1.02 vs 1.76 ms, docs/bench/probe_attention_plans_2026-11-29.json),
# so a call of 4 * T * N * H * D flops saves about 5e-15 s per unit here, times 24-36 layers: >= 0.06 s. The
# long chunks of full attention are above it (a 3B chunk of 6,144 queries from ~44k keys on); questions and
# small models' chunks are far below.
_CUDNN_NEW_SHAPE_WORK = 1 << 39


def _sdpa_lse(q, k, v, scale, mask=None, causal=False, recurring=False):
    """Fused attention with log-sum-exp. q [H, T, D], k/v [Hkv, N, D] (Hkv divides H: query head h uses KV head
    h // (H / Hkv)); mask [T, N] bool or None; causal: query t sees keys <= t (aligned top-left for any lengths;
    the fused kernels only ever get square causal blocks, since they disagree on how to align unequal ones:
    FlashAttention-2 aligns them bottom-right). Any strides.
    recurring: the caller will issue this shape again (the layers of a full prefill chunk of a windowed mode,
    whose keys are the same in every document: `AHNModel._shapes_recur`). Only then, or for a call big enough
    to pay for it (`_CUDNN_NEW_SHAPE_WORK`), may cuDNN run it: cuDNN builds a plan for every new shape, 37-57 ms
    on an H200 (bench/probe_attention_plans.py), which the layers of a question, of a document's last partial
    chunk or of a short full-attention chunk never pay back; FlashAttention-2 has no plan, but runs long calls
    at ~60 % of cuDNN's speed (the 3B's full-attention prefill of 128k tokens on an H200: 8.99 s with every
    chunk on it, 6.41 s with the long ones on cuDNN)."""
    H, T, D = q.shape
    Hkv, N = k.shape[0], k.shape[1]
    if causal and T < N:  # the keys past the last query are seen by none
        k, v = k[:, :T], v[:, :T]
    elif causal and T > N:  # the first N queries are a square causal block, the others see every key
        o, lse = _sdpa_lse(q[:, :N], k, v, scale, causal=True, recurring=recurring)
        o2, lse2 = _sdpa_lse(q[:, N:], k, v, scale, recurring=recurring)
        return torch.cat([o, o2.to(o.dtype)], 1), torch.cat([lse, lse2], 1)
    if ((recurring or T * k.shape[1] * H * D >= _CUDNN_NEW_SHAPE_WORK) and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and mask is None and D <= 256
            and cuda_backend(q.device, q.dtype) == "cudnn"):
        return _cudnn(q, k, v, scale, causal)
    G = H // Hkv
    if G > 1 and not causal and mask is None:  # the G query heads of a KV head as G * T queries: no K/V repeat
        o, lse = _sdpa_lse_heads(q.reshape(Hkv, G * T, D), k, v, scale)
        return o.reshape(H, T, D), lse.reshape(H, T)
    if G > 1:
        k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    return _sdpa_lse_heads(q, k, v, scale, mask, causal)


def _sdpa_lse_heads(q, k, v, scale, mask=None, causal=False):
    """`_sdpa_lse` with as many KV heads as query heads (or q folded as above)."""
    dev = q.device.type
    if dev == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and mask is None and q.shape[-1] <= 256:
        return _flash(q, k, v, scale, causal)
    if dev == "cpu":
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, NEG_INF)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], 0.0, causal, attn_mask=bias, scale=scale)
        out, lse = out[0].float(), lse[0].float()
        if mask is not None:
            lse = lse.masked_fill(~mask.any(-1)[None], NEG_INF)
        return out, lse
    # other devices / masked CUDA calls: float32 math in query blocks to bound the score matrix
    T = q.shape[1]
    step = max(1, (1 << 24) // max(1, q.shape[0] * k.shape[1]))
    if T <= step:
        return _sdpa_lse_math(q, k, v, scale, mask, causal)
    if causal:
        N = k.shape[1]
        mask = torch.ones(T, N, dtype=torch.bool, device=q.device).tril()
    outs, lses = [], []
    for i in range(0, T, step):
        o, l = _sdpa_lse_math(q[:, i:i + step], k, v, scale, None if mask is None else mask[i:i + step])
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, 1)


# ----------------------------------------------------------------------------------------------------------
# key blocks with contiguous absolute positions

@dataclass
class KeyBlock:
    """Keys/values whose positions are start, start+1, ..., start+len-1. k, v: [len, Hkv, D]."""
    k: torch.Tensor
    v: torch.Tensor
    start: int

    @property
    def end(self) -> int:
        return self.start + self.k.shape[0]


def _ranges(a: int, b: int, window: float, sinks: int, p0: int, p1: int):
    """For queries [a, b) and keys [p0, p1): (full, partial) lists of position ranges.
    full: visible to every query; partial: visible to some. Everything else is invisible."""
    full, vis = [], []
    # sinks: visible iff p <= t
    full.append((p0, min(p1, sinks, a + 1)))
    vis.append((p0, min(p1, sinks, b)))
    # non-sinks: visible iff t - window < p <= t
    lo = max(p0, sinks)
    f_lo = lo if window == math.inf else max(lo, b - int(window))
    full.append((f_lo, min(p1, a + 1)))
    v_lo = lo if window == math.inf else max(lo, a - int(window) + 1)
    vis.append((v_lo, min(p1, b)))
    full = [(x, y) for x, y in full if y > x]
    vis = [(x, y) for x, y in vis if y > x]
    partial = []
    for x, y in vis:
        cur = x
        for fx, fy in sorted(full):
            if fy <= cur or fx >= y:
                continue
            if fx > cur:
                partial.append((cur, fx))
            cur = max(cur, fy)
        if cur < y:
            partial.append((cur, y))
    return full, partial


def _edge(q, k, v, scale, recurring=False):
    """Keys leaving the window during the chunk: key j (of n, oldest first) is visible to query i iff
    i < j + T - n. Reversing queries and keys turns this into an ordinary causal block: reversed query row
    r = T-2-i (the last query sees none of these keys and is dropped) sees reversed key j' = n-1-j iff j' <= r
    (n = T - 1 in a steady chunk; fewer in the chunk where the window fills).
    q [T, H, D], k/v [n, Hkv, D]. Returns the part in reversed form (`merge.merge_parts`: row r is query T-2-r)."""
    o, lse = _sdpa_lse(q.flip(0)[1:].transpose(0, 1), k.flip(0).transpose(0, 1), v.flip(0).transpose(0, 1), scale,
                       causal=True, recurring=recurring)
    return o, lse, True


def window_attention(q: torch.Tensor, qstart: int, blocks: list[KeyBlock], window: float, sinks: int,
                     scale: float, recurring: bool = False) -> torch.Tensor:
    """Queries at positions qstart..qstart+T-1 over key blocks. Returns [T, H, D] in q's dtype.

    Fully visible key ranges go through an unmasked fused kernel; the chunk's own keys use a causal kernel when
    the window is at least as long as the chunk; the keys leaving the window during the chunk use a causal kernel
    on reversed queries and keys (`_edge`); anything else goes through one small masked call. Results are merged
    by log-sum-exp. Grouped-query heads are never repeated for the fused kernels (`_sdpa_lse`). recurring: these
    shapes come again (a full chunk of a windowed mode), so cuDNN may plan them (`_sdpa_lse`)."""
    T, H, D = q.shape
    a, b = qstart, qstart + T
    qh = q.transpose(0, 1)  # [H, T, D] view
    parts = []
    masked_k, masked_v, masked_pos = [], [], []
    for blk in blocks:
        if blk.k.shape[0] == 0:
            continue
        # the chunk itself: causal when every in-chunk key within reach is inside the window
        if blk.start == a and blk.end == b and T <= window:
            parts.append((*_sdpa_lse(qh, blk.k.transpose(0, 1), blk.v.transpose(0, 1), scale, causal=True,
                                      recurring=recurring), False))
            continue
        full, partial = _ranges(a, b, window, sinks, blk.start, blk.end)
        for x, y in full:
            kk = blk.k[x - blk.start:y - blk.start].transpose(0, 1)
            vv = blk.v[x - blk.start:y - blk.start].transpose(0, 1)
            parts.append((*_sdpa_lse(qh, kk, vv, scale, recurring=recurring), False))
        for x, y in partial:
            if T <= window and x >= sinks and y == b - window and blk.start <= x:
                parts.append(_edge(q, blk.k[x - blk.start:y - blk.start], blk.v[x - blk.start:y - blk.start], scale,
                                   recurring))
                continue
            masked_k.append(blk.k[x - blk.start:y - blk.start])
            masked_v.append(blk.v[x - blk.start:y - blk.start])
            masked_pos.append(torch.arange(x, y, device=q.device))
    if masked_k:
        kk = torch.cat(masked_k).transpose(0, 1)
        vv = torch.cat(masked_v).transpose(0, 1)
        qpos = torch.arange(a, b, device=q.device)
        mask = visible(qpos, torch.cat(masked_pos), window, sinks)
        parts.append((*_sdpa_lse(qh, kk, vv, scale, mask=mask), False))
    return merge_parts(parts, T, q.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """One query over keys that are all visible (or only those with keep=True).
    q [1, H, D]; k, v [Hkv, N, D] (a slice of the cache, any slot order); keep [N] bool. Returns [1, H, D]."""
    H, D = q.shape[1], q.shape[2]
    Hkv = k.shape[0]
    qg = q[0].reshape(Hkv, H // Hkv, D)  # the G query heads of a KV head act as G queries: no K/V repeat
    if keep is None and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # pinned: cuDNN re-plans for every key length
            o = torch.nn.functional.scaled_dot_product_attention(qg[None], k[None], v[None], scale=scale)[0]
        return o.reshape(1, H, D)
    mask = None if keep is None else keep[None, :].expand(H // Hkv, -1)
    o, _ = _sdpa_lse(qg, k, v, scale, mask=mask)
    return o.reshape(1, H, D).to(q.dtype)


def static_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                            split: int = 512) -> torch.Tensor:
    """One query over a whole preallocated cache with fixed shapes (CUDA-graph friendly): invalid slots carry
    bias -inf. q [1, H, D]; k, v [Hkv, N, D] with N a multiple of `split`; bias [N] float32. Returns [1, H, D].

    Scores and softmax in float32; P @ V is split along the keys into N/split independent products that are
    summed in float32, so the long reduction runs on many thread blocks at once."""
    H, D = q.shape[1], q.shape[2]
    Hkv, N = k.shape[0], k.shape[1]
    G = H // Hkv
    qg = q[0].reshape(Hkv, G, D)
    s = torch.matmul(qg, k.transpose(1, 2)).float() * scale + bias  # [Hkv, G, N]
    p = torch.softmax(s, -1).to(v.dtype)
    if N % split or N == split:
        o = torch.matmul(p, v).float()
    else:
        ns = N // split
        pp = p.view(Hkv, G, ns, split).transpose(1, 2)  # [Hkv, ns, G, split]
        o = torch.matmul(pp, v.view(Hkv, ns, split, D)).float().sum(1)  # [Hkv, G, D]
    return o.reshape(1, H, D).to(q.dtype)
