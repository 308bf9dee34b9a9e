"""Where prefill time goes (GPU): times one long prefill, then profiles one steady-state prefill chunk with
torch.profiler (CUDA kernel time by kernel). Decode has its own script (profile_decode.py). A script.

    python bench/profile_prefill.py --config qwen2.5-3b --quant nf4 --length 131072 --chunks 4096
    python bench/profile_prefill.py --length 128k --cold      # first-use cost in a fresh process
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from suite import build, lengths  # noqa: E402

from ahn_runtime import RuntimeConfig  # noqa: E402


def _wrap(owner, attr, label):
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def inner(*args, **kw):
        with torch.profiler.record_function("part:" + label):
            return fn(*args, **kw)
    setattr(owner, attr, inner)
    return inner


def annotate():
    """Wrap the runtime's pieces in record_function ranges (this process only)."""
    from ahn_runtime import model as M, pieces
    from ahn_runtime.kernels import attention as A, recurrent as R
    from ahn_runtime.memory import delta
    _wrap(M, "window_attention", "layer.attention")
    _wrap(M, "rms", "rms_norm")
    for ns in (pieces.EAGER, pieces.compiled()):
        for name in ("rope", "add_norm", "silu_mul", "mem_in", "mem_add"):
            _wrap(ns, name, "piece." + name)
    _wrap(M.AHNModel, "_qkv", "layer.qkv (linears, RoPE)")
    _wrap(M.AHNModel, "_memory", "layer.memory")
    _wrap(M.AHNModel, "_tail", "layer.tail (o_proj, norms, MLP)")
    _wrap(M.AHNModel, "_store_chunk", "layer.store")
    _wrap(M.AHNModel, "_rope", "rope tables")
    _wrap(A, "_sdpa_lse", "attention.sdpa (fused kernels)")
    _wrap(A, "_edge", "attention.edge (flips, sdpa)")
    _wrap(A, "merge_parts", "attention.merge")
    _wrap(R, "_run_fla", "memory.fla (+ input copies)")
    _wrap(delta.GatedDeltaNet, "gates", "layer.gates")


def find_syncs(m, st, ids):
    """Print the distinct Python call sites of the host-device synchronisations in one chunk (eager forward)."""
    import traceback
    import warnings
    sites = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        key = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))
        sites[key] = sites.get(key, 0) + 1
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # restores showwarning
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            m.forward(st, ids, logits="none", recurring=m._shapes_recur(st, len(ids), len(ids)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"--- host syncs in one eager chunk: {sum(sites.values())} at {len(sites)} call sites")
    for key, n in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"{n:5d}x  {key}")


_CAPTURES = []


def _time_capture():
    from ahn_runtime import prefill_graph
    if getattr(prefill_graph.ChunkGraph._capture, "_timed", False):
        _CAPTURES.clear()
        return
    fn = prefill_graph.ChunkGraph._capture

    def timed(self, a):
        t = time.perf_counter()
        fn(self, a)
        _CAPTURES.append((a, time.perf_counter() - t))
    timed._timed = True
    prefill_graph.ChunkGraph._capture = timed


def print_timeline(t0, start, marks, sw):
    """One line per chunk: tokens done, host ms since the last chunk returned, GPU ms of the chunk (event to
    event; a chunk whose host part outlasts the GPU's work shows idle GPU time as a gap)."""
    print(f"--- timeline (S + W = {sw}); captures (position, host s): "
          f"{[(p, round(t, 3)) for p, t in _CAPTURES]}")
    prev_h, prev_e, prev_done = t0, start, 0
    for done, h, e in marks:
        print(f"{prev_done:>9,} -> {done:>9,}: host {1e3 * (h - prev_h):7.1f} ms, GPU {prev_e.elapsed_time(e):7.1f} ms,"
              f" GPU done at {start.elapsed_time(e):8.1f} ms, host at {1e3 * (h - t0):8.1f} ms")
        prev_h, prev_e, prev_done = h, e, done


def by_part(prof, attr: str):
    """(piece, [inclusive time in us by `attr`, calls]) of annotate()'s ranges in a profile, largest first."""
    parts = {}
    for e in prof.events():
        if e.name.startswith("part:"):
            d = parts.setdefault(e.name[5:], [0.0, 0])
            d[0] += getattr(e, attr)
            d[1] += 1
    return sorted(parts.items(), key=lambda kv: -kv[1][0])


