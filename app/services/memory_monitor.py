"""The live memory panel's numbers: device memory, the runtime's parts, token counts, and per-session time
series of memory against tokens processed (recorded during prefill and generation)."""
from __future__ import annotations

import time

from ahn_runtime.accounting import device_bytes, memory_report

from .engine_service import EngineService
from .sessions import Session


def state_bytes_in_use(state) -> int:
    """Bytes of the state that hold tokens now (slots in use + AHN memory); allocation grows in steps."""
    parts = state.nbytes()
    cap = max(1, int(state.capacity)) if hasattr(state, "capacity") else 1
    per_slot = (parts["sinks_kv"] + parts["window_kv"] + parts["gates"]) / cap
    return int(per_slot * state.n_slots + parts["memory"])


class MemoryMonitor:
    def __init__(self, engine: EngineService):
        self.engine = engine

    def sample(self, session: Session, mode: str, state) -> None:
        """Record one point (tokens processed, state bytes, device bytes used) for the plot."""
        used = device_bytes(self.engine.model.device)["used"]
        session.add_sample(mode, int(state.pos), state_bytes_in_use(state), int(used))

    def snapshot(self, session: Session | None) -> dict:
        run = session.run if session is not None else None
        state, mode, live = None, None, False
        if run is not None and run.state is not None:
            state, mode, live = run.state, run.mode, True
        elif session is not None and session.last_state_view is not None and \
                session.model_key == self.engine.model_key:  # not a state of a model loaded before
            mode, state = session.last_state_view
        rep = memory_report(self.engine.model, state)
        info = self.engine.info
        parts = {
            "weights": rep["weights"],
            "window_kv": rep["window_kv"],
            "sinks_kv": rep["sinks_kv"],
            "ahn_state": rep["ahn_state"],
            "gate_cache": rep["gates"],
            "workspace": rep["workspace"],
            "allocator_reserve": rep["allocator_reserve"],
        }
        tokens = {"processed": rep.get("tokens", 0), "in_window": rep.get("tokens_in_attention", 0),
                  "compressed": rep.get("tokens_compressed", 0), "dropped": rep.get("tokens_dropped", 0)}
        return {
            "time": time.time(),
            "device": rep["device"],
            "device_used": rep["device_used"],
            "device_total": rep["device_total"],
            "peak_allocated": rep["peak_allocated"],
            "parts": parts,
            "state_bytes": rep["sinks_kv"] + rep["window_kv"] + rep["gates"] + rep["ahn_state"],
            "tokens": tokens,
            "mode": mode,
            "live": live,
            "phase": run.phase if run is not None else "idle",
            "queue": self.engine.queue_length,  # requests using or waiting for the model (all tabs)
            "waiting": max(0, self.engine.queue_length - 1),
            "window": info.window,
            "sinks": info.sinks,
            "series": {m: [list(p) for p in pts] for m, pts in (session.series if session else {}).items()},
            "last_generation": session.last_stats if session is not None else None,
        }
