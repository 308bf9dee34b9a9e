"""Differentiable teacher / student forward for AHN self-distillation (spec §4.2, §7).

Teacher: the frozen base model with full causal attention (no AHN), run under no_grad.
Student: the same frozen base with attention restricted to S sinks + the W most recent tokens, plus the AHN
memory of every layer, which compresses each token j >= S when it leaves the window and is read by the query
t = j + W (spec §4.1). With (W, S) given, its logits equal the inference runtime's prefill logits
(`AHNModel.prefill(..., logits="all")` in mode "ahn" with RuntimeConfig(window=W, sinks=S)).

Naming: `window` W and `sinks` S below are the inference values; the training budget of spec §4.2 is
B_w = W + S (the official `dy_sliding_window`). Loss positions are t >= B_w (memory non-empty).

Memory/compute layout (one sequence of L tokens, no batch dimension, like the runtime):
  * teacher: per layer q/k/v + causal SDPA (flash on CUDA, no mask); only the final normed hidden states of the
    loss positions are kept.
  * student: per-layer activation checkpointing (torch.utils.checkpoint, non-reentrant); attention is
    "dense" (SDPA + [L, L] boolean mask, CPU / short sequences), "blocked" (query blocks over gathered
    sink + window keys with small masks: O(L * (S + W)) memory, any device) or "flex" (FlexAttention with a
    block-sparse mask, CUDA; what the official training uses).
  * loss: KL(teacher || student) over the loss positions, computed in chunks of positions by a custom
    autograd function that produces the gradient w.r.t. the student's hidden states during the forward pass,
    so no [L, vocab] tensor is ever materialised or kept for backward.
  * trainable AHN parameters are float32 masters; on bf16 they are cast to the base dtype inside the forward
    (differentiably), so the numerics are those of the bf16 inference runtime; recurrent states stay float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels import recurrent
from ..kernels.attention import visible
from ..model import AHNModel, RuntimeConfig
from .kernels import memory_forward, needs_torch_kernel

ATTENTION_IMPLS = ("auto", "dense", "blocked", "flex")


# ----------------------------------------------------------------------------------------------------------
# attention

def causal_attention(q, k, v, scale):
    """Full causal attention. q [L, H, D], k/v [L, Hkv, D] -> [L, H, D]."""
    if q.is_cuda and q.shape[1] != k.shape[1]:  # repeated K/V keep the flash backend eligible (no [L, L] scores)
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


def _dense_window_attention(q, k, v, window, sinks, scale):
    L = q.shape[0]
    pos = torch.arange(L, device=q.device)
    mask = visible(pos, pos, window, sinks)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


def _blocked_window_attention(q, k, v, window, sinks, scale, block=1024):
    """Query blocks [a, b) attend to the gathered keys [0, min(S, b)) + [max(S, a-W+1), b) with a small mask."""
    L, H, D = q.shape
    G = H // k.shape[1]
    outs = []
    for a in range(0, L, block):
        b = min(L, a + block)
        lo = max(sinks, a - window + 1)
        kpos = torch.cat([torch.arange(0, min(sinks, b), device=q.device), torch.arange(lo, b, device=q.device)])
        kb, vb = k.index_select(0, kpos), v.index_select(0, kpos)
        if G > 1:
            kb, vb = kb.repeat_interleave(G, 1), vb.repeat_interleave(G, 1)
        mask = visible(torch.arange(a, b, device=q.device), kpos, window, sinks)
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], kb.transpose(0, 1)[None],
                                           vb.transpose(0, 1)[None], attn_mask=mask, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


_FLEX: dict = {}


def _flex_window_attention(q, k, v, window, sinks, scale):
    """FlexAttention with a block-sparse sinks + window mask. One compiled kernel per sequence length: the mask
    function is created once per device and reads W and S from two device scalars that are updated (with the
    block mask) whenever the geometry changes, so changing (W, S) between steps does not recompile. Every call,
    including the recomputation of a checkpointed layer, first makes the scalars match its own (W, S)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    dev = str(q.device)
    if dev not in _FLEX:
        w = torch.zeros((), dtype=torch.int64, device=q.device)
        s = torch.zeros((), dtype=torch.int64, device=q.device)

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & ((qi - ki < w) | (ki < s))
        _FLEX[dev] = {"w": w, "s": s, "mask_mod": mask_mod, "key": None, "block_mask": None}
    st = _FLEX[dev]
    L = q.shape[0]
    key = (L, int(window), int(sinks))
    if st["key"] != key:
        st["w"].fill_(int(window))
        st["s"].fill_(int(sinks))
        st["block_mask"] = create_block_mask(st["mask_mod"], None, None, L, L, device=q.device)
        st["key"] = key
    o = _FLEX["fn"](q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                    block_mask=st["block_mask"], scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


def resolve_attention(impl: str, device: torch.device | str, seq_len: int) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r} (choose from {', '.join(ATTENTION_IMPLS)})")
    if impl != "auto":
        return impl
    if torch.device(device).type == "cuda":
        return "flex"
    return "dense" if seq_len <= 4096 else "blocked"


