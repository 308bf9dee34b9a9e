"""Memory planning: predict the peak of a prefill (+ the answer's decode) before allocating anything, and refuse
with a clear message, naming what would fit instead, when it will not fit.

    plan = plan_memory(model, "full", n_tokens=131072, max_new_tokens=512)
    plan.fits, plan.need, plan.available, plan.message()
    check_memory(model, state, n_tokens, max_new_tokens)   # raises AHNMemoryError when it will not fit

The prediction is the state's buffers (exact: the same geometry `SequenceState.reserve` allocates) plus the
largest transient of one prefill chunk (activations of a layer, attention partial outputs and their
log-sum-exps, the memory kernel's scratch, the MLP, de-quantized weights of a 4-bit linear, the last logits),
plus a fixed margin for the allocator's fragmentation. bench/suite.py prints the prediction next to the
measured peak.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .errors import AHNError
from .state import SequenceState

MARGIN = 256 << 20  # allocator fragmentation, cuBLAS/cuDNN workspaces, kernel scratch not modelled
GiB = 1 << 30


class AHNMemoryError(AHNError):
    """The request does not fit in the device's memory (refused up front, or an out-of-memory was caught)."""


def _esize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def state_bytes(model, mode: str, slots: int) -> int:
    """Bytes of a state of `mode` holding `slots` KV slots."""
    spec = model.state_spec(mode)
    e = _esize(model.dtype)
    per_slot = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * e + len(spec.gate_names) * spec.n_layers \
        * spec.n_heads * e
    mem = spec.n_layers * spec.n_heads * spec.head_dim ** 2 * 4 if spec.has_memory else 0
    return per_slot * slots + mem


def slots_for(model, mode: str, n_tokens: int) -> int:
    spec = model.state_spec(mode)
    return int(min(spec.max_slots, n_tokens))


def chunk_workspace(model, mode: str, chunk: int, window_tokens: int) -> int:
    """Peak transient bytes while one chunk of `chunk` tokens goes through a layer."""
    c = model.hf.config
    e = _esize(model.dtype)
    h, I = c.hidden_size, c.intermediate_size
    H, Hkv, D = model.n_heads, model.n_kv_heads, model.head_dim
    T = chunk
    act = T * (3 * h + H * D * 2 + 2 * Hkv * D) * e  # x, residual, xn, q (+rotated), k, v
    mlp = T * I * 3 * e  # gate, up, act*up
    # attention: up to four partial outputs [H, T, D] in float32 with their LSEs, the merged output, and the
    # GQA-expanded K/V of the chunk's own causal block
    attn = 4 * T * H * (D + 1) * 4 + T * H * D * (4 + e) + 2 * T * H * D * e
    mem = 0
    if mode == "ahn":
        # write/read keys and values expanded to H heads, gates, fla's chunked scratch (~6 [T, H, D] float32)
        mem = T * H * D * (4 * e + 6 * 4) + T * H * 8
    if mode != "full":  # the window shift in _store_chunk copies the surviving window of one layer
        mem += 2 * Hkv * D * e * min(window_tokens, T + window_tokens)
    deq = 0
    from .quantize import quantization_of
    if quantization_of(model.hf) != "none":  # bitsandbytes de-quantizes a weight for prefill matmuls
        deq = max(I * h, H * D * h) * e
    logits = c.vocab_size * (e + 4)
    return act + max(mlp + deq, attn + mem) + logits


