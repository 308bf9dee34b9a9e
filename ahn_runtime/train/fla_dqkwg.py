"""fla's `chunk_bwd_dqkwg` in PyTorch, registered as an fla backend where its Triton kernel is refused.

fla 0.6 refuses the gated case of `chunk_bwd_dqkwg` (one of the seven kernels of the chunk backward of the GDN
and Mamba2 recurrences) on Hopper GPUs with Triton >= 3.4, < 3.7.1, because Triton miscompiles it there (fla
issue #640); its fix is a TileLang backend, which is not installable everywhere. The kernel is chunk-local: given
the state before each chunk (`h`) and the gradient of the state after it (`dh`), both already computed by fla's
other kernels, every chunk's dq/dk/dw/dg is a handful of small matmuls, all chunks at once. So this module
computes it with batched PyTorch ops and registers it through fla's own backend registry (`fla.backends.register`,
operation 'common'), which fla consults before its Triton kernel; the rest of fla's backward is unchanged.

Contract (same as fla's kernel; `g` is the chunk-local cumulative log decay in log2 units, as fla passes it):
per chunk with state h before it, o = scale * (q * 2^g) h + scale * tril(q k^T * 2^(g_i - g_j)) v and
h_next = 2^g_last h + (k * 2^(g_last - g))^T v, v_new = u - w h. Given do, dh (= d h_next), dv (= d v_new) it
returns the partial derivatives dq, dk (through o and h_next), dw (= -dv h^T) and dg (w.r.t. the natural-log
decay; fla applies the reverse cumulative sum afterwards).
"""
from __future__ import annotations

import functools
import os

import torch


def chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None,
                          state_v_first=False, cu_seqlens=None, chunk_size=64, chunk_indices=None):
    """q, k [B, T, H, K]; v, do, dv [B, T, H, V]; h, dh [B, NT, H, K, V] ([.., V, K] if state_v_first);
    w [B, T, H, K]; g [B, T, H] float32 (chunk-local cumsum, log2 units). Returns dq, dk [B, T, H, K] (q's dtype),
    dw (w's dtype or None), dg [B, T, H] float32 (or None)."""
    if cu_seqlens is not None or g_gamma is not None or v.shape[2] != k.shape[2]:
        raise NotImplementedError("chunk_bwd_dqkwg_torch: fixed-length sequences, per-token g, H == HV only")
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = (T + C - 1) // C
    pad = N * C - T
    if scale is None:
        scale = K ** -0.5

    def chunks(x):  # [B, T, H, D] -> [B, H, N, C, D] float32, zero rows past T
        x = x.float()
        if pad:
            x = torch.cat([x, x.new_zeros((B, pad) + x.shape[2:])], 1)
        return x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    def states(x):  # [B, N, H, K, V] -> [B, H, N, K, V] float32
        x = x.float().view(B, N, H, *x.shape[-2:])
        if state_v_first:
            x = x.transpose(-1, -2)
        return x.permute(0, 2, 1, 3, 4)

    qc, kc, vc, doc = chunks(q), chunks(k), chunks(v), chunks(do)
    hs, dhs = states(h), states(dh)
    ht = hs.transpose(-1, -2)  # [B, H, N, V, K]
    dq = doc @ ht  # [B, H, N, C, K]
    dk = vc @ dhs.transpose(-1, -2)
    ds = doc @ vc.transpose(-1, -2)  # [B, H, N, C, C]
    dw = None
    if w is not None:
        dw = -(chunks(dv) @ ht)
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if g is None:
        ds = ds.masked_fill(~tril, 0.0)
        dq = (dq + ds @ kc) * scale
        dk = dk + (ds.transpose(-1, -2) @ qc) * scale
        dg = None
    else:
        gf = g.float()
        if pad:  # repeat the last value: the last chunk's g_last stays that of its last real row
            gf = torch.cat([gf, gf[:, -1:].expand(B, pad, H)], 1)
        gc = gf.view(B, N, C, H).permute(0, 3, 1, 2)  # [B, H, N, C]
        g_last = gc[..., -1]
        dg_last = (hs * dhs).sum((-1, -2)) * torch.exp2(g_last)
        dq = dq * (torch.exp2(gc) * scale)[..., None]
        dk = dk * torch.exp2(g_last[..., None] - gc)[..., None]
        dg_last = dg_last + (dk * kc).sum((-1, -2))
        diff = (gc[..., :, None] - gc[..., None, :]).masked_fill(~tril, float("-inf"))
        ds = ds * torch.exp2(diff) * scale
        dq = dq + ds @ kc
        dk = dk + ds.transpose(-1, -2) @ qc
        dg = (dq * qc).sum(-1) - (dk * kc).sum(-1)  # [B, H, N, C]
        dg = dg.reshape(B, H, N * C)
        last_rows = torch.clamp(torch.arange(1, N + 1, device=q.device) * C, max=T) - 1
        dg = dg.index_add(2, last_rows, dg_last)
        dg = dg[:, :, :T].transpose(1, 2).contiguous()

    def back(x, dtype):  # [B, H, N, C, D] -> [B, T, H, D]
        return x.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, -1)[:, :T].to(dtype).contiguous()

    return back(dq, q.dtype), back(dk, k.dtype), (back(dw, w.dtype) if dw is not None else None), dg


def fla_refuses_gated_backward() -> bool:
    """Whether this fla build refuses the gated chunk_bwd_dqkwg on the current GPU (Hopper + Triton 3.4-3.7.0)."""
    try:
        from fla import utils
    except Exception:  # noqa: BLE001
        return False
    return bool(getattr(utils, "IS_NVIDIA_HOPPER", False) and getattr(utils, "TRITON_ABOVE_3_4_0", False)
                and not getattr(utils, "TRITON_ABOVE_3_7_1", True))


@functools.lru_cache(maxsize=1)
def register_backend() -> bool:
    """Register `chunk_bwd_dqkwg_torch` as fla backend 'ahn_torch' of operation 'common' (idempotent). It takes
    the gated, fixed-length, H == HV calls and leaves every other call to fla (TileLang, when installed, has
    priority). Enabled where fla refuses its own kernel, or always with AHN_FLA_DQKWG=1; AHN_FLA_DQKWG=0
    disables it. Returns whether it is registered."""
    env = os.environ.get("AHN_FLA_DQKWG")
    if env == "0" or (env != "1" and not fla_refuses_gated_backward()):
        return False
    try:
        from fla.backends import BaseBackend, register
    except Exception:  # noqa: BLE001  fla missing, or a version without backend dispatch
        return False

    class AHNTorchBackend(BaseBackend):
        backend_type = "ahn_torch"
        priority = 6  # after TileLang (5)

        def chunk_bwd_dqkwg_verifier(self, q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None,
                                     scale=None, state_v_first=False, cu_seqlens=None, chunk_size=64,
                                     chunk_indices=None):
            if g is None:
                return False, "ungated: fla's Triton kernel is fine"
            if g_gamma is not None or cu_seqlens is not None or v.shape[2] != k.shape[2]:
                return False, "only fixed-length, per-token g, H == HV"
            return True, None

        def chunk_bwd_dqkwg(self, *args, **kwargs):
            return chunk_bwd_dqkwg_torch(*args, **kwargs)

    register("common")(AHNTorchBackend)
    return True


__all__ = ["chunk_bwd_dqkwg_torch", "fla_refuses_gated_backward", "register_backend"]
