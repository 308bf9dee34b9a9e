"""Where a decode step's time goes (GPU): the graphed fixed-shape step timed, the same step profiled without the
graph (CUDA kernel time per step by kernel and by rough category, kernels per step), and the graphed step of
mode `full` (no memory) for comparison. Random weights of the real shapes, built as bench/suite.py does. A script.

    python bench/profile_decode.py --out docs/bench/profile_decode.json                  # Qwen2.5-3B nf4, 32k
    python bench/profile_decode.py --tiny --out /tmp/profile_decode.json                  # CPU smoke check

The profiled step is `StaticDecoder._step()` called again on the decoder's last token (the fixed shapes make it
the same kernels as every step; it changes the state, which is dropped afterwards). CUDA kernels are put in a
category by name (Triton kernels are the compiled memory write/read and softmax pieces); the decoder's memory
write, memory read and attention functions are also wrapped in profiler ranges, whose device time is reported
per step ("ranges_ms"). --tiny: a tiny random Qwen2 on the CPU (no quantization, no graph, CPU op self times,
categorised by the range that called them).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from suite import build, lengths  # noqa: E402

from ahn_runtime import RuntimeConfig  # noqa: E402

DEFAULTS = dict(config="qwen2.5-3b", quant="nf4", window=32640, sinks=128, length="32k", chunk=4096, device="cuda")
TINY = dict(config="tiny", quant="none", window=120, sinks=8, length="512", chunk=128, device="cpu")
SCOPES = {"ahn.memory_write": "memory write", "ahn.attention": "attention", "ahn.memory_read": "memory read"}
NAME_RULES = [  # (category, pattern) for kernels outside the scopes above, first match wins
    ("other", r"^mem(cpy|set)"),
    ("compiled (RoPE, residual + norm, activation)", r"^triton_"),  # inductor's kernels
    ("attention (Triton flash-decoding)", r"_partial_kernel|_merge_kernel"),
    ("linear (gemv, bnb 4-bit)", r"gemv|gemm|4bit|dequantize|nvjet|cutlass|xmma|aten::(addmm|mm|linear|matmul)"),
    ("rmsnorm/elementwise", r"norm|elementwise|vectorized|reduce|unrolled|index|copy|cat|fill|aten::"),
]


def category(name: str, scope: str | None) -> str:
    if scope is not None:
        return SCOPES[scope]
    for cat, pat in NAME_RULES:
        if re.search(pat, name, re.IGNORECASE):
            return cat
    return "other"


def timed(dec, tok: int, steps: int, sync) -> tuple[int, list[float]]:
    """Decode `steps` greedy tokens, each read back to the host (as suite.py); per-token seconds."""
    out = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        tok = int(dec(tok).argmax())
        out.append(time.perf_counter() - t0)
    return tok, out


def ms(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times) * 1e3, 3), "mean_ms": round(statistics.mean(times) * 1e3, 3),
            "min_ms": round(min(times) * 1e3, 3), "max_ms": round(max(times) * 1e3, 3), "decode_tokens": len(times)}


def decode_run(model, mode: str, ids, a, sync, profile: bool) -> dict:
    """Prefill ids, then the decoder: timed, and (profile) its fixed-shape step profiled without the graph."""
    n_tok = a.warmup + a.steps + 2
    state = model.new_state(mode)
    t0 = time.perf_counter()
    logits = model.prefill(state, ids, chunk_size=a.chunk, max_new_tokens=n_tok)
    sync()
    r = {"mode": mode, "tokens": len(ids), "prefill_s": round(time.perf_counter() - t0, 3)}
    dec = model.decoder(state, n_tok, graph=None if a.device == "cuda" else False)
    tok, _ = timed(dec, int(logits[-1].argmax()), a.warmup, sync)  # warm-up: compiles and captures the graph
    tok, times = timed(dec, tok, a.steps, sync)
    r |= ms(times) | {"graph": getattr(dec, "graph", None) is not None, "compiled": bool(getattr(dec, "compiled", 0)),
                      "compressed": state.compressed, "state_mib": round(state.nbytes()["total"] / 2**20, 1)}
    print(json.dumps(r), flush=True)
    if profile:
        r["profile"] = profile_step(dec, a, sync)
    del state, logits, dec
    gc.collect()
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return r


def _scoped(name, fn):
    def run(*args):
        with torch.profiler.record_function(name):
            return fn(*args)
    return run


def _cpu_scope(e):
    while e is not None and e.name not in SCOPES:
        e = e.cpu_parent
    return None if e is None else e.name


def profile_step(dec, a, sync) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    dec._write_fn = _scoped("ahn.memory_write", dec._write_fn)
    dec._attn_fn = _scoped("ahn.attention", dec._attn_fn)
    dec._read_fn = _scoped("ahn.memory_read", dec._read_fn)
    cuda = a.device == "cuda"
    with torch.inference_mode():
        walls = []
        for _ in range(3 + a.profile_steps):  # warm-up, then wall time of the ungraphed step
            sync()
            t0 = time.perf_counter()
            dec._step()
            sync()
            walls.append(time.perf_counter() - t0)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(a.profile_steps):
                dec._step()
            sync()
    events = prof.events()
    rows = []  # (name, scope, microseconds): kernels on CUDA, op self times on the CPU
    for e in events:
        if e.name in SCOPES or getattr(e, "is_user_annotation", False):
            continue  # profiler ranges (ours, inductor's), mirrored on the GPU timeline too
        if cuda and e.device_type == DeviceType.CUDA:
            rows.append((e.name, None, e.time_range.elapsed_us()))
        elif not cuda and e.device_type == DeviceType.CPU and not e.is_python_function:
            rows.append((e.name, _cpu_scope(e), e.self_cpu_time_total))
    scopes = {}  # device (or CPU) time spent inside our ranges, per step
    for k in prof.key_averages():
        if k.key in SCOPES:
            t = (getattr(k, "device_time_total", None) or getattr(k, "cuda_time_total", 0)) if cuda \
                else k.cpu_time_total
            scopes[k.key] = round(t / a.profile_steps / 1e3, 4)
    n = a.profile_steps
    by_name, by_cat = {}, {}
    for name, sc, us in rows:
        cat = category(name, sc)
        d = by_name.setdefault((name, cat), [0.0, 0])
        d[0] += us
        d[1] += 1
        by_cat[cat] = by_cat.get(cat, 0.0) + us
    total = sum(by_cat.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:a.rows]
    out = {"unit": "CUDA kernels" if cuda else "CPU ops (self time)", "steps_profiled": n, "ranges_ms": scopes,
           "ungraphed_step_ms": round(statistics.median(walls[3:]) * 1e3, 3),
           "kernels_per_step": round(len(rows) / n, 1), "time_per_step_ms": round(total / n / 1e3, 3),
           "by_category_ms": {c: round(us / n / 1e3, 3) for c, us in sorted(by_cat.items(), key=lambda kv: -kv[1])},
           "top": [{"name": name[:160], "category": cat, "ms_per_step": round(us / n / 1e3, 4), "calls_per_step":
                    round(cnt / n, 1), "share": round(us / total, 4)} for (name, cat), (us, cnt) in top]}
    print(f"--- fixed-shape step without the graph: {out['kernels_per_step']} {out['unit']} per step, "
          f"{out['time_per_step_ms']} ms of {'kernel' if cuda else 'op'} time per step, "
          f"{out['ungraphed_step_ms']} ms wall")
    print("inside the ranges (ms per step):", scopes)
    for c, v in out["by_category_ms"].items():
        print(f"{v:10.3f} ms  {c}")
    print(f"--- top {a.rows} by time per step")
    for t in out["top"]:
        print(f"{t['ms_per_step']:10.4f} ms {t['calls_per_step']:7.1f}x  {t['share']:6.1%}  [{t['category']}] "
              f"{t['name'][:100]}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny random Qwen2, no quantization")
    ap.add_argument("--config", help=f"suite.py config name (default {DEFAULTS['config']})")
    ap.add_argument("--quant", help=f"none | nf4 | fp4 | int8 (default {DEFAULTS['quant']})")
    ap.add_argument("--variant", default="GatedDeltaNet")
    ap.add_argument("--window", type=int, help=f"W (default {DEFAULTS['window']})")
    ap.add_argument("--sinks", type=int, help=f"S (default {DEFAULTS['sinks']})")
    ap.add_argument("--length", help=f"tokens prefilled, e.g. 32k (default {DEFAULTS['length']})")
    ap.add_argument("--chunk", type=int, help=f"prefill chunk (default {DEFAULTS['chunk']})")
    ap.add_argument("--steps", type=int, default=64, help="decode tokens timed")
    ap.add_argument("--warmup", type=int, default=8, help="decode tokens before timing (graph capture, compile)")
    ap.add_argument("--profile-steps", type=int, default=10, help="ungraphed steps profiled")
    ap.add_argument("--rows", type=int, default=25, help="kernels listed")
    ap.add_argument("--no-full", action="store_true", help="skip the mode `full` comparison")
    ap.add_argument("--ablate", action="store_true",
                    help="also time the graphed ahn step with the compiled PyTorch attention (AHN_DECODE_ATTENTION="
                         "torch) instead of the Triton flash-decoding kernels")
    ap.add_argument("--out", default=None, help="JSON file")
    a = ap.parse_args()
    for k, v in (TINY if a.tiny else DEFAULTS).items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/profile_decode.py needs a CUDA GPU (or --tiny for the CPU smoke check)")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    L = lengths(a.length)[0]
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
            "device": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "config": a.config, "quant": a.quant,
            "variant": a.variant, "window": a.window, "sinks": a.sinks, "tokens": L, "chunk": a.chunk,
            "AHN_COMPILE": os.environ.get("AHN_COMPILE", "1")}
    print(json.dumps(meta), flush=True)
    t0 = time.perf_counter()
    model = build(a.config, a.quant, RuntimeConfig(window=a.window, sinks=a.sinks, chunk_size=a.chunk), a.variant,
                  device=a.device)
    print(f"# built {a.config} {a.quant} in {time.perf_counter() - t0:.1f} s", flush=True)
    torch.manual_seed(1)
    ids = torch.randint(0, model.vocab_size, (L,), device=a.device)
    res = {"meta": meta, "ahn": decode_run(model, "ahn", ids, a, sync, profile=True)}
    if a.ablate:
        os.environ["AHN_DECODE_ATTENTION"] = "torch"
        res["ahn_torch_attention"] = decode_run(model, "ahn", ids, a, sync, profile=False)
        os.environ.pop("AHN_DECODE_ATTENTION")
    if not a.no_full:
        res["full"] = decode_run(model, "full", ids, a, sync, profile=False)
        res["ahn_over_full"] = round(res["ahn"]["median_ms"] / res["full"]["median_ms"], 3)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(a.out)


if __name__ == "__main__":
    main()
