"""Steady-state prefill chunks replayed from one CUDA graph.

Once the sinks and the window are full, every prefill chunk of C tokens (C <= W) has the same shapes and touches
the same buffer offsets: the sinks are slots [0, S), the window [S, S + W); the chunk writes the window's oldest C
tokens into the memory (in place), shifts the window by C and appends its own keys. Only the token ids and their
positions change. A 3B chunk launches about 3,000 kernels, and the Python loop needs about as long to launch them
as the GPU needs to run them (on an H200 at C = 6144: 208 ms against 164 ms of kernels), so the prefill was bound
by the CPU.

`ChunkGraph` runs the first steady chunk eagerly through `AHNModel.forward` with its ids and positions in static
device buffers (that run also lets the Triton autotuners, cuDNN and torch.compile settle on this shape; later
prefills of the same shape in the process skip it), captures the next one (on the per-device side stream, one
thread at a time: `decode.capture_stream`), replays it, and replays the graph for every further steady chunk. Partial chunks, chunks that
need logits, the window-filling chunks and full attention run eagerly. The graph and its memory pool live for one
prefill (`close`). AHN_PREFILL_GRAPH=0 turns it off; a capture that fails leaves the prefill eager.
"""
from __future__ import annotations

import logging
import os

import torch

from .state import SequenceState

log = logging.getLogger(__name__)
_SEEN: set = set()  # (model, state spec, chunk, capacity) of steady chunks already run eagerly in this process


class ChunkGraph:
    def __init__(self, model, state: SequenceState, C: int):
        self.model, self.state, self.C = model, state, int(C)
        dev = model.device
        self.ids = torch.zeros(self.C, dtype=torch.long, device=dev)
        self.pos = torch.zeros(self.C, dtype=torch.long, device=dev)
        self.ar = torch.arange(self.C, dtype=torch.long, device=dev)
        self.graph = None
        self.key = None
        self.runs = 0  # steady chunks processed (eagerly or replayed)
        self.replays = 0
        self.failed = False

    @staticmethod
    def enabled(model) -> bool:
        return model.device.type == "cuda" and os.environ.get("AHN_PREFILL_GRAPH", "1") != "0"

    def _buffers(self):
        st = self.state
        mem = () if st.memory is None else (st.memory.data_ptr(),)
        return (st.k.data_ptr(), st.v.data_ptr(), st.capacity, *mem, *(g.data_ptr() for g in st.gates.values()))

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
        self.ids.copy_(ids, non_blocking=True)
        torch.add(self.ar, a, out=self.pos)
        if self.graph is not None and self.key == self._buffers():
            self.graph.replay()
            st.pos = a + self.C
            self.replays += 1
        elif (self.runs == 0 and self._shape() not in _SEEN) or self.graph is not None:
            # the first steady chunk of this shape in the process (kernels still choose their configs), or the
            # buffers moved: eagerly
            self.close()
            m.forward(st, self.ids, logits="none", positions=self.pos, recurring=True)
            _SEEN.add(self._shape())
        else:
            self._capture(a)
        self.runs += 1

    def _shape(self):
        st = self.state
        return (id(self.model.hf), st.spec, self.C, st.capacity)

    def _capture(self, a: int) -> None:
        from .decode import capture_stream
        st, m = self.state, self.model
        g = torch.cuda.CUDAGraph()
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
        self.graph, self.key = g, self._buffers()
        g.replay()
        st.pos = a + self.C
        self.replays += 1

    def close(self) -> None:
        """Drop the graph (its memory pool returns to the allocator)."""
        self.graph = None
        self.key = None
