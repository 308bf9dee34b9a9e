"""Fixed-shape decode step, captured once as a CUDA graph and replayed for every token.

`AHNModel.step` slices the cache to the valid slots and branches in Python on whether a token leaves the window,
so its shapes and kernels change from token to token, and a decode step of a 3B model costs ~2,000 kernel
launches. `StaticDecoder` computes the same step with shapes fixed for a whole answer:

    - the state's buffers are reserved once for the answer (capacity rounded up to a multiple of `SPLIT`,
      plus at least one scratch slot that is never attended);
    - the position, the slot written and whether a token leaves the window live in small device tensors;
    - attention covers the whole buffer with a -inf bias on empty slots (`static_decode_attention`; on CUDA the
      two Triton flash-decoding kernels of `kernels/decode_attention.py`);
    - as in `step`, the token leaving the window (its cached K, V and gates, gathered from the slot about to be
      overwritten) is written into every layer's memory at once, before the layers run, as one update over
      L x H states, in place; that update always runs, on zeroed inputs when no token left the window (which
      leaves the state exactly as it was); each layer then only reads its memory, and adds the read only when a
      token left the window;
    - the memory's small projections of the token (write gates and output gate) run as one GEMV per layer
      (`decode_proj`);
    - between the linears, the elementwise work is a few fused pieces: RoPE of q and k, the residual add with
      the next RMSNorm, the MLP's SiLU * up, the memory read with its add.

On CUDA the step is captured into a CUDA graph (after two warm-up runs that write only the scratch slot) and
replayed; elsewhere the same fixed-shape step runs eagerly (used by the CPU tests to check it against `step`).
Before capture, those pieces and the batched memory write (plain PyTorch recurrence) are compiled with
torch.compile into fused kernels (one compiled read serves every layer: the layer's memory module is an
argument, and its parameters are graph inputs, not constants); AHN_COMPILE=0 or a failed compile leaves them
eager (and the attention the PyTorch reference); AHN_DECODE_ATTENTION=torch keeps the compiled reference attention.
Decode with the official code's exclusion quirk (`official128`) is not supported here; `AHNModel.decoder` then
returns the plain eager stepper.

A model keeps its last few decoders, keyed by the state buffers they address (`StaticDecoder.for_state`): an
answer whose state lands on a previous answer's buffers (in a chat, each answer's fresh copy of the document state
usually gets the memory the previous copy freed) reuses that captured graph instead of capturing again. A kept
decoder refers to its state weakly, so it never keeps an answer alive.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import weakref
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .kernels import decode_attention
from .kernels.attention import static_decode_attention
from .memory.base import stack_write_params, write_layers
from .model import rms
from .pieces import add_norm, apply_rope, silu_mul
from .state import SequenceState

SPLIT = 512
log = logging.getLogger(__name__)


class EagerDecoder:
    """The plain per-token step (`AHNModel.step`), behind the decoder interface."""
    graphed = False

    def __init__(self, model, state: SequenceState):
        self.model, self.state = model, state

    def __call__(self, token: int) -> torch.Tensor:
        return self.model.step(self.state, token)[-1]


class StaticDecoder:
    """Decode up to `max_tokens` tokens into `state` with fixed shapes; `graph` None = CUDA graph on CUDA.
    Calling it with a token feeds that token and returns the next logits [V] float32 (a view into a static
    buffer on CUDA: read it before the next call). Past `max_tokens`, it falls back to the eager step."""

    def __init__(self, model, state: SequenceState, max_tokens: int, graph: bool | None = None):
        if model.config.decode_exclusion != "consistent" and state.spec.window is not None:
            raise ValueError("the static decoder implements the consistent decode semantics only")
        with torch.inference_mode(False):  # ordinary tensors wherever made (see SequenceState._alloc)
            self._init(model, state, max_tokens, graph)

    def _init(self, model, state: SequenceState, max_tokens: int, graph: bool | None):
        self.model = model
        _fit(state, max_tokens)
        self._state = weakref.ref(state)  # not owned: a decoder kept for reuse must not keep its answer alive
        dev = model.device
        self.cap = state.capacity
        self.scratch = self.cap - 1
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.evict = torch.zeros((), dtype=torch.bool, device=dev)
        self.keep = torch.zeros((), dtype=model.dtype, device=dev)  # 1.0 when a token left the window
        self.bias = torch.full((self.cap,), float("-inf"), dtype=torch.float32, device=dev)
        self.bias[:state.n_slots] = 0.0
        self._ptr = state.k.data_ptr()
        self.graphed = dev.type == "cuda" if graph is None else graph
        self.graph = None
        self.out = None
        self._eager_pieces()
        if state.spec.has_memory:  # every layer's write parameters stacked once ([L, H]; fixed for the answer)
            with torch.no_grad():
                self._wparams = stack_write_params(model.memories)
                self._proj = [mod.decode_proj() for mod in model.memories]  # [P, h] per layer: one GEMV
            self._wcls = type(model.memories[0])
        self.compiled = False
        if self.graphed and os.environ.get("AHN_COMPILE", "1") != "0":
            self._set_pieces(_compiled())
            self.compiled = True

    @classmethod
    def for_state(cls, model, state: SequenceState, max_tokens: int, graph: bool | None = None) -> "StaticDecoder":
        """A decoder for `state`: one of the model's recent decoders whose CUDA graph was captured on these very
        buffers (same addresses, shapes and strides: everything the graph addresses), rebound to `state`, or a
        new one. In a chat every answer decodes into a fresh copy of the same document state, whose buffers have
        the same sizes once the window is full; when the previous answer's copy has been freed, the allocator
        usually hands them the same memory, and the answer skips the capture (on an H200, 170-256 ms before its
        second token with a 3B model, bench/question_ttft.py)."""
        _fit(state, max_tokens)
        key = _buffers_key(state)
        cache = model.decoders
        with _DECODERS_LOCK:  # two chat sessions run in two threads
            d = cache.pop(key, None)
        want_graph = model.device.type == "cuda" if graph is None else graph
        if d is not None and d.graphed == want_graph and (d.graph is not None or not d.graphed):
            d._rebind(state)  # a captured step (or, without a graph, the same step run eagerly)
        else:
            d = cls(model, state, max_tokens, graph)
        with _DECODERS_LOCK:
            cache[key] = d  # most recent last
            while len(cache) > _KEEP_DECODERS:
                cache.pop(next(iter(cache)))
        return d

    @property
    def state(self) -> SequenceState:
        st = self._state()
        if st is None:
            raise RuntimeError("this decoder's state was freed")
        return st

    def _rebind(self, state: SequenceState):
        """Decode into `state`, whose buffers are the ones the graph was captured on (`for_state`)."""
        self._state = weakref.ref(state)
        self._ptr = state.k.data_ptr()
        self.bias.fill_(float("-inf"))
        self.bias[:state.n_slots] = 0.0

    def _eager_pieces(self):
        self._set_pieces(_PIECES)

    def _set_pieces(self, fns):
        self._write_fn, self._attn_fn, self._read_fn, self._rope_fn, norm_fn, glu_fn = fns
        self._P = SimpleNamespace(add_norm=norm_fn, silu_mul=glu_fn)

    # ---- the fixed-shape step -----------------------------------------------------------------------------
    def _step(self) -> torch.Tensor:
        m, st = self.model, self.state
        mem = st.spec.has_memory
        G = m.n_heads // m.n_kv_heads
        if mem:  # gathered outside the compiled write: the buffers' slot count changes from answer to answer
            kw = st.k.index_select(2, self.slot).squeeze(2).repeat_interleave(G, dim=1)  # [L, H, D]
            vw = st.v.index_select(2, self.slot).squeeze(2).repeat_interleave(G, dim=1)
            gw = {g: t.index_select(1, self.slot).squeeze(1) for g, t in st.gates.items()}  # [L, H]
            self._write_fn(self._wcls, self._wparams, kw, vw, gw, st.memory, self.evict)
        x = m.embed(self.tok)
        cos, sin = m.rotary(x, self.pos)
        cos, sin = cos[0], sin[0]
        layers = m.layers
        xn = rms(layers[0].input_layernorm, x)
        for l, layer in enumerate(layers):
            q, k, v = m._qkv(layer, xn, cos, sin, rope=self._rope_fn)
            K, V = st.k[l], st.v[l]
            K.index_copy_(1, self.slot, k.transpose(0, 1))
            V.index_copy_(1, self.slot, v.transpose(0, 1))
            if mem:
                gates, z = m.memories[l].split_proj(F.linear(xn, *self._proj[l]))
                for g in gates:
                    st.gates[g][l].index_copy_(0, self.slot, gates[g])
            o = self._attn_fn(q, K, V, self.bias, m.scale, SPLIT)
            if mem:
                o = self._read_fn(m.memories[l], o, q, xn, st.memory[l], z, self.keep)
            x, xn = m._tail(l, x, o, self._P)
        return m._logits(xn, "last")[-1]

    def _set(self, token: int, pos: int, slot: int, evict: bool):
        self.tok.fill_(int(token))
        self.pos.fill_(pos)
        self.slot.fill_(slot)
        self.evict.fill_(evict)
        self.keep.fill_(1.0 if evict else 0.0)

    def _capture(self):
        """Warm up (compile; kernels choose their configs) on the scratch slot, with the memory update discarded,
        then capture. The state's valid slots and memory are not changed."""
        self._set(0, self.state.pos, self.scratch, False)
        with capture_stream(self.model.device) as s:
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                try:
                    for _ in range(2):
                        self._step()
                except Exception as e:  # noqa: BLE001  the compiler failed: eager pieces, still graphed
                    if not self.compiled:
                        raise
                    log.warning("torch.compile of the decode step failed (%s); using the eager pieces", e)
                    self._eager_pieces()
                    self.compiled = False
                    _COMPILED.clear()
                    _COMPILED["failed"] = True
                    for _ in range(2):
                        self._step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
                self.out = self._step()
        self.graph = g

    # ---- one token ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, token: int) -> torch.Tensor:
        st = self.state
        S, W = st.spec.sinks, st.window
        t = st.pos
        if t < S:
            slot, evict = t, False
        elif st.win_len < W:
            slot, evict = S + st.win_len, False
        else:
            slot, evict = S + st.rot, True
        n_after = st.n_slots + (0 if evict else 1)
        if slot >= self.scratch or n_after > self.scratch or st.k.data_ptr() != self._ptr:
            return self.model.step(st, token)[-1]  # past the reserved answer length: eager
        if self.graphed and self.graph is None:
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001  a kernel that cannot be captured: stay eager
                log.warning("CUDA graph capture failed (%s); decoding without a graph", e)
                self.graphed = False
                torch.cuda.synchronize()
        self._set(token, t, slot, evict)
        if not evict:
            self.bias[n_after - 1:n_after].zero_()
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:
            out = self._step()
        if evict:
            st.rot = (st.rot + 1) % int(W)
        st.pos = t + 1
        return out


