"""CPU benchmark, SmolLM2-135M-Instruct + our AHN weights (issue 3, CPU target). A script, not a test.

Target: a 32k-token document prefills at >= 2x the speed of transformers' own full-attention forward measured in
the same run, and decode tokens/s stays flat (within 10 %) from 2k to 32k tokens of context.

Measured in one process, on real text (held-out corpus, concatenated documents, tokenised by the model):
  (a) transformers' forward of the whole sequence (model.hf, input_ids [1, T], use_cache=False,
      logits_to_keep=1 when the model accepts it), time and tokens/s;
  (b) our chunked prefill in `ahn` mode (model.prefill called on consecutive segments that end at chunk
      boundaries, so the work is that of one prefill call), time, tokens/s, ratio to (a);
      optionally (--our-full) our prefill in `full` mode for reference;
  (c) decode tokens/s in `ahn` mode at each checkpoint context (2k .. 32k): the prefill state is cloned at each
      checkpoint; then, in --decode-rounds interleaved rounds, every context decodes --decode-steps timed greedy
      steps (model.step, after a few warm-up steps) from a fresh clone; tokens/s = median over rounds.

The machine is shared (2 cores): every timing records how many cores other processes used meanwhile (from
/proc/stat), and a prefill segment or transformers' forward that ran contended (> --max-other cores) is redone,
up to --retries times, from a saved copy of the state. Discarded attempts stay in the JSON.

    nice -n 5 python3 bench/cpu_smollm2.py [--length 32768] [--checkpoints 2048,4096,8192,16384,32768] \
        [--window W] [--sinks S] [--chunk C] [--decode-steps 64] [--our-full] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
from evallib import HELDOUT, SHARED, encode, load_docs, md_table

from ahn_runtime import RuntimeConfig
from ahn_runtime.loading import load_model

PRESET = "smollm2-135m-ahn"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- setup ------------------------------------------------------------------------------------------------------
def find_gguf(path: str | None) -> str:
    """The SmolLM2 GGUF: --base, else where scripts/test.sh keeps it ($AHN_TEST_MODELS or ~/.cache/ahn-test-models),
    fetched there with ../shared/tools/fetch-test-models when missing."""
    if path:
        return path
    dest = os.environ.get("AHN_TEST_MODELS") or os.path.expanduser("~/.cache/ahn-test-models")
    f = os.path.join(dest, GGUF)
    if not os.path.isfile(f):
        fetch = os.path.join(SHARED, "tools", "fetch-test-models")
        print(f"fetching {GGUF} into {dest} with {fetch}", flush=True)
        subprocess.run([fetch, dest], check=True, env={**os.environ, "ONLY": "smollm2"}, stdout=subprocess.DEVNULL)
    return f


def preset() -> dict:
    with open(os.path.join(REPO, "models", "presets.json")) as f:
        return json.load(f)["presets"][PRESET]


def document_ids(tokenizer, n_tokens: int, lang: str | None, seed: int) -> tuple[list[int], list[str]]:
    """n_tokens ids of held-out documents (seeded order) concatenated, separated by a blank line."""
    docs = load_docs(HELDOUT, lang=lang or None)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sep = encode(tokenizer, "\n\n")
    ids, used = [], []
    for i in order:
        need = n_tokens - len(ids)
        if need <= 0:
            break
        text = docs[i]["text"][: need * 8 + 64]  # tokenise only the prefix that can be needed
        ids += encode(tokenizer, text)[:need] + sep
        used.append(docs[i]["id"])
    if len(ids) < n_tokens:
        raise SystemExit(f"the held-out corpus has only {len(ids)} tokens (lang={lang!r}); {n_tokens} needed")
    return ids[:n_tokens], used


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        for line in info.splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if x in have]
    except OSError:
        pass
    import transformers
    return {"cpu": cpu, "cpu_flags": flags, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": list(os.getloadavg())}


class Clock:
    """Wall time, this process's CPU time, and the CPU time that everything else on the machine used meanwhile
    (from /proc/stat): the machine is shared, so each timing says how contended it was."""

    def __init__(self):
        self.w, self.p, self.b = time.perf_counter(), time.process_time(), self._busy()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        except (OSError, ValueError):
            return None

    def stop(self) -> dict:
        wall, proc = time.perf_counter() - self.w, time.process_time() - self.p
        b = self._busy()
        other = None if b is None or self.b is None else max(0.0, b - self.b - proc)
        return {"wall_s": wall, "process_cpu_s": round(proc, 2),
                "other_cpu_s": None if other is None else round(other, 2),
                "other_cores_busy": None if other is None else round(other / wall, 2)}


# ---- measurements -----------------------------------------------------------------------------------------------
def contended(k: dict, a) -> bool:
    return (k.get("other_cores_busy") or 0.0) > a.max_other


def hf_forward(model, ids: torch.Tensor, a) -> dict:
    """transformers' own forward of the whole sequence, full (causal) attention, no cache. Repeated (up to
    --retries times) while other processes used more than --max-other cores; the least contended attempt counts."""
    hf = model.hf
    kw = {"use_cache": False}
    accepts = "logits_to_keep" in inspect.signature(hf.forward).parameters
    if accepts:
        kw["logits_to_keep"] = 1
    T = int(ids.shape[0])
    attempts = []
    for i in range(a.retries + 1):
        gc.collect()
        clk = Clock()
        with torch.inference_mode():
            out = hf(input_ids=ids[None].to(model.device), **kw)
        c = clk.stop()
        dt = c.pop("wall_s")
        attempts.append({"seconds": round(dt, 2), "tok_per_s": round(T / dt, 1), **c})
        print(f"  attempt {i + 1}: {dt:.1f} s ({T / dt:.1f} tok/s; other processes used {c['other_cores_busy']} cores)",
              flush=True)
        if not contended(c, a):
            break
    best = min(attempts, key=lambda x: (x["other_cores_busy"] or 0.0, x["seconds"]))
    return {"tokens": T, **best, "attempts": attempts,
            "logits_to_keep": 1 if accepts else None, "logits_shape": list(out.logits.shape),
            "attn_implementation": getattr(hf.config, "_attn_implementation", None), "kwargs": sorted(kw)}


def decode(model, state, tok: int, warmup: int, steps: int) -> dict:
    """Greedy decode on `state` (modified): warm-up steps, then `steps` timed ones (each timed on its own)."""
    full_at = state.spec.sinks + state.window  # from this position on, every step writes a token into the memory
    for _ in range(warmup):
        tok = int(model.step(state, tok)[-1].argmax())
    times = []
    clk = Clock()
    writes = sum(1 for t in range(state.pos, state.pos + steps) if t >= full_at) if state.spec.has_memory else 0
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = int(model.step(state, tok)[-1].argmax())
        times.append(time.perf_counter() - t0)
    k = clk.stop()
    tot = sum(times)
    return {"tok_per_s": steps / tot, "ms_mean": tot / steps * 1e3, "ms_median": statistics.median(times) * 1e3,
            "steps_writing_memory": writes, "other_cores_busy": k["other_cores_busy"]}


def decode_all(model, saved: list[tuple[int, object, int]], a) -> list[dict]:
    """Decode at every checkpoint, interleaved: in each of --decode-rounds rounds, every context in turn decodes
    from a fresh clone of its saved state, so drifting load on the shared machine hits all contexts alike.
    Per context: tokens/s = median over rounds of (steps / time of the round's timed steps)."""
    runs = {c: [] for c, _, _ in saved}
    for r in range(a.decode_rounds):
        for c, st, tok in saved:
            runs[c].append(decode(model, st.clone(), tok, a.warmup, a.decode_steps))
            print(f"  decode round {r + 1} at {c}: {runs[c][-1]['tok_per_s']:.2f} tok/s "
                  f"(other processes used {runs[c][-1]['other_cores_busy']} cores)", flush=True)
    out = []
    for c, rs in runs.items():
        out.append({"context": c, "steps_per_round": a.decode_steps, "rounds": len(rs),
                    "tok_per_s": round(statistics.median(x["tok_per_s"] for x in rs), 2),
                    "ms_per_token_median_round": round(statistics.median(x["ms_mean"] for x in rs), 2),
                    "ms_per_token_median_step": round(statistics.median(x["ms_median"] for x in rs), 2),
                    "tok_per_s_rounds": [round(x["tok_per_s"], 2) for x in rs],
                    "steps_writing_memory": rs[0]["steps_writing_memory"],
                    "other_cores_busy_max": max((x["other_cores_busy"] or 0.0) for x in rs)})
    return out


def ahn_prefill_and_decode(model, ids: torch.Tensor, checkpoints: list[int], a) -> tuple[dict, list[dict]]:
    """One `ahn` prefill over ids in timed segments; a clone of the state is kept at each decode checkpoint."""
    T = int(ids.shape[0])
    state = model.new_state("ahn")
    state.reserve(T, exact=True)  # what model.prefill does for the whole prompt (bounded by S + W)
    done, spent, segs, saved = 0, 0.0, [], []
    proc = other = 0.0
    step = max(a.chunk, a.segment // a.chunk * a.chunk)  # timing (and retry) granularity, whole chunks
    for c in sorted(set(checkpoints) | {T} | set(range(step, T, step))):
        snap = state.clone() if a.retries else None
        attempts = []
        for i in range(a.retries + 1):  # a contended segment is redone from the saved state
            if i:
                state = snap.clone()
            gc.collect()
            clk = Clock()
            logits = model.prefill(state, ids[done:c])
            k = clk.stop()
            dt = k.pop("wall_s")
            attempts.append({"seconds": round(dt, 2), "tok_per_s": round((c - done) / dt, 1), **k})
            print(f"  ahn prefill {done}..{c}: {dt:.1f} s ({(c - done) / dt:.0f} tok/s; other processes used "
                  f"{k['other_cores_busy']} cores)" + (f" [attempt {i + 1}]" if i else ""), flush=True)
            if not contended(k, a):
                break
        del snap
        k = attempts[-1]  # the state holds this attempt's result
        spent += k["seconds"]
        proc += k["process_cpu_s"]
        other += k["other_cpu_s"] or 0.0
        segs.append({"from": done, "to": c, **k, "attempts": len(attempts),
                     "discarded_attempts": attempts[:-1]})
        done = c
        if c in checkpoints:
            saved.append((c, state.clone(), int(logits[-1].argmax())))
    pre = {"tokens": T, "seconds": round(spent, 2), "tok_per_s": round(T / spent, 1),
           "process_cpu_s": round(proc, 2), "other_cpu_s": round(other, 2),
           "other_cores_busy": round(other / spent, 2), "segments": segs,
           "state_mib": round(state.nbytes()["total"] / 2**20, 2)}
    del state
    dec = decode_all(model, saved, a) if a.decode_steps > 0 and a.decode_rounds > 0 else []
    return pre, dec


def our_prefill(model, ids: torch.Tensor, mode: str) -> dict:
    gc.collect()
    state = model.new_state(mode)
    clk = Clock()
    model.prefill(state, ids)
    c = clk.stop()
    dt = c.pop("wall_s")
    T = int(ids.shape[0])
    return {"mode": mode, "tokens": T, "seconds": round(dt, 2), "tok_per_s": round(T / dt, 1), **c,
            "state_mib": round(state.nbytes()["total"] / 2**20, 2)}


# ---- main -------------------------------------------------------------------------------------------------------
def main():
    p = preset()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help=f"the {GGUF} file (default: the test models' cache, fetched)")
    ap.add_argument("--ahn", default=os.path.join(REPO, p["ahn"]))
    ap.add_argument("--window", type=int, default=p["window"])
    ap.add_argument("--sinks", type=int, default=p["sinks"])
    ap.add_argument("--chunk", type=int, default=p["chunk_size"], help="our prefill chunk size")
    ap.add_argument("--length", type=int, default=32768, help="prefill length (tokens)")
    ap.add_argument("--checkpoints", default="2048,4096,8192,16384,32768",
                    help="decode contexts (those above --length are dropped); multiples of --chunk")
    ap.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per context and round")
    ap.add_argument("--decode-rounds", type=int, default=3, help="interleaved rounds over the contexts (median)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps before each measurement")
    ap.add_argument("--our-full", action="store_true", help="also time our runtime's `full` mode prefill")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers' forward (no ratio)")
    ap.add_argument("--retries", type=int, default=2,
                    help="redo a prefill segment or transformers' forward up to N times when contended")
    ap.add_argument("--segment", type=int, default=4096, help="prefill is timed (and redone) in segments of N tokens")
    ap.add_argument("--max-other", type=float, default=0.25,
                    help="contended: other processes used more than this many cores on average meanwhile")
    ap.add_argument("--lang", default="en", help="held-out documents of this language ('' for all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None, help="JSON output (default docs/bench_cpu_smollm2_<date>.json)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    date = datetime.date.today().isoformat()
    out = a.out or os.path.join(REPO, "docs", f"bench_cpu_smollm2_{date}.json")
    checkpoints = [int(x) for x in a.checkpoints.split(",") if x and int(x) <= a.length]
    bad = [c for c in checkpoints if c % a.chunk and c != a.length]
    if bad:
        raise SystemExit(f"checkpoints {bad} are not multiples of the chunk size {a.chunk}")

    base = find_gguf(a.base)
    t0 = time.perf_counter()
    model = load_model(base, a.ahn, RuntimeConfig(window=a.window, sinks=a.sinks, chunk_size=a.chunk), device="cpu")
    load_s = time.perf_counter() - t0
    ids, doc_ids = document_ids(model.tokenizer, a.length, a.lang, a.seed)
    ids = torch.tensor(ids, dtype=torch.long)
    meta = {"date": date, "machine": machine(), "base": os.path.basename(base), "ahn": os.path.relpath(a.ahn, REPO),
            "variant": model.variant, "dtype": str(model.dtype).replace("torch.", ""), "window": a.window,
            "sinks": a.sinks, "chunk": a.chunk, "length": a.length, "checkpoints": checkpoints,
            "decode_steps": a.decode_steps, "decode_rounds": a.decode_rounds, "retries": a.retries, "segment": a.segment, "max_other_cores": a.max_other,
            "warmup_steps": a.warmup, "threads": a.threads,
            "input": {"corpus": os.path.relpath(HELDOUT, os.path.dirname(REPO)), "lang": a.lang or None,
                      "seed": a.seed, "documents": doc_ids, "separator": "\\n\\n"},
            "load_seconds": round(load_s, 1),
            "command": " ".join(["python3", os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:])}
    print(json.dumps({k: meta[k] for k in ("date", "machine", "window", "sinks", "chunk", "length")}), flush=True)
    res: dict = {"meta": meta}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        res["meta"]["loadavg_end"] = list(os.getloadavg())
        with open(out, "w") as f:
            json.dump(res, f, indent=1)

    # warm-up (allocator, thread pool, kernels) for both implementations, untimed
    w = ids[: min(len(ids), 2 * a.chunk)]
    with torch.inference_mode():
        model.hf(input_ids=w[None], use_cache=False)
    model.prefill(model.new_state("ahn"), ids[: min(len(ids), a.sinks + a.window + a.chunk)])  # memory path too

    if not a.skip_hf:
        print(f"transformers forward of {a.length} tokens ...", flush=True)
        res["hf_forward"] = hf_forward(model, ids, a)
        print("  " + json.dumps(res["hf_forward"]), flush=True)
        save()
    print(f"our ahn prefill of {a.length} tokens + decode at {checkpoints} ...", flush=True)
    res["ahn_prefill"], res["ahn_decode"] = ahn_prefill_and_decode(model, ids, checkpoints, a)
    if "hf_forward" in res:
        res["ahn_prefill"]["speedup_vs_hf"] = round(res["hf_forward"]["seconds"] / res["ahn_prefill"]["seconds"], 3)
    save()
    if a.our_full:
        print(f"our full prefill of {a.length} tokens ...", flush=True)
        res["full_prefill"] = our_prefill(model, ids, "full")
        if "hf_forward" in res:
            res["full_prefill"]["speedup_vs_hf"] = round(res["hf_forward"]["seconds"] / res["full_prefill"]["seconds"], 3)
        print("  " + json.dumps(res["full_prefill"]), flush=True)
    dec = res["ahn_decode"]
    if dec:
        r = [d["tok_per_s"] for d in dec]
        res["decode_summary"] = {
            "min_tok_per_s": min(r), "max_tok_per_s": max(r),
            "spread_pct": round((max(r) / min(r) - 1) * 100, 1),  # (max/min - 1) * 100, target <= 10
            "last_over_first": round(r[-1] / r[0], 3)}
    save()

    # ---- report ---------------------------------------------------------------------------------------------
    rows = []
    if "hf_forward" in res:
        h = res["hf_forward"]
        rows.append([f"transformers forward, full attention ({h['attn_implementation']}"
                     + (", logits_to_keep=1)" if h["logits_to_keep"] else ", all logits)"),
                     h["tokens"], f"{h['seconds']:.1f}", f"{h['tok_per_s']:.0f}", "1.00", h["other_cores_busy"]])
    pr = res["ahn_prefill"]
    rows.append([f"ours, ahn (W={a.window}, S={a.sinks}, chunk {a.chunk})", pr["tokens"], f"{pr['seconds']:.1f}",
                 f"{pr['tok_per_s']:.0f}", f"{pr['speedup_vs_hf']:.2f}" if "speedup_vs_hf" in pr else "—",
                 pr["other_cores_busy"]])
    if "full_prefill" in res:
        fp = res["full_prefill"]
        rows.append([f"ours, full (chunk {a.chunk})", fp["tokens"], f"{fp['seconds']:.1f}", f"{fp['tok_per_s']:.0f}",
                     f"{fp['speedup_vs_hf']:.2f}" if "speedup_vs_hf" in fp else "—", fp["other_cores_busy"]])
    print("\nPrefill\n")
    print(md_table(["implementation", "tokens", "seconds", "tokens/s", "speed-up vs transformers",
                    "other processes (cores busy)"], rows))
    if dec:
        print(f"Decode, ahn mode (greedy; per context {a.decode_rounds} interleaved rounds of {a.decode_steps} timed "
              f"steps after {a.warmup} warm-up; tokens/s = median over rounds)\n")
        print(md_table(["context", "tokens/s", "ms/token", "tokens/s per round", "timed steps writing memory",
                        "other processes (cores busy, max)"],
                       [[d["context"], f"{d['tok_per_s']:.2f}", f"{d['ms_per_token_median_round']:.1f}",
                         " / ".join(f"{x:.2f}" for x in d["tok_per_s_rounds"]), d["steps_writing_memory"],
                         d["other_cores_busy_max"]] for d in dec]))
        s = res["decode_summary"]
        print(f"decode spread (max/min - 1): {s['spread_pct']:.1f} %; {dec[-1]['context']} vs {dec[0]['context']}: "
              f"{s['last_over_first']:.3f}x")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
