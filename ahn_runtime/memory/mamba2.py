"""AHN-Mamba2 memory, spec §3.3, run as simple gated linear attention:
keys k/|k|, values dt*v, log gate dt*a, queries q/|q|, scale 1."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import GroupLinear, MemoryModule, RMSGain, rms_normalize


class Mamba2(MemoryModule):
    variant = "Mamba2"
    gate_names = ("dt",)

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__(hidden_size, num_heads, head_dim)
        H, h, D = num_heads, hidden_size, head_dim
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.norm = RMSGain(H * D)
        self.dt_proj = nn.Linear(h, H, bias=True)
        self.g_proj = nn.Linear(h, H, bias=True)
        self.o_proj = GroupLinear(H, D, D)

    @staticmethod
    def param_count(hidden_size, num_heads, head_dim):
        H = num_heads
        return 2 * H + H * head_dim + 2 * (hidden_size * H + H) + H * head_dim ** 2

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        H = self.num_heads
        for lin in (self.dt_proj, self.g_proj):
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.uniform_(-bound, bound, generator=generator)
            lin.bias.uniform_(-bound, bound, generator=generator)
        self.dt_bias.fill_(1.0)
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.norm.weight.fill_(1.0)
        self.o_proj.weight.zero_()

    def gates(self, xn):
        return {"dt": self.dt_proj(xn)}

    scale = 1.0

    def write_params(self) -> dict:
        return {"A_log": self.A_log, "dt_bias": self.dt_bias}

    @classmethod
    def write_args(cls, p, k, v, gates):
        """Recurrence inputs (keys k/|k|, values dt*v, log gate dt*a, no beta) of written tokens, with
        dt = softplus(dt_raw + dt_bias), a = -exp(A_log). p: `write_params()` ([H]) or several layers' stacked
        ([L, H], with k/v [L, H, D])."""
        dt = F.softplus(gates["dt"].float() + p["dt_bias"].float())  # [n, H]
        g = dt * -torch.exp(p["A_log"].float())
        vd = (v.float() * dt[..., None]).to(v.dtype)
        return F.normalize(k, dim=-1), vd, g, None

    def query(self, q):
        return F.normalize(q, dim=-1)

    def proj_linears(self):
        return [self.dt_proj, self.g_proj]

    def split_proj(self, y):
        H = self.num_heads
        return {"dt": y[:, :H]}, y[:, H:]

    def output(self, r, xq, dtype, z=None):
        """r [n, H, D] float32 (what the recurrence read) -> memory output [n, H*D]. z: g_proj(xq) if known."""
        z = (self.g_proj(xq) if z is None else z).float()
        u = (r.to(dtype).float() * F.silu(z)[..., None]).reshape(r.shape[0], -1)
        n = rms_normalize(u, 1e-5) * self.norm.weight.float()
        return self.o_proj(n.to(dtype))