def available_bytes(device: torch.device) -> int:
    """Bytes new tensors can still take on the device: CUDA free memory plus what the allocator holds unused,
    capped by a per-process memory fraction; on the CPU, MemAvailable."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        alloc, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        avail = free + reserved - alloc
        get_frac = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        frac = get_frac(device) if get_frac is not None else 1.0
        if frac < 1.0:
            avail = min(avail, int(frac * total) - alloc)
        return max(0, int(avail))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def available_to(model) -> int:
    """available_bytes of the model's device, within the model's RuntimeConfig.memory_limit when one is set
    (the limit counts the weights: what is left for states and workspace is limit - weights)."""
    avail = available_bytes(model.device)
    limit = model.config.memory_limit
    if limit is not None:
        from .accounting import weight_bytes
        w = weight_bytes(model)
        avail = min(avail, max(0, limit - w["base_weights"] - w["ahn_weights"]))
    return avail


@dataclass
class MemoryPlan:
    mode: str
    tokens: int
    state: int  # bytes the state's buffers will hold at the end
    new_state: int  # of which still to be allocated
    workspace: int  # transient peak of one chunk
    available: int
    device: str
    suggestions: list[str]

    @property
    def need(self) -> int:
        return self.new_state + self.workspace + MARGIN

    @property
    def fits(self) -> bool:
        return self.need <= self.available

    def message(self) -> str:
        s = (f"{self.tokens:,} tokens in {self.mode} mode need about {self.need / GiB:.2f} GiB more on {self.device} "
             f"(state {self.state / GiB:.2f} GiB, workspace {self.workspace / GiB:.2f} GiB), but only "
             f"{self.available / GiB:.2f} GiB are free.")
        if self.suggestions:
            s += " What fits instead: " + "; ".join(self.suggestions) + "."
        return s


def plan_memory(model, mode: str, n_tokens: int, max_new_tokens: int = 0, state: SequenceState | None = None,
                chunk_size: int | None = None, fresh: bool = False) -> MemoryPlan:
    """Predict whether feeding n_tokens (+ max_new_tokens of answer) into `state` (or a new state) fits.
    fresh: into a new copy of `state` (`AHNModel.fork`), whose buffers are all still to be allocated."""
    pos = state.pos if state is not None else 0
    total = pos + n_tokens + max_new_tokens
    slots = slots_for(model, mode, pos + n_tokens)
    if model.device.type == "cuda" and max_new_tokens:
        from .decode import decode_capacity
        slots = decode_capacity(model.state_spec(mode), slots, max_new_tokens)
    else:
        slots = slots_for(model, mode, total)
    st_bytes = state_bytes(model, mode, slots)
    have = state.nbytes()["total"] if state is not None and not fresh else 0
    C = min(chunk_size or model.config.chunk_size, max(1, n_tokens))
    W = model.config.window + model.config.sinks
    ws = chunk_workspace(model, mode, C, W if mode != "full" else 0)
    avail = available_to(model)
    plan = MemoryPlan(mode, total, st_bytes, max(0, st_bytes - have), ws, avail, str(model.device), [])
    if not plan.fits:
        plan.suggestions = _suggest(model, mode, total, max_new_tokens, avail, C)
    return plan


def _suggest(model, mode, total, max_new, avail, C) -> list[str]:
    out = []
    W, S = model.config.window, model.config.sinks

    def need(m, window=W, chunk=C):
        slots = min(total, window + S) if m != "full" else total
        return state_bytes(model, m, slots) + chunk_workspace(model, m, chunk, window + S if m != "full" else 0) \
            + MARGIN

    if mode == "full":
        if model.memories is not None and need("ahn") <= avail:
            out.append(f"AHN mode (constant memory: {need('ahn') / GiB:.2f} GiB for any length)")
        elif need("window") <= avail:
            out.append(f"window-only mode ({need('window') / GiB:.2f} GiB, forgets everything before the last "
                       f"{W:,} tokens)")
        fit = int((avail - MARGIN - chunk_workspace(model, "full", C, 0)) // max(1, state_bytes(model, "full", 1)
                                                                                  - state_bytes(model, "full", 0)))
        if fit > 0:
            out.append(f"full attention over at most ~{fit:,} tokens")
    else:
        for w in (W // 2, W // 4, W // 8):
            if w >= 256 and need(mode, w) <= avail:
                out.append(f"a smaller window (--window {w})")
                break
        for c in (C // 2, C // 4):
            if c >= 128 and need(mode, W, c) <= avail:
                out.append(f"a smaller prefill chunk (--chunk-size {c})")
                break
    from .quantize import quantization_of
    if model.device.type == "cuda" and quantization_of(model.hf) == "none":
        out.append("4-bit weights (--quantization nf4) to free memory for the context")
    return out


def check_memory(model, state: SequenceState, n_tokens: int, max_new_tokens: int = 0,
                 chunk_size: int | None = None, fresh: bool = False) -> MemoryPlan:
    """Raise AHNMemoryError (with what fits instead) when feeding n_tokens into state (fresh: into a new copy of
    it) will not fit."""
    plan = plan_memory(model, state.spec.mode, n_tokens, max_new_tokens, state, chunk_size, fresh)
    if not plan.fits:
        raise AHNMemoryError(plan.message())
    return plan


def max_tokens(model, mode: str, chunk_size: int | None = None) -> float:
    """Largest context the device could hold in `mode` now (inf for the bounded modes when they fit at all)."""
    avail = available_to(model)
    C = chunk_size or model.config.chunk_size
    if mode != "full":
        return math.inf if plan_memory(model, mode, 10 ** 9, 0, None, C).fits else 0
    per = state_bytes(model, "full", 1) - state_bytes(model, "full", 0)
    return max(0, int((avail - MARGIN - chunk_workspace(model, "full", C, 0)) // per))
