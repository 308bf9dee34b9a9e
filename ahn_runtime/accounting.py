"""Memory accounting by part, for the app's live panel and the benchmarks."""
from __future__ import annotations

import os

import torch

from .model import AHNModel
from .state import SequenceState


def weight_bytes(model: AHNModel) -> dict[str, int]:
    def size(mod):
        return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))
    out = {"base_weights": size(model.hf)}
    out["ahn_weights"] = 0 if model.memories is None else size(model.memories)
    return out


def device_bytes(device: torch.device) -> dict[str, int]:
    """Allocator view: allocated / reserved / peak / total bytes of the device (CPU: process RSS / RAM)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
                "peak_allocated": torch.cuda.max_memory_allocated(device), "used": total - free, "total": total}
    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        total = 0
    return {"allocated": rss, "reserved": rss, "peak_allocated": rss, "used": rss, "total": total}


def memory_report(model: AHNModel, state: SequenceState | None = None) -> dict:
    """Bytes by part: weights, sinks KV, window KV, gate cache, AHN memory state, workspace (what the allocator
    holds beyond weights and state), allocator reserve; plus token counts of the state."""
    w = weight_bytes(model)
    s = state.nbytes() if state is not None else {"sinks_kv": 0, "window_kv": 0, "gates": 0, "memory": 0, "total": 0}
    dev = device_bytes(model.device)
    known = w["base_weights"] + w["ahn_weights"] + s["total"]
    rep = {
        "device": str(model.device),
        "weights": w["base_weights"] + w["ahn_weights"], **w,
        "sinks_kv": s["sinks_kv"], "window_kv": s["window_kv"], "gates": s["gates"], "ahn_state": s["memory"],
        "workspace": max(0, dev["allocated"] - known) if model.device.type == "cuda" else 0,
        "allocator_reserve": max(0, dev["reserved"] - dev["allocated"]),
        "device_used": dev["used"], "device_total": dev["total"], "peak_allocated": dev["peak_allocated"],
    }
    if state is not None:
        rep.update(mode=state.spec.mode, tokens=state.pos, tokens_in_attention=state.n_slots,
                   tokens_compressed=state.compressed if state.spec.mode == "ahn" else 0,
                   tokens_dropped=state.compressed if state.spec.mode == "window" else 0)
    return rep