def window_attention(q, k, v, window, sinks, scale, impl="dense"):
    """Sinks + sliding window attention over one whole sequence (key p visible to t iff p <= t and
    (p < S or p > t - W)). q [L, H, D], k/v [L, Hkv, D] -> [L, H, D]; differentiable."""
    if impl == "dense":
        return _dense_window_attention(q, k, v, window, sinks, scale)
    if impl == "blocked":
        return _blocked_window_attention(q, k, v, window, sinks, scale)
    if impl == "flex":
        return _flex_window_attention(q, k, v, window, sinks, scale)
    raise ValueError(f"attention implementation {impl!r} must be resolved first")


# ----------------------------------------------------------------------------------------------------------
# loss

class ChunkedKL(torch.autograd.Function):
    """mean over rows of KL(softmax(ht W^T) || softmax(hs W^T)), in chunks of rows.

    hs: student final-normed hidden states [n, h] (requires grad); ht: teacher's [n, h]; weight/bias: lm_head.
    The gradient w.r.t. hs (sum over chunks of (softmax_s - p_t) W) is computed during the forward pass, so only
    one chunk of [chunk, vocab] float32 tensors is alive at a time and nothing of that size is saved."""

    @staticmethod
    def forward(ctx, hs, ht, weight, bias, chunk, row_weights=None):
        """row_weights [n] float32 or None: per-row factors (the mean stays over n rows). Returns (loss, the rows'
        plain KL [n] float32, not differentiable)."""
        n = hs.shape[0]
        need = ctx.needs_input_grad[0]
        grad = torch.empty_like(hs) if need else None
        rows = torch.empty(n, dtype=torch.float32, device=hs.device)
        for i in range(0, n, chunk):
            ls = F.linear(hs[i:i + chunk], weight, bias).float().log_softmax(-1)
            lt = F.linear(ht[i:i + chunk], weight, bias).float().log_softmax(-1)
            pt = lt.exp()
            rows[i:i + chunk] = (pt * (lt - ls)).sum(-1)
            if need:
                d = ls.exp_().sub_(pt)  # d KL / d student logits
                if row_weights is not None:
                    d.mul_(row_weights[i:i + chunk, None])
                grad[i:i + chunk] = (d.to(weight.dtype) @ weight).to(hs.dtype)
            del ls, lt, pt
        total = rows.sum() if row_weights is None else (rows * row_weights).sum()
        if need:
            ctx.save_for_backward(grad)
        ctx.n = max(1, n)
        ctx.mark_non_differentiable(rows)
        return total / ctx.n, rows

    @staticmethod
    def backward(ctx, go, _rows):
        (grad,) = ctx.saved_tensors
        return grad * (go / ctx.n).to(grad.dtype), None, None, None, None, None


