"""The elementwise work between a layer's big kernels (linears, attention, the memory recurrence), as small
functions that the prefill (`AHNModel.forward`) and the fixed-shape decode step (`decode.py`) share.

Eagerly each is a handful of PyTorch kernels over [T, H, D]-sized tensors: in a steady-state 6144-token prefill
chunk of a 3B model they took about 60 of 200 ms of GPU time (RoPE alone 6.7 ms; the memory's
normalisations, gates and output 26 ms). On CUDA the prefill runs them torch.compile'd with dynamic shapes
(`prefill_pieces`): one or two fused kernels each, for any chunk length. Everywhere else, with AHN_COMPILE=0,
or when the compiler fails, the same functions run eagerly (the reference: identical arithmetic).

    apply_rope(q, k, cos, sin)      RoPE of q and k
    add_norm(x, y, w, eps)          residual add, then RMSNorm with gain w: (x + y, norm(x + y))
    silu_mul(g, u)                  the SwiGLU MLP's activation
    mem_in(mod, q, k, v, gates, G)  a memory's recurrence inputs for n written tokens and their readers
    mem_add(mod, o, r, xq)          o += the memory's output for what the recurrence read (in place)
"""
from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .memory.base import rms_normalize

log = logging.getLogger(__name__)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(q, k, cos, sin):
    """RoPE of q [T, H, D] and k [T, Hkv, D] with cos, sin [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def add_norm(x, y, w, eps: float):
    """The residual add, then the next RMSNorm (the HF module's arithmetic): (x + y, norm(x + y))."""
    h = x + y
    return h, w * rms_normalize(h, eps).to(h.dtype)


def silu_mul(g, u):
    return F.silu(g) * u


def mem_in(mod, q, k, v, gates, G: int):
    """Recurrence inputs of n written tokens (k, v [n, Hkv, D] post-RoPE, un-expanded; gates {name: [n, H]}) and
    of their readers' queries (q [n, H, D]): (q, k, v, g, beta) as `recurrent.run` takes them (the K/V heads
    repeated G times, keys and queries normalised as the variant requires)."""
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    k, v, g, beta = mod.write_args(mod.write_params(), k, v, gates)
    return mod.query(q), k, v, g, beta


def mem_add(mod, o, r, xq):
    """o [n, H, D] += the memory output for r [n, H, D] (what the recurrence read) and the readers' xq [n, h]."""
    o.add_(mod.output(r, xq, o.dtype).view(o.shape))


EAGER = SimpleNamespace(add_norm=add_norm, silu_mul=silu_mul, mem_in=mem_in, mem_add=mem_add, rope=apply_rope,
                        compiled=False)


class _Compiled:
    """A torch.compile'd piece that falls back to the eager function for good if compiling fails."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if not _FAILED:
            try:
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001  compiler or Triton failure: stay correct, slower
                log.warning("torch.compile of the prefill pieces failed (%s); running them eagerly", e)
                _FAILED.append(str(e))
        return self.fn(*args)


_FAILED: list = []
_PREFILL: dict = {}


def compiled() -> SimpleNamespace:
    """The pieces torch.compile'd with dynamic shapes (made once per process; any device)."""
    if not _PREFILL:
        # one compiled graph per memory variant, dtype and 0/1-size specialisation: a session that switches models
        # passes dynamo's default of 8 per function, after which it would silently run the pieces eagerly
        import torch._dynamo  # not at import: the CPU never compiles
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        _PREFILL["ns"] = SimpleNamespace(compiled=True, **{
            name: _Compiled(fn) for name, fn in
            (("add_norm", add_norm), ("silu_mul", silu_mul), ("mem_in", mem_in), ("mem_add", mem_add),
             ("rope", apply_rope))})
    return _PREFILL["ns"]


def prefill_pieces(device: torch.device) -> SimpleNamespace:
    """The pieces for a prefill on `device`: compiled on CUDA unless AHN_COMPILE=0 or a compile failed; the eager
    functions otherwise (on the CPU the compiled kernels gain little and the first call would compile for
    seconds)."""
    if device.type != "cuda" or os.environ.get("AHN_COMPILE", "1") == "0" or _FAILED:
        return EAGER
    return compiled()