def host_profile(m, st, ids, rows):
    """Where the host time of one eager forward of len(ids) tokens goes (after two unprofiled runs of the same
    shape on copies of the state)."""
    from torch.profiler import ProfilerActivity, profile
    n = int(ids.numel())
    for _ in range(2):
        m.forward(st.clone(), ids, logits="last")
    torch.cuda.synchronize()
    c = st.clone()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    m.forward(c, ids, logits="last")
    launch = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    c = st.clone()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m.forward(c, ids, logits="last")
        torch.cuda.synchronize()
    print(f"--- host profile: eager forward of {n} tokens: {launch * 1e3:.1f} ms until the last launch returned, "
          f"{wall * 1e3:.1f} ms wall (unprofiled)")
    for name, (us, k) in by_part(prof, "cpu_time_total"):
        print(f"{us / 1e3:9.2f} ms {k:6d}x  {name}")
    print("--- by operator (self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="qwen2.5-3b")
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--length", default="128k")
    ap.add_argument("--chunks", default="4096")
    ap.add_argument("--window", type=int, default=32640)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--mode", default="ahn")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--cold", action="store_true",
                    help="first time prefills in this fresh process, before any warm-up: one chunk, then S+W+3C "
                         "tokens (the first with full chunks leaving the window) twice, then the whole length twice; "
                         "then stop")
    ap.add_argument("--no-profile", action="store_true", help="only time the prefill")
    ap.add_argument("--parts", action="store_true",
                    help="also attribute the profiled chunk's kernel time to the pieces of a layer (record_function "
                         "ranges around the runtime's functions; inclusive times, pieces nest)")
    ap.add_argument("--find-syncs", action="store_true",
                    help="run one steady-state chunk with torch.cuda.set_sync_debug_mode('warn') and print where "
                         "each host-device synchronisation comes from (the Python frames)")
    ap.add_argument("--timeline", action="store_true",
                    help="print one line per chunk of the timed prefill: when the host returned from it and how "
                         "long the GPU took for it (CUDA events), and the graph capture's host time")
    ap.add_argument("--host", default="",
                    help="comma list of token counts: after the timed prefill, profile the host (CPU) side of an eager "
                         "forward of that many tokens appended to a copy of the state (a question; a partial chunk), "
                         "by piece of the runtime (with --parts) and by operator")
    ap.add_argument("--warm-up", action="store_true", help="with --cold: time AHNModel.warm_up() first (as the app "
                                                           "does at load)")
    a = ap.parse_args()
    L = lengths(a.length)[0]
    if a.parts:
        annotate()
    model = build(a.config, a.quant, RuntimeConfig(window=a.window, sinks=a.sinks))
    ids = torch.randint(0, model.vocab_size, (L,), device="cuda")
    if a.cold:
        C = int(a.chunks.split(",")[0])
        m = model.with_config(RuntimeConfig(window=a.window, sinks=a.sinks, chunk_size=C))
        if a.warm_up:
            t0 = time.perf_counter()
            ran = m.warm_up()
            print(f"cold-process warm_up (ran: {ran}): {time.perf_counter() - t0:.2f} s", flush=True)
        for n in (min(L, C),) + (a.sinks + a.window + 3 * C,) * 2 + (L,) * 2:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.prefill(m.new_state(a.mode), ids[:n])
            torch.cuda.synchronize()
            print(f"cold-process prefill {a.mode} {n} tokens: {time.perf_counter() - t0:.2f} s", flush=True)
        return
    for C in map(int, a.chunks.split(",")):
        m = model.with_config(RuntimeConfig(window=a.window, sinks=a.sinks, chunk_size=C))
        m.prefill(m.new_state(a.mode), ids[:a.sinks + a.window + 3 * C])  # warm-up / autotune
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        st = m.new_state(a.mode)
        marks = []
        if a.timeline:
            _time_capture()

            def progress(done, total):
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                marks.append((done, time.perf_counter(), e))
        t0 = time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        out = m.prefill(st, ids, progress=progress if a.timeline else None)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if a.timeline:
            print_timeline(t0, start, marks, a.sinks + a.window)
        peak = torch.cuda.max_memory_allocated() / 2**30  # before the check below (its temporaries are large)
        finite = bool(torch.isfinite(out).all() and torch.isfinite(st.k[:, :, :st.n_slots]).all())
        print(f"prefill {a.mode} {L} tokens chunk {C}: {dt:.2f} s ({L / dt:,.0f} tok/s), peak "
              f"{peak:.2f} GiB; steady chunks (all, from the CUDA graph): "
              f"{m.last_prefill_graph}; logits and cache finite: {finite}", flush=True)
        if a.find_syncs:
            find_syncs(m, st, ids[:C])
        for n in (int(x) for x in a.host.split(",") if x.strip()):
            host_profile(m, st, ids[:n], a.rows)
        if a.no_profile:
            del st
            continue
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        # the state is past the window: a steady-state chunk (under full attention, one more chunk)
        m.forward(st, ids[:C], logits="none", recurring=m._shapes_recur(st, C, C))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            m.forward(st, ids[:C], logits="none", recurring=m._shapes_recur(st, C, C))
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        m.forward(st, ids[:C], logits="none", recurring=m._shapes_recur(st, C, C))
        cpu = time.perf_counter() - t0  # Python + launch time (the GPU may still be running)
        torch.cuda.synchronize()
        print(f"one chunk unprofiled: {(time.perf_counter() - t0) * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms until the "
              "last launch returned")
        by_name = {}
        for e in prof.events():
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
                d = by_name.setdefault(e.name, [0.0, 0])
                d[0] += e.time_range.elapsed_us()
                d[1] += 1
        total = sum(v[0] for v in by_name.values())
        print(f"--- one steady-state prefill chunk of {C} tokens: {total / 1e3:.1f} ms of kernel time, "
              f"{sum(v[1] for v in by_name.values())} kernels, {wall * 1e3:.1f} ms wall (profiled)")
        for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:a.rows]:
            print(f"{us / 1e3:9.2f} ms {n:6d}x {us / total:6.1%}  {name[:110]}")
        if a.parts:
            print("--- the same chunk by piece (inclusive kernel time; pieces nest, see annotate())")
            for name, (us, n) in by_part(prof, "device_time_total"):
                print(f"{us / 1e3:9.2f} ms {n:6d}x {us / total:6.1%}  {name}")
        del st


if __name__ == "__main__":
    main()
