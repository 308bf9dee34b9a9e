"""Linear recurrences of the AHN memories, one sequence at a time.

Shapes: q, k: [T, H, K]; v: [T, H, V]; g (log decay, <= 0): [T, H] or None; beta: [T, H] or None;
state: [H, K, V] float32 (key-major, fla's default layout) or None (zeros). Element i of the query sequence is
read right after element i of the key sequence is written.

    delta rule (beta given):   S_i = exp(g_i) S_{i-1};  u_i = beta_i (v_i - S_i^T k_i);  S_i += k_i u_i^T
    linear / simple GLA (beta None):  S_i = exp(g_i) S_{i-1} + k_i v_i^T
    output:                    o_i = scale * S_i^T q_i

GatedDeltaNet = delta rule with g; DeltaNet = delta rule with g None; Mamba2 = simple GLA (keys l2-normalised,
values pre-scaled by dt, g = dt * a, scale 1).

`recurrent_ref` is the per-token reference; `chunked` is the pure-PyTorch chunked (WY / UT-transform) form used
on the CPU; on CUDA the fla Triton kernels are used when fla is importable. `run` picks by device.
"""
from __future__ import annotations

import functools

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's l2norm: x / sqrt(sum(x^2) + eps), computed in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def recurrent_ref(q, k, v, g=None, beta=None, scale=1.0, state=None):
    """Per-token recurrence in float32 (or float64 if given). Returns (o [T, H, V] float, state [H, K, V])."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    T, H, K = k.shape
    V = v.shape[-1]
    S = torch.zeros(H, K, V, dtype=dt, device=k.device) if state is None else state.to(dt).clone()
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    out = torch.empty(T, H, V, dtype=dt, device=k.device)
    for i in range(T):
        if g is not None:
            S = S * torch.exp(g[i].to(dt))[:, None, None]
        if beta is None:
            S = S + k[i][:, :, None] * v[i][:, None, :]
        else:
            u = beta[i].to(dt)[:, None] * (v[i] - torch.einsum("hkv,hk->hv", S, k[i]))
            S = S + k[i][:, :, None] * u[:, None, :]
        out[i] = torch.einsum("hkv,hk->hv", S, q[i]) * scale
    return out, S


def write_ref(k, v, g, beta, state):
    """One token written into N independent states (the update of `recurrent_ref` without the read), in place.
    k [N, K], v [N, V], g / beta [N] or None, state [N, K, V] float32. Returns state."""
    dt = state.dtype
    k, v = k.to(dt), v.to(dt)
    if g is not None:
        state.mul_(torch.exp(g.to(dt))[:, None, None])
    if beta is not None:
        v = beta.to(dt)[:, None] * (v - torch.einsum("nkv,nk->nv", state, k))
    state.add_(k[:, :, None] * v[:, None, :])
    return state


def chunked(q, k, v, g=None, beta=None, scale=1.0, state=None, chunk: int = 64):
    """Chunked form, exact up to float rounding. Returns (o [T, H, V] float32, state [H, K, V] float32)."""
    T, H, K = k.shape
    V = v.shape[-1]
    dev = k.device
    S = torch.zeros(H, K, V, dtype=torch.float32, device=dev) if state is None else state.float()
    q, k, v = (x.float().transpose(0, 1) for x in (q, k, v))  # [H, T, *]
    if g is not None:
        g = g.float().transpose(0, 1)
    if beta is not None:
        beta = beta.float().transpose(0, 1)
    out = torch.empty(H, T, V, dtype=torch.float32, device=dev)
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=dev).tril()
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        C = e - s
        qc, kc, vc = q[:, s:e], k[:, s:e], v[:, s:e]
        m = tril[:C, :C]
        if g is not None:
            G = g[:, s:e].cumsum(-1)  # [H, C]
            diff = (G[:, :, None] - G[:, None, :]).masked_fill(~m, float("-inf"))
            decay = diff.exp()  # exp(G_t - G_s) for s <= t, else 0
            gam = G.exp()[..., None]  # [H, C, 1]
            last = G[:, -1]
            kdec = kc * (last[:, None] - G).exp()[..., None]
        else:
            decay = m.float().expand(H, C, C)
            gam = None
            last = None
            kdec = kc
        if beta is not None:
            b = beta[:, s:e, None]
            kS = kc @ S
            rhs = b * (vc - (kS * gam if gam is not None else kS))
            A = (b * (kc @ kc.transpose(-1, -2)) * decay).tril(-1)
            eye = torch.eye(C, dtype=A.dtype, device=dev)
            u = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
        else:
            u = vc
        qS = qc @ S
        o = (qS * gam if gam is not None else qS) + ((qc @ kc.transpose(-1, -2)) * decay) @ u
        out[:, s:e] = o * scale
        S = (S * last.exp()[:, None, None] if last is not None else S) + kdec.transpose(-1, -2) @ u
    return out.transpose(0, 1), S


@functools.lru_cache(maxsize=1)
def _fla():
    try:
        import fla.ops.delta_rule as dr
        import fla.ops.gated_delta_rule as gdr
        import fla.ops.simple_gla as sg
        return gdr, dr, sg
    except Exception:  # fla or triton missing: fall back to PyTorch
        return None


def fla_available() -> bool:
    return torch.cuda.is_available() and _fla() is not None


def _run_fla(q, k, v, g, beta, scale, state):
    """fla Triton kernels, chunk for > 64 tokens and fused recurrent otherwise (the official switch)."""
    gdr, dr, sg = _fla()
    args = [x[None].contiguous() for x in (q, k, v)]
    st = None if state is None else state[None].float().contiguous()
    n = q.shape[0]
    if beta is None:
        fn = sg.chunk_simple_gla if n > 64 else sg.fused_recurrent_simple_gla
        o, S = fn(*args, g=g[None].float().contiguous(), scale=scale, initial_state=st, output_final_state=True)
    elif g is None:
        fn = dr.chunk_delta_rule if n > 64 else dr.fused_recurrent_delta_rule
        o, S = fn(*args, beta=beta[None].contiguous(), scale=scale, initial_state=st, output_final_state=True)
    else:
        fn = gdr.chunk_gated_delta_rule if n > 64 else gdr.fused_recurrent_gated_delta_rule
        o, S = fn(*args, g=g[None].float().contiguous(), beta=beta[None].contiguous(), scale=scale,
                  initial_state=st, output_final_state=True)
    return o[0], S[0]


def run(q, k, v, g=None, beta=None, scale=1.0, state=None, use_fla: bool | None = None):
    """Dispatch by device: fla on CUDA (bf16/fp16 inputs), chunked PyTorch elsewhere, per-token loop for short
    inputs on the CPU (decode). q, k must already be normalised as the variant requires."""
    if use_fla is None:
        use_fla = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _fla() is not None
    if use_fla:
        return _run_fla(q, k, v, g, beta, scale, state)
    if q.shape[0] <= 4:
        return recurrent_ref(q, k, v, g, beta, scale, state)
    return chunked(q, k, v, g, beta, scale, state)
