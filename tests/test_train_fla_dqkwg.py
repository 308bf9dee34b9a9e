"""The PyTorch `chunk_bwd_dqkwg` (registered with fla where its Triton kernel is refused) against autograd of the
chunk-local forward it differentiates. CPU; the end-to-end check against fla on a GPU is in test_train_gpu.py."""
from __future__ import annotations

import math

import pytest
import torch

from ahn_runtime.train.fla_dqkwg import chunk_bwd_dqkwg_torch


def _reference(q, k, v, do, h, dh, w, G, dv, scale, C, gated):
    """Autograd of sum(o*do) + sum(h_next*dh) + sum(v_w*dv) over chunks, w.r.t. q, k, w and the chunk-local
    cumulative log decay G (natural log): the partial derivatives fla's kernel returns."""
    q, k, w, G = (x.detach().clone().requires_grad_() for x in (q, k, w, G))
    B, T, H, K = q.shape
    total = 0.0
    for n, s in enumerate(range(0, T, C)):
        e = min(T, s + C)
        qc, kc, vc, doc = (x[:, s:e].transpose(1, 2) for x in (q, k, v, do))  # [B, H, c, D]
        hn, dhn = h[:, n], dh[:, n]  # [B, H, K, V]
        tril = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        if gated:
            g = G[:, s:e].transpose(1, 2)  # [B, H, c]
            gl = g[..., -1:]
            decay = (g[..., :, None] - g[..., None, :]).masked_fill(~tril, float("-inf")).exp()
            o = scale * (qc * g.exp()[..., None]) @ hn + scale * ((qc @ kc.transpose(-1, -2)) * decay) @ vc
            h_next = gl.exp()[..., None] * hn + (kc * (gl - g).exp()[..., None]).transpose(-1, -2) @ vc
        else:
            o = scale * qc @ hn + scale * ((qc @ kc.transpose(-1, -2)).masked_fill(~tril, 0)) @ vc
            h_next = hn + kc.transpose(-1, -2) @ vc
        vw = -(w[:, s:e].transpose(1, 2) @ hn)
        total = total + (o * doc).sum() + (h_next * dhn).sum() + (vw * dv[:, s:e].transpose(1, 2)).sum()
    total.backward()
    return q.grad, k.grad, w.grad, (G.grad if gated else None)


@pytest.mark.parametrize("T,C,gated", [(128, 64, True), (100, 32, True), (77, 64, True), (96, 32, False)])
def test_dqkwg_matches_autograd(T, C, gated):
    torch.manual_seed(T + C)
    B, H, K, V = 2, 3, 16, 8
    N = (T + C - 1) // C
    q, k, w = (torch.randn(B, T, H, K) for _ in range(3))
    v, do, dv = (torch.randn(B, T, H, V) for _ in range(3))
    h, dh = torch.randn(B, N, H, K, V), torch.randn(B, N, H, K, V)
    # chunk-local cumulative sums of negative log decays
    logd = -torch.rand(B, T, H) * 0.3
    G = torch.cat([logd[:, s:s + C].cumsum(1) for s in range(0, T, C)], 1)
    scale = K ** -0.5
    ref = _reference(q, k, v, do, h, dh, w, G, dv, scale, C, gated)
    got = chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, w=w, g=(G / math.log(2) if gated else None), dv=dv,
                                scale=scale, chunk_size=C)
    names = ("dq", "dk", "dw", "dg")
    for name, a, b in zip(names, got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_state_v_first_layout_and_dtypes():
    torch.manual_seed(0)
    B, T, H, K, V, C = 1, 64, 2, 8, 16, 32
    q, k, w = (torch.randn(B, T, H, K, dtype=torch.bfloat16) for _ in range(3))
    v, do, dv = (torch.randn(B, T, H, V, dtype=torch.bfloat16) for _ in range(3))
    h, dh = torch.randn(B, 2, H, K, V), torch.randn(B, 2, H, K, V)
    g = torch.cat([(-torch.rand(B, C, H)).cumsum(1) for _ in range(2)], 1)
    a = chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, w=w, g=g, dv=dv, chunk_size=C)
    b = chunk_bwd_dqkwg_torch(q, k, v, do, h.transpose(-1, -2).contiguous(), dh.transpose(-1, -2).contiguous(),
                              w=w, g=g, dv=dv, chunk_size=C, state_v_first=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert a[0].dtype == a[1].dtype == a[2].dtype == torch.bfloat16 and a[3].dtype == torch.float32
    with pytest.raises(NotImplementedError):
        chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, g=g, chunk_size=C, cu_seqlens=torch.tensor([0, T]))
