"""Per-sequence state: sink KV, window KV (ring buffer), cached write gates, memory states, absolute position.

Buffers hold every layer at once. Slot layout per layer: [sinks: slots 0..S) [window: slots S..S+W)].
Window token p (p >= S) lives at slot S + (p - w0 + rot) mod W where w0 is the oldest token still in the window.
Prefill keeps rot = 0 (positions sorted, so key ranges are contiguous); decode writes in place of the token that
leaves the window and advances rot. `full` mode is the same object with no sinks and an unbounded window.

    k, v:   [L, Hkv, capacity, D]   model dtype
    gates:  {name: [L, capacity, H]} model dtype (raw per-token gate values of the memory variant)
    memory: [L, H, D, D] float32    (ahn mode; zeros until the first token is compressed)
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

MODES = ("ahn", "window", "full")


@dataclass(frozen=True)
class StateSpec:
    """Geometry of a state; equal specs mean interchangeable states."""
    mode: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    window: int | None  # None = unbounded (full attention)
    sinks: int
    gate_names: tuple[str, ...] = ()
    dtype: str = "float32"
    model_id: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def has_memory(self) -> bool:
        return self.mode == "ahn"

    @property
    def max_slots(self) -> float:
        return math.inf if self.window is None else self.sinks + self.window


@dataclass
class SequenceState:
    spec: StateSpec
    device: torch.device
    pos: int = 0
    rot: int = 0
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    memory: torch.Tensor | None = None

    def __post_init__(self):
        if self.k is None:
            self._alloc(0, self.memory)
        if self.spec.has_memory and self.memory is None:
            s = self.spec
            self.memory = torch.zeros(s.n_layers, s.n_heads, s.head_dim, s.head_dim, dtype=torch.float32,
                                      device=self.device)

    # ---- geometry (pure integers) -------------------------------------------------------------------------
    @property
    def window(self) -> float:
        return math.inf if self.spec.window is None else self.spec.window

    @property
    def n_sink(self) -> int:
        return min(self.spec.sinks, self.pos)

    @property
    def win_len(self) -> int:
        return int(min(self.window, max(0, self.pos - self.spec.sinks)))

    @property
    def w0(self) -> int:
        """Position of the oldest token in the window."""
        return self.pos - self.win_len

    @property
    def n_slots(self) -> int:
        return self.n_sink + self.win_len

    @property
    def compressed(self) -> int:
        """Tokens written into the memory so far (ahn) or dropped (window)."""
        return self.pos - self.n_slots

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def slot(self, p: int) -> int:
        S = self.spec.sinks
        if p < S:
            return p
        if self.spec.window is None:
            return p
        return S + (p - self.w0 + self.rot) % self.spec.window

    def positions(self) -> torch.Tensor:
        """Absolute position of every valid slot, [n_slots] (slot order)."""
        S, n = self.spec.sinks, self.win_len
        win = torch.arange(self.w0, self.w0 + n)
        if n and self.rot:
            win = torch.roll(win, self.rot)
        return torch.cat([torch.arange(self.n_sink), win])

    # ---- storage ------------------------------------------------------------------------------------------
    def _alloc(self, cap: int, memory: torch.Tensor | None = None):
        """New zeroed buffers of `cap` slots, all in ONE allocation: k, v, the gates and (ahn) the memory, which
        gets `memory`'s values (zeros when None). One block per state matters on CUDA: a captured decode
        step addresses its state's buffers, and an answer's fresh state reuses one only when it lands on the
        same memory (`decode.StaticDecoder.for_state`). The caching allocator hands
        a freed block back to the next request of its size, but among several freed blocks of one size (k and
        v, the gates, a memory the size of a gate buffer) it picks by address, so separately allocated buffers
        came back permuted (on an H200 every answer of bench/question_ttft.py captured again)."""
        s = self.spec
        dt = s.torch_dtype
        shapes = [("k", dt, (s.n_layers, s.n_kv_heads, cap, s.head_dim)),
                  ("v", dt, (s.n_layers, s.n_kv_heads, cap, s.head_dim))]
        shapes += [("gate." + g, dt, (s.n_layers, cap, s.n_heads)) for g in s.gate_names]
        if s.has_memory:
            shapes.append(("memory", torch.float32, (s.n_layers, s.n_heads, s.head_dim, s.head_dim)))
        offs, total = [], 0
        for _, d, shape in shapes:
            offs.append(total)
            total += -(-math.prod(shape) * d.itemsize // 256) * 256
        # ordinary tensors even when made under inference_mode (the warm-up, a prefill's resize): the compiled
        # pieces guard on the inputs' dispatch keys, and a state of the other kind cost the first question after
        # warm_up() a recompile of the memory pieces and its answer one of the decode step's (1.2 s and 0.2 s on an
        # H200, docs/bench/question_ttft_recompiles_2026-11-29.txt)
        with torch.inference_mode(False):
            buf = torch.zeros(total, dtype=torch.uint8, device=self.device)
            views = {name: buf[o:o + math.prod(shape) * d.itemsize].view(d).view(shape)
                     for (name, d, shape), o in zip(shapes, offs)}
            if s.has_memory and memory is not None:
                views["memory"].copy_(memory)
        self.k, self.v = views["k"], views["v"]
        self.gates = {g: views["gate." + g] for g in s.gate_names}
        if s.has_memory:
            self.memory = views["memory"]

    def reserve(self, n_tokens: int, exact: bool = False) -> None:
        """Make room for the slots needed after n_tokens more tokens (bounded by S + W)."""
        need = int(min(self.spec.max_slots, self.n_slots + n_tokens))
        cap = self.capacity
        if need <= cap:
            return
        # exact for a known prompt; otherwise grow by 1/8 (bounded transient copy for long full-attention caches)
        self.resize(need if exact else int(min(self.spec.max_slots, max(need, cap + max(256, cap // 8)))))

    def resize(self, cap: int) -> None:
        """Reallocate the buffers to exactly `cap` slots (>= n_slots), keeping the valid ones."""
        old = SequenceState(self.spec, self.device, self.pos, self.rot, self.k, self.v, self.gates, self.memory)
        self._alloc(cap, self.memory)
        self._copy_slots(old)

    def _copy_slots(self, src: "SequenceState") -> None:
        """The valid KV and gate slots of src (same geometry) into these buffers."""
        n = src.n_slots
        self.k[:, :, :n] = src.k[:, :, :n]
        self.v[:, :, :n] = src.v[:, :, :n]
        for g in self.gates:
            self.gates[g][:, :n] = src.gates[g][:, :n]

    def release(self) -> None:
        """Drop every buffer and token (after a failed prefill): the state is empty afterwards."""
        self.pos, self.rot = 0, 0
        self.memory = None
        self._alloc(0)

    def linearize(self) -> None:
        """Undo decode-time ring rotation so window slots are sorted by position."""
        if self.rot == 0:
            return
        S, n = self.spec.sinks, self.win_len
        sl = slice(S, S + n)
        self.k[:, :, sl] = torch.roll(self.k[:, :, sl], -self.rot, dims=2)
        self.v[:, :, sl] = torch.roll(self.v[:, :, sl], -self.rot, dims=2)
        for g in self.gates.values():
            g[:, sl] = torch.roll(g[:, sl], -self.rot, dims=1)
        self.rot = 0

    # ---- accounting, copies, files ------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        """Allocated bytes by part."""
        s = self.spec
        kv_slot = 2 * s.n_layers * s.n_kv_heads * s.head_dim * self.k.element_size()
        gate_slot = sum(s.n_layers * s.n_heads * g.element_size() for g in self.gates.values())
        sink_slots = min(s.sinks, self.capacity)
        win_slots = self.capacity - sink_slots
        parts = {
            "sinks_kv": kv_slot * sink_slots,
            "window_kv": kv_slot * win_slots,
            "gates": gate_slot * self.capacity,
            "memory": 0 if self.memory is None else self.memory.element_size() * self.memory.numel(),
        }
        parts["total"] = sum(parts.values())
        return parts

    def clone(self, capacity: int | None = None) -> "SequenceState":
        """A copy with `capacity` slots (default: the same; at least n_slots), its buffers in one allocation (see
        `_alloc`). Only the valid slots are copied."""
        cap = self.capacity if capacity is None else int(capacity)
        if cap < self.n_slots:
            raise ValueError(f"a copy needs at least the {self.n_slots} slots in use (asked for {cap})")
        st = SequenceState(self.spec, self.device, self.pos, self.rot, k=self.k, v=self.v, gates=self.gates,
                           memory=self.memory)
        st._alloc(cap, self.memory)
        st._copy_slots(self)
        return st

    def save(self, path: str) -> None:
        n = self.n_slots
        tensors = {"k": self.k[:, :, :n].contiguous(), "v": self.v[:, :, :n].contiguous()}
        tensors.update({f"gate.{g}": t[:, :n].contiguous() for g, t in self.gates.items()})
        if self.memory is not None:
            tensors["memory"] = self.memory.contiguous()
        meta = {"spec": json.dumps(asdict(self.spec)), "pos": str(self.pos), "rot": str(self.rot),
                "format": "ahn-state-1"}
        save_file({k: t.cpu() for k, t in tensors.items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu", expect: StateSpec | None = None) -> "SequenceState":
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "ahn-state-1":
            raise ValueError(f"{path} is not a saved AHN runtime state")
        d = json.loads(meta["spec"])
        d["gate_names"] = tuple(d["gate_names"])
        spec = StateSpec(**d)
        if expect is not None and spec != expect:
            raise ValueError(f"saved state does not match this model/configuration: {spec} != {expect}")
        t = load_file(path, device=str(device))
        st = cls(spec, torch.device(device), int(meta["pos"]), int(meta["rot"]), t["k"], t["v"],
                 {g: t[f"gate.{g}"] for g in spec.gate_names}, t.get("memory"))
        return st