def kl_reference(student_logits, teacher_logits):
    """Plain KL(teacher || student) averaged over rows (tests)."""
    lt = teacher_logits.float().log_softmax(-1)
    ls = student_logits.float().log_softmax(-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------
# the distillation module

class _MemCall(nn.Module):
    """gates of the written tokens + write/read, as one module call (for functional_call). torch_kernel: route the
    module's recurrence to the chunk-parallel PyTorch kernel (where fla cannot differentiate it)."""

    def __init__(self, mem, torch_kernel=False):
        super().__init__()
        self.mem = mem
        self.torch_kernel = torch_kernel

    def forward(self, xw, q, k, v, xq):
        gates = self.mem.gates(xw)
        if self.torch_kernel:
            m, _ = memory_forward(self.mem, q, k, v, gates, xq)
        else:
            m, _ = self.mem(q, k, v, gates, xq, None)
        return m


MEMORY_KERNELS = ("auto", "module", "torch")


class Distiller(nn.Module):
    """Teacher/student forward over a frozen base. Owns (registers) only the trainable memories, so that
    `parameters()`, `state_dict()` and DDP see AHN parameters only; the base model is held unregistered.

    forward(ids [L], window, sinks) -> (loss, number of loss positions)."""

    def __init__(self, hf_model: nn.Module, memories: nn.ModuleList, attention: str = "auto",
                 grad_checkpointing: bool = True, loss_chunk: int | None = None, memory_kernel: str = "auto"):
        super().__init__()
        if any(p.requires_grad for p in hf_model.parameters()):
            raise ValueError("the base model must be frozen (requires_grad=False on every parameter)")
        if memory_kernel not in MEMORY_KERNELS:
            raise ValueError(f"memory_kernel must be one of {', '.join(MEMORY_KERNELS)}")
        self.memories = memories
        self.memory_kernel = memory_kernel
        self._mem_calls = None  # plain list, built on first use: not registered twice
        # the runtime's own base-layer helpers (q/k/v + RoPE, o_proj + MLP, final norm): one source of truth
        rt = AHNModel(hf_model, None, RuntimeConfig(window=1, sinks=0))
        object.__setattr__(self, "rt", rt)
        object.__setattr__(self, "base", hf_model)
        self.attention = attention
        self.grad_checkpointing = grad_checkpointing
        self.loss_chunk = loss_chunk or max(16, (1 << 26) // rt.vocab_size)

    # ---- helpers ------------------------------------------------------------------------------------------
    @property
    def compute_dtype(self):
        return self.rt.dtype

    def _attn_impl(self, L):
        return resolve_attention(self.attention, self.rt.device, L)

    def uses_torch_kernel(self) -> bool:
        """Whether the memories run on the chunk-parallel PyTorch kernel instead of the module's own dispatch
        (fla on CUDA, recurrent.chunked on CPU): memory_kernel 'torch', or 'auto' where fla cannot
        differentiate this variant (see kernels.py)."""
        if self.memory_kernel == "auto":
            return needs_torch_kernel(self.memories[0].variant, self.rt.device, self.compute_dtype)
        return self.memory_kernel == "torch"

    def memory_kernel_name(self) -> str:
        if self.uses_torch_kernel():
            return "PyTorch chunk-parallel (train/kernels.py)"
        if self.rt.device.type == "cuda" and self.compute_dtype != torch.float32 and recurrent._fla() is not None:
            from .fla_dqkwg import register_backend
            return "fla" + (" with chunk_bwd_dqkwg in PyTorch (train/fla_dqkwg.py)" if register_backend() else "")
        return "PyTorch chunked"

    def _memory(self, l, xw, q, k, v, xq):
        mem = self.memories[l]
        dt = self.compute_dtype
        if self._mem_calls is None:
            tk = self.uses_torch_kernel()
            self._mem_calls = [_MemCall(m, tk) for m in self.memories]
        n = q.shape[0]
        pad = 0
        if (q.is_cuda and dt in (torch.bfloat16, torch.float16) and recurrent._fla() is not None and n <= 64
                and not self._mem_calls[l].torch_kernel):
            # the runtime uses fla's fused-recurrent kernels for <= 64 tokens, which have no backward; padding
            # the written sequence at its end to 65 rows selects the chunk kernels and leaves rows < n unchanged
            pad = 65 - n
            xw, q, k, v, xq = (torch.cat([t, t.new_zeros((pad,) + t.shape[1:])]) for t in (xw, q, k, v, xq))
        if all(p.dtype == dt for p in mem.parameters()):
            m = self._mem_calls[l](xw, q, k, v, xq)
        else:
            params = {f"mem.{name}": p.to(dt) for name, p in mem.named_parameters()}
            m = torch.func.functional_call(self._mem_calls[l], params, (xw, q, k, v, xq))
        return m[:n] if pad else m

    def _student_layer(self, l, x, cos, sin, window, sinks, impl):
        rt = self.rt
        layer = rt.layers[l]
        L = x.shape[0]
        xn = layer.input_layernorm(x)
        q, k, v = rt._qkv(layer, xn, cos, sin)
        o = window_attention(q, k, v, window, sinks, rt.scale, impl)
        B = window + sinks
        n = L - B
        if n > 0:
            G = rt.n_heads // rt.n_kv_heads
            kw = k[sinks:sinks + n].repeat_interleave(G, dim=1)
            vw = v[sinks:sinks + n].repeat_interleave(G, dim=1)
            m = self._memory(l, xn[sinks:sinks + n], q[B:], kw, vw, xn[B:])
            o = torch.cat([o[:B], o[B:] + m.view(n, rt.n_heads, rt.head_dim)])
        return rt._finish_layer(layer, x, o)

    # ---- forwards -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_hidden(self, ids):
        """Final hidden states (before the final norm) of the full-attention base, [L, h]."""
        rt = self.rt
        ids = ids.to(rt.device)
        x = rt.embed(ids)
        cos, sin = rt._rope(x, 0, ids.shape[0])
        for layer in rt.layers:
            xn = layer.input_layernorm(x)
            q, k, v = rt._qkv(layer, xn, cos, sin)
            x = rt._finish_layer(layer, x, causal_attention(q, k, v, rt.scale))
        return x

    def student_hidden(self, ids, window: int, sinks: int):
        """Final hidden states (before the final norm) of the window + sinks + AHN student, [L, h]."""
        rt = self.rt
        ids = ids.to(rt.device)
        L = ids.shape[0]
        impl = self._attn_impl(L)
        x = rt.embed(ids)
        cos, sin = rt._rope(x, 0, L)
        for l in range(rt.n_layers):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._student_layer, l, x, cos, sin, window, sinks, impl, use_reentrant=False)
            else:
                x = self._student_layer(l, x, cos, sin, window, sinks, impl)
        return x

    def teacher_logits(self, ids):
        return self.rt.lm_head(self.rt.norm(self.teacher_hidden(ids))).float()

    def student_logits(self, ids, window, sinks):
        return self.rt.lm_head(self.rt.norm(self.student_hidden(ids, window, sinks))).float()

    def forward(self, ids, window: int, sinks: int, answer_mask=None, answer_weight: float = 1.0):
        """KL(teacher || student) averaged over the positions t >= window + sinks; the terms of the positions in
        answer_mask [L] bool (recall answers, see recall.py) count answer_weight times. Returns (loss,
        n_positions); `self.last_stats` gets the plain mean KL and the answer positions' mean KL."""
        ids = torch.as_tensor(ids).reshape(-1)
        L = ids.shape[0]
        B = window + sinks
        if window < 1 or sinks < 0 or B >= L:
            raise ValueError(f"need window >= 1, sinks >= 0 and window + sinks < sequence length "
                             f"(got W={window}, S={sinks}, L={L})")
        rt = self.rt
        ht = rt.norm(self.teacher_hidden(ids)[B:])
        hs = rt.norm(self.student_hidden(ids, window, sinks)[B:])
        bias = getattr(rt.lm_head, "bias", None)
        mask = None if answer_mask is None else torch.as_tensor(answer_mask, device=hs.device)[B:]
        w = None if mask is None or answer_weight == 1 else 1.0 + (answer_weight - 1.0) * mask.float()
        loss, rows = ChunkedKL.apply(hs, ht, rt.lm_head.weight, bias, self.loss_chunk, w)
        stats = {"kl": rows.mean()}
        if mask is not None and bool(mask.any()):
            stats["answer_kl"] = rows[mask].mean()
        object.__setattr__(self, "last_stats", stats)
        return loss, L - B


def loss_positions(seq_len: int, window: int, sinks: int) -> range:
    """Positions that carry the KL loss: those whose memory is non-empty (t >= S + W)."""
    return range(window + sinks, seq_len)


def decay_split(memories: nn.ModuleList):
    """(decay, no_decay) trainable parameter lists: weight decay on matrices only (projections, GroupLinear),
    not on biases, norm gains, A_log, dt_bias (the usual HF Trainer convention)."""
    decay, no_decay = [], []
    for name, p in memories.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return decay, no_decay


def init_memories(variant: str, hf_config, seed: int, device=None) -> nn.ModuleList:
    """Fresh float32 memories with the official training-start initialisation, deterministic in `seed`."""
    from ..memory import VARIANTS
    h, H = hf_config.hidden_size, hf_config.num_attention_heads
    D = getattr(hf_config, "head_dim", None) or h // H
    gen = torch.Generator().manual_seed(int(seed))
    mems = nn.ModuleList()
    for _ in range(hf_config.num_hidden_layers):
        m = VARIANTS[variant](h, H, D)
        m.reset_parameters(gen)
        mems.append(m)
    freeze_unused(mems)
    return mems.to(device=device, dtype=torch.float32)


def freeze_unused(memories: nn.ModuleList) -> None:
    """GDN's `D` is stored in checkpoints but never used by the forward pass: not trainable."""
    for m in memories:
        if hasattr(m, "D") and isinstance(m.D, nn.Parameter):
            m.D.requires_grad_(False)


def n_trainable(memories) -> int:
    return sum(p.numel() for p in memories.parameters() if p.requires_grad)


__all__ = ["ATTENTION_IMPLS", "ChunkedKL", "Distiller", "causal_attention", "decay_split", "freeze_unused",
           "init_memories", "kl_reference", "loss_positions", "MEMORY_KERNELS", "resolve_attention", "window_attention"]