_KEEP_DECODERS = 4  # captured decode steps kept per model (a chat, its compare pane, another session)
_DECODERS_LOCK = threading.Lock()


def _fit(state: SequenceState, max_tokens: int) -> None:
    """Make the state's buffers what the static step needs: room for max_tokens more tokens (a multiple of SPLIT
    slots) and a contiguous memory (written in place through a [L * H, K, V] view)."""
    cap = decode_capacity(state.spec, state.n_slots, max_tokens)
    if state.capacity < cap or state.capacity % SPLIT:
        state.resize(cap)
    if state.spec.has_memory and not state.memory.is_contiguous():
        state.memory = state.memory.contiguous()


def _buffers_key(state: SequenceState) -> tuple:
    """What a captured step addresses in a state: its buffers' addresses, shapes and strides (and the spec)."""
    ts = [state.k, state.v, *state.gates.values()] + ([] if state.memory is None else [state.memory])
    return (state.spec,) + tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in ts)


def decode_capacity(spec, n_slots: int, max_tokens: int) -> int:
    """Buffer slots the static decoder needs for max_tokens more tokens: the slots then in use + a scratch slot,
    rounded up to a multiple of SPLIT. (A prefill that knows the answer length reserves this up front, so the
    decoder does not copy the buffers: that copy would briefly hold the KV cache twice.)"""
    need = int(min(spec.max_slots, n_slots + max_tokens))
    return -(-(need + 1) // SPLIT) * SPLIT


def _read_add(mod, o, q, xn, S, z, keep):
    """o [1, H, D] plus the layer's memory output read from its (already written) state S, times keep: as in
    `step`, the read is added only when a token left the window in this step. z: the output gate's projection
    of xn."""
    return o + (mod.read(q, xn, S, z) * keep).view(o.shape)


_COMPILED: dict = {}
_STREAMS: dict = {}


_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def capture_stream(device: torch.device):
    """One side stream per device for every warm-up and capture (decode and prefill), held by one thread at a
    time.
    - One per device, not one per answer: cuBLAS keeps a workspace (32 MiB on Hopper) for each stream it has run
      on, for the life of the process, so a new stream per answer would leak it.
    - One thread at a time: whatever is enqueued on a stream while it is being captured joins the capture, and
      two chat sessions run in two threads. Capture with capture_error_mode="thread_local" too, so that the other
      threads' allocations do not break it."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    with _CAPTURE_LOCK:
        if key not in _STREAMS:
            _STREAMS[key] = torch.cuda.Stream(device=device)
        yield _STREAMS[key]


_PIECES = (write_layers, static_decode_attention, _read_add, apply_rope, add_norm, silu_mul)


def _compiled():
    """The pieces of the step for the CUDA graph, made once per process: the attention as the Triton
    flash-decoding kernels (`kernels/decode_attention.py`; where they do not apply, it falls back to the reference),
    and the rest of `_PIECES` (batched memory write, memory read + add, RoPE, residual + RMSNorm, the MLP's
    activation) torch.compile'd. None depends on the layer or the model (a memory module is an argument, its
    parameters graph inputs), and the compiled ones recompile by themselves for new shapes."""
    if _COMPILED.get("failed"):
        return _PIECES
    if not _COMPILED:
        _COMPILED["fns"] = tuple(torch.compile(f, dynamic=False) for f in _PIECES)
    fns = list(_COMPILED["fns"])
    if decode_attention.triton is not None and os.environ.get("AHN_DECODE_ATTENTION", "triton") == "triton":
        fns[1] = functools.partial(decode_attention.fixed_decode_attention, reference=fns[1])
    return tuple(fns)
