"""Memory kernels for training when fla cannot differentiate one.

fla 0.6 refuses the backward of its gated chunk kernels (`chunk_gated_delta_rule`, `chunk_simple_gla`) on Hopper
GPUs with Triton >= 3.4 and < 3.7.1 (a Triton miscompilation in one kernel, fla issue #640) unless tilelang is
installed. The trainer first registers a PyTorch version of that one kernel with fla (fla_dqkwg.py), which makes
fla's backward usable again; where fla still cannot differentiate a variant (or with --memory-kernel torch) the
memories use another differentiable kernel: `chunk_recurrence` is a chunk-parallel
pure-PyTorch form of the same recurrences (WY / UT transform): everything inside a chunk is computed for all
chunks at once; only the state pass (two small matmuls per chunk) is sequential, so autograd's graph stays
small. Float32 internally; same conventions as `ahn_runtime.kernels.recurrent` (initial state zero, element i of
the query sequence reads right after element i of the key sequence is written).

`memory_forward(mem, ...)` runs a memory module's own forward code with its `recurrent.run` calls routed to a
given kernel (the function is re-bound to other globals; the module and the runtime are not modified).
"""
from __future__ import annotations

import functools
import types

import torch

from ..kernels import recurrent
from .fla_dqkwg import register_backend


def chunk_recurrence(q, k, v, g=None, beta=None, scale=1.0, state=None, chunk: int = 64):
    """q, k [T, H, K]; v [T, H, V]; g (log decay) / beta [T, H] or None. Returns (o [T, H, V] float32, None).
    Delta rule when beta is given, linear attention with decay (simple GLA) otherwise."""
    if state is not None:
        raise NotImplementedError("training kernel: sequences start from an empty memory")
    T, H, K = k.shape
    V = v.shape[-1]
    C = chunk
    N = (T + C - 1) // C
    pad = N * C - T

    def prep(x, fill=0.0):
        x = x.float()
        if pad:
            x = torch.cat([x, x.new_full((pad,) + x.shape[1:], fill)])
        return x.transpose(0, 1).reshape(H, N, C, *x.shape[2:])  # [H, N, C, ...]

    q, k, v = prep(q), prep(k), prep(v)  # padded keys are 0: they change nothing
    dev = k.device
    tril = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    if g is not None:
        G = prep(g).cumsum(-1)  # [H, N, C]
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~tril, float("-inf")).exp()
        gam = G.exp()[..., None]  # [H, N, C, 1]
        last = G[..., -1]  # [H, N]
        kdec = k * (last[..., None] - G).exp()[..., None]
    else:
        decay = tril.float().expand(H, N, C, C)
        gam, last, kdec = None, None, k
    if beta is not None:
        b = prep(beta)[..., None]  # [H, N, C, 1]
        A = (b * (k @ k.transpose(-1, -2)) * decay).tril(-1)
        IA = A + torch.eye(C, dtype=A.dtype, device=dev)
        rhs = torch.cat([b * v, b * (k * gam if gam is not None else k)], -1)
        sol = torch.linalg.solve_triangular(IA, rhs, upper=False, unitriangular=True)
        U, Wm = sol[..., :V], sol[..., V:]
    S = torch.zeros(H, K, V, dtype=torch.float32, device=dev)
    states, us = [], []
    for n in range(N):  # sequential state pass
        states.append(S)
        u = U[:, n] - Wm[:, n] @ S if beta is not None else v[:, n]
        us.append(u)
        upd = kdec[:, n].transpose(-1, -2) @ u
        S = (S * last[:, n].exp()[:, None, None] if last is not None else S) + upd
    Sb = torch.stack(states, 1)  # [H, N, K, V] state before each chunk
    u = torch.stack(us, 1)  # [H, N, C, V]
    o = (q * gam if gam is not None else q) @ Sb + ((q @ k.transpose(-1, -2)) * decay) @ u
    o = (o * scale).reshape(H, N * C, V)[:, :T].transpose(0, 1)
    return o, None


@functools.lru_cache(maxsize=None)
def _rebound(fn, kernel):
    shim = types.SimpleNamespace(**{n: getattr(recurrent, n) for n in dir(recurrent) if not n.startswith("__")})
    shim.run = kernel
    glb = dict(fn.__globals__)
    glb["recurrent"] = shim
    return types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)


def _torch_run(q, k, v, g=None, beta=None, scale=1.0, state=None, use_fla=None):
    return chunk_recurrence(q, k, v, g, beta, scale, state)


def memory_forward(mem, q, k, v, gates, xq, kernel=_torch_run):
    """mem.forward(q, k, v, gates, xq, None) with `recurrent.run` replaced by `kernel`."""
    fn = type(mem).forward
    return _rebound(fn, kernel)(mem, q, k, v, gates, xq, None)


# ----------------------------------------------------------------------------------------------------------
# can fla differentiate this recurrence here?

_FLA_KIND = {"GatedDeltaNet": "gated_delta", "DeltaNet": "delta", "Mamba2": "simple_gla"}


@functools.lru_cache(maxsize=None)
def fla_backward_ok(kind: str, device: str) -> bool:
    """Probe fla's chunk kernel of this kind (forward + backward on a tiny input) on the device, with our PyTorch
    `chunk_bwd_dqkwg` registered where fla refuses its own (fla_dqkwg.py)."""
    if not (device.startswith("cuda") and recurrent.fla_available()):
        return False
    register_backend()
    try:
        gdr, dr, sg = recurrent._fla()
        T, H, D = 128, 2, 64
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, T, H, D, device=device, generator=gen).bfloat16().requires_grad_() for _ in range(3))
        k2 = torch.nn.functional.normalize(k.float(), dim=-1).bfloat16()
        g = -torch.rand(1, T, H, device=device, generator=gen).requires_grad_()
        beta = torch.rand(1, T, H, device=device, generator=gen).bfloat16().requires_grad_()
        if kind == "gated_delta":
            o, _ = gdr.chunk_gated_delta_rule(q, k2, v, g=g, beta=beta, scale=D ** -0.5)
        elif kind == "delta":
            o, _ = dr.chunk_delta_rule(q, k2, v, beta=beta, scale=D ** -0.5)
        else:
            o, _ = sg.chunk_simple_gla(q, k2, v, g=g, scale=1.0)
        o.float().sum().backward()
        torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001  e.g. fla's RuntimeError for gated backward on Hopper + Triton < 3.7.1
        return False


def needs_torch_kernel(variant: str, device, dtype) -> bool:
    """True where the runtime would use fla (CUDA, 16-bit) but fla cannot differentiate this variant."""
    dev = torch.device(device)
    if dev.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or recurrent._fla() is None:
        return False
    return not fla_backward_ok(_FLA_KIND[variant], str(dev if dev.index is not None else torch.device("cuda", 0)))


__all__ = ["chunk_recurrence", "fla_backward_ok", "memory_forward", "needs_torch_kernel"]
