"""Pieces shared by the AHN memory modules: GroupLinear and the module interface.

A memory module owns the parameters stored under `model.layers.{l}.ahn.fn.*` (official names, see spec §3) and
does two things for its layer:
    gates(xn)                -> per-token write gates, computed once from the written token's pre-normed hidden
                                state xn [T, h] and cached with its KV entry ({name: [T, H]}, model dtype)
    forward(q, k, v, gates, xq, state) -> (m [n, H*D], state)
                                writes n tokens (k, v: [n, H, D] post-RoPE, GQA-expanded; gates {name: [n, H]})
                                and reads with the paired queries (q [n, H, D] post-RoPE; xq [n, h] their
                                pre-normed hidden states); state [H, D, D] float32 or None.
and, for decode, the same split in two:
    write_args(p, k, v, gates) -> (keys, values, log decay or None, beta or None) of the recurrence; a
                                classmethod over parameters p (`write_params()`, or every layer's stacked), so
                                that a decode step writes all layers' leaving tokens in one batched update
    read(q, xq, state)        -> m [n, H*D] from a state that already holds the writes
and, for the fixed-shape decode step, every small projection of a token's xn as one matrix:
    decode_proj()             -> (weight [P, h], bias [P] or None): the write gates' and the output gate's
                                projections stacked, so a step runs one GEMV per layer for them, not two or three
    split_proj(y)             -> (gates {name: [n, H]}, z [n, H]) from y = xn @ weight.T + bias
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import recurrent


def stack_write_params(memories) -> dict[str, torch.Tensor]:
    """Every layer's `write_params()` stacked: {name: [L, H]} (for `write_layers`)."""
    per_layer = [m.write_params() for m in memories]
    return {n: torch.stack([p[n] for p in per_layer]) for n in per_layer[0]}


def write_layers(cls, params, k, v, gates, memory, evict=None):
    """One token written into every layer's memory at once, in place: memory [L, H, K, V] float32 (contiguous),
    k, v [L, H, D], gates {name: [L, H]}, params `stack_write_params(...)`, cls the memory module class.
    evict: None, or a bool device tensor; where False the recurrence inputs are zeros (key 0, log decay 0,
    beta 0: S * exp(0) + 0 = S exactly), so a fixed-shape step can always run the write."""
    k, v, g, beta = cls.write_args(params, k, v, gates)
    L, H = k.shape[:2]
    xs = (k, v, g, beta)
    if evict is not None:
        xs = tuple(None if x is None else torch.where(evict, x, torch.zeros((), dtype=x.dtype, device=x.device))
                   for x in xs)
    k, v, g, beta = (None if x is None else x.reshape(L * H, *x.shape[2:]) for x in xs)
    recurrent.write_ref(k, v, g, beta, memory.view(L * H, *memory.shape[2:]))


class GroupLinear(nn.Module):
    """Block-diagonal linear map: chunk i of the last dimension is multiplied on the right by weight[i].
    weight: [groups, in/groups, out/groups]; x [..., in] -> [..., out]. No bias."""

    def __init__(self, groups: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(groups, d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.weight.shape[0]
        xs = x.reshape(*x.shape[:-1], G, -1)
        y = torch.einsum("...gi,gio->...go", xs, self.weight)
        return y.reshape(*x.shape[:-1], -1)


class RMSGain(nn.Module):
    """Holds an RMSNorm gain (`.weight`) applied by the module's own fused norm/gate code."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class MemoryModule(nn.Module):
    variant: str = ""
    gate_names: tuple[str, ...] = ()

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim

    @staticmethod
    def param_count(hidden_size: int, num_heads: int, head_dim: int) -> int:
        raise NotImplementedError

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def forward(self, q, k, v, gates, xq, state):
        kn, vv, g, beta = self.write_args(self.write_params(), k, v, gates)
        r, state = recurrent.run(self.query(q), kn, vv, g, beta, self.scale, state)
        return self.output(r, xq, v.dtype), state

    def read(self, q, xq, state, z=None):
        """Read only, from a state that already holds the writes of this position: q [n, H, D] -> [n, H*D]
        (a subclass defines `write_params`, `write_args`, `query`, `scale` and `output`). z: the output gate's
        projection of xq when already computed (`split_proj`)."""
        r = torch.einsum("hkv,nhk->nhv", state, self.query(q).float()) * self.scale
        return self.output(r, xq, q.dtype, z)

    def decode_proj(self):
        lins = self.proj_linears()
        w = torch.cat([lin.weight for lin in lins])
        b = None if lins[0].bias is None else torch.cat([lin.bias for lin in lins])
        return w, b

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Training-start initialisation of the official code (spec §3); o_proj is zero, so a fresh memory adds 0."""
        raise NotImplementedError
