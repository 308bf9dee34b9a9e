"""Steady-state prefill chunks replayed from a CUDA graph, kept across prefills.

Once the sinks and the window are full, every prefill chunk of C tokens (C <= W) has the same shapes and touches
the same buffer offsets: the sinks are slots [0, S), the window [S, S + W); the chunk writes the window's oldest C
tokens into the memory (in place), shifts the window by C and appends its own keys. Only the token ids and their
positions change. A 3B chunk launches about 3,000 kernels, and the Python loop needs about as long to launch them
as the GPU needs to run them (on an H200 at C = 6144: 208 ms against 164 ms of kernels), so the prefill was bound
by the CPU.

`ChunkGraph` runs the first steady chunk of a shape in the process eagerly through `AHNModel.forward` with its ids
and positions in static device buffers (that run lets the Triton autotuners, cuDNN and torch.compile settle on
this shape), captures the next one (on the per-device side stream, one thread at a time: `decode.capture_stream`),
replays it, and replays the graph for every further steady chunk. Partial chunks, chunks that need logits, the
window-filling chunks and full attention run eagerly. AHN_PREFILL_GRAPH=0 turns it off; a capture that fails
leaves the prefill eager.

A captured graph addresses the state's buffers. When a prefill ends, its graph is kept on the model (the last
`KEEP` of them) under those addresses, and a later prefill whose state lands on the same memory (a state is one
allocation, `SequenceState._alloc`, and the caching allocator hands a freed block back to the next request of
its size: the next document's state usually gets the last one's memory) replays it from its first steady chunk
on. Capturing leaves the GPU idle while Python records the chunk's kernels (on an H200, 3B at C = 6144: 0.25 s
of every 128k-token prefill). A kept graph holds its memory pool (about one chunk's activations); `held_bytes`
reports it to the memory planner, which counts it as used and drops the kept graphs (`drop`) when a prefill
would not fit otherwise.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref

import torch

from .state import SequenceState

log = logging.getLogger(__name__)
_SEEN: set = set()  # (model, state spec, chunk, capacity) of steady chunks already run eagerly in this process
KEEP = 2  # graphs kept per model between prefills (two sessions, or a document and its comparison in another mode)
_LOCK = threading.Lock()
_KEPT: "weakref.WeakSet[_Captured]" = weakref.WeakSet()  # every kept or running graph (for held_bytes)
_MODELS: weakref.WeakSet = weakref.WeakSet()  # models that kept graphs (for drop)


class _Captured:
    """A captured steady chunk: the graph, the static ids/positions it reads, the buffers it addresses."""

    def __init__(self, graph, ids, pos, key, pool_bytes: int, device):
        self.graph, self.ids, self.pos, self.key = graph, ids, pos, key
        self.pool_bytes, self.device = int(pool_bytes), device


def held_bytes(device: torch.device) -> int:
    """Device memory held by kept prefill graphs' pools (not usable by other allocations)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _LOCK:
        return sum(c.pool_bytes for c in list(_KEPT) if (c.device.index or 0) == (idx or 0))


def drop() -> bool:
    """Drop every model's kept prefill graphs and return their memory to the device (the planner calls this
    when a prefill would not fit with them held). Whether any was dropped."""
    with _LOCK:
        had = False
        for model in list(_MODELS):
            kept = model.prefill_graphs
            had = had or bool(kept)
            for c in kept.values():
                _KEPT.discard(c)
            kept.clear()
    if had:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return had


