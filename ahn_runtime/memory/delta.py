"""AHN-GDN (GatedDeltaNet) and AHN-DN (DeltaNet) memories, spec §3.1 / §3.2."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import recurrent
from .base import GroupLinear, MemoryModule, RMSGain, rms_normalize


class GatedDeltaNet(MemoryModule):
    variant = "GatedDeltaNet"
    gate_names = ("beta", "a")
    gated = True

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__(hidden_size, num_heads, head_dim)
        H, h, D = num_heads, hidden_size, head_dim
        self.b_proj = nn.Linear(h, H, bias=False)
        if self.gated:
            self.a_proj = nn.Linear(h, H, bias=False)
            self.A_log = nn.Parameter(torch.zeros(H))
            self.dt_bias = nn.Parameter(torch.zeros(H))
            self.D = nn.Parameter(torch.ones(H))  # stored in checkpoints, unused by the forward pass
        self.g_proj = nn.Linear(h, H, bias=False)
        self.o_norm = RMSGain(D)
        self.o_proj = GroupLinear(H, D, D)

    @staticmethod
    def param_count(hidden_size, num_heads, head_dim):
        return 3 * hidden_size * num_heads + 3 * num_heads + head_dim + num_heads * head_dim ** 2

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        H = self.num_heads
        for lin in (self.b_proj, self.g_proj) + ((self.a_proj,) if self.gated else ()):
            lin.weight.normal_(0.0, 0.02, generator=generator)
        if self.gated:
            A = torch.empty(H).uniform_(0, 16, generator=generator)
            self.A_log.copy_(torch.log(A))
            dt = torch.exp(torch.rand(H, generator=generator) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.D.fill_(1.0)
        self.o_norm.weight.fill_(1.0)
        self.o_proj.weight.zero_()

    def gates(self, xn):
        g = {"beta": torch.sigmoid(self.b_proj(xn))}
        if self.gated:
            g["a"] = self.a_proj(xn)
        return g

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def write_params(self) -> dict:
        return {"A_log": self.A_log, "dt_bias": self.dt_bias} if self.gated else {}

    @classmethod
    def write_args(cls, p, k, v, gates):
        """Recurrence inputs (keys, values, log decay g = -exp(A_log) softplus(a + dt_bias), beta) of written
        tokens. p: `write_params()` ([H]) or those of several layers stacked ([L, H], with k/v [L, H, D])."""
        g = None
        if cls.gated:
            g = -torch.exp(p["A_log"].float()) * F.softplus(gates["a"].float() + p["dt_bias"].float())
        return recurrent.l2norm(k).to(v.dtype), v, g, gates["beta"]

    def query(self, q):
        return recurrent.l2norm(q).to(q.dtype)

    def proj_linears(self):
        return [self.b_proj] + ([self.a_proj] if self.gated else []) + [self.g_proj]

    def split_proj(self, y):
        H = self.num_heads
        g = {"beta": torch.sigmoid(y[:, :H])}
        if self.gated:
            g["a"] = y[:, H:2 * H]
        return g, y[:, -H:]

    def output(self, r, xq, dtype, z=None):
        """r [n, H, D] float32 (what the recurrence read) -> memory output [n, H*D]. z: g_proj(xq) if known."""
        z = (self.g_proj(xq) if z is None else z).float()  # one gate per head
        n = rms_normalize(r.to(dtype), 1e-5) * self.o_norm.weight.float() * (z * torch.sigmoid(z))[..., None]
        return self.o_proj(n.to(dtype).reshape(r.shape[0], -1))


class DeltaNet(GatedDeltaNet):
    variant = "DeltaNet"
    gate_names = ("beta",)
    gated = False

    @staticmethod
    def param_count(hidden_size, num_heads, head_dim):
        return 2 * hidden_size * num_heads + head_dim + num_heads * head_dim ** 2