class ChunkGraph:
    def __init__(self, model, state: SequenceState, C: int):
        self.model, self.state, self.C = model, state, int(C)
        dev = model.device
        self.ids = torch.zeros(self.C, dtype=torch.long, device=dev)
        self.pos = torch.zeros(self.C, dtype=torch.long, device=dev)
        self.ar = torch.arange(self.C, dtype=torch.long, device=dev)
        self.cap: _Captured | None = None
        self.looked = False  # for a kept graph
        self.runs = 0  # steady chunks processed (eagerly or replayed)
        self.replays = 0
        self.reused = False  # a kept graph of an earlier prefill served this one
        self.failed = False

    @staticmethod
    def enabled(model) -> bool:
        return model.device.type == "cuda" and os.environ.get("AHN_PREFILL_GRAPH", "1") != "0"

    def _buffers(self):
        st = self.state
        mem = () if st.memory is None else (st.memory.data_ptr(),)
        return (self._shape(), st.k.data_ptr(), st.v.data_ptr(), *mem,
                *(g.data_ptr() for g in st.gates.values()))

    def applies(self, T: int, logits: str) -> bool:
        """Whether a chunk of T tokens at the state's position is a steady chunk this graph can run."""
        st = self.state
        S, W = st.spec.sinks, st.spec.window
        return (not self.failed and T == self.C and logits == "none" and W is not None and self.C <= W
                and st.rot == 0 and st.pos >= S + W and st.capacity >= S + W)

    def run(self, ids: torch.Tensor) -> None:
        """Process one steady chunk: ids [C]."""
        st, m = self.state, self.model
        a = st.pos
        if not self.looked:  # a graph an earlier prefill captured on these very buffers
            self.looked = True
            with _LOCK:
                self.cap = _kept(m).pop(self._buffers(), None)
            self.reused = self.cap is not None
        c = self.cap
        if c is not None and c.key == self._buffers():
            c.ids.copy_(ids, non_blocking=True)
            torch.add(self.ar, a, out=c.pos)
            c.graph.replay()
            st.pos = a + self.C
            self.replays += 1
        elif (self.runs == 0 and self._shape() not in _SEEN) or c is not None:
            # the first steady chunk of this shape in the process (kernels still choose their configs), or the
            # buffers moved: eagerly
            self.close(keep=False)
            self.ids.copy_(ids, non_blocking=True)
            torch.add(self.ar, a, out=self.pos)
            m.forward(st, self.ids, logits="none", positions=self.pos, recurring=True)
            _SEEN.add(self._shape())
        else:
            self.ids.copy_(ids, non_blocking=True)
            torch.add(self.ar, a, out=self.pos)
            self._capture(a)
        self.runs += 1

    def _shape(self):
        st = self.state
        return (id(self.model.hf), st.spec, self.C, st.capacity)

    def _capture(self, a: int) -> None:
        from .decode import capture_stream
        st, m = self.state, self.model
        g = torch.cuda.CUDAGraph()
        before = torch.cuda.memory_reserved(m.device)
        with capture_stream(m.device) as s:
            s.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
                    m.forward(st, self.ids, logits="none", positions=self.pos, recurring=True)
                err = None
            except torch.OutOfMemoryError:
                st.pos = a
                raise
            except Exception as e:  # noqa: BLE001  a kernel that cannot be captured: this prefill stays eager
                err = e
            torch.cuda.current_stream().wait_stream(s)
        st.pos = a  # capturing ran no kernel
        if err is not None:
            log.warning("capturing the prefill chunk as a CUDA graph failed (%s); prefilling without a graph", err)
            self.failed = True
            m.forward(st, self.ids, logits="none", positions=self.pos, recurring=True)
            return
        pool = max(0, torch.cuda.memory_reserved(m.device) - before)
        self.cap = _Captured(g, self.ids, self.pos, self._buffers(), pool, m.device)
        with _LOCK:
            _KEPT.add(self.cap)
        g.replay()
        st.pos = a + self.C
        self.replays += 1

    def close(self, keep: bool = True) -> None:
        """End of the prefill (keep: the graph stays on the model for a later prefill on the same buffers) or
        the buffers moved (drop it: its memory pool returns to the allocator)."""
        c, self.cap = self.cap, None
        if c is None:
            return
        with _LOCK:
            if not keep or self.failed:
                _KEPT.discard(c)
                return
            kept = _kept(self.model)
            kept[c.key] = c
            while len(kept) > KEEP:
                _KEPT.discard(kept.pop(next(iter(kept))))


def _kept(model) -> dict:
    _MODELS.add(model)
    return model.prefill_graphs
