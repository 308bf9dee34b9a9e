"""Time to first token of follow-up questions after a long document (a script, not a test).

A chat about a document prefills the document once, then every question is appended to that state: its time to
first token is the prefill of the question's tokens (the first answer token comes from its last logits), and the
second token waits for the decoder (on CUDA, the answer's CUDA graph). Every question has a new length, so
kernels that plan per shape (cuDNN attention) pay their plan on every question; the runtime keeps those to full
prefill chunks (`forward(recurring=)`), and --policies default,all-cudnn A/Bs that against cuDNN for every block
in one process (alternating which goes first from one question length to the next).

For each question length and policy, twice (a new shape, then the same shape again), from a copy of the
document's state made as the app makes it (`model.fork`, inside the timed TTFT): prints and writes JSON with the
question prefill (TTFT; launch_ms is when `prefill` returned to Python, before the GPU finished: near ttft_ms
means the CPU bound it), the decoder's setup and first step (on CUDA the answer's CUDA graph is captured there,
unless a decoder kept from an earlier answer addresses the same buffers) and the second token's step.

    python bench/question_ttft.py                                  # CUDA: random 3B nf4, 32k-token document
    python bench/question_ttft.py --policies default,all-cudnn     # A/B against cuDNN for every block
    python bench/question_ttft.py --device cpu --model smollm2 --doc 8k   # CPU: SmolLM2 + our AHN weights
    python bench/question_ttft.py --cprofile 40    # what the first question pays once (cProfile, Triton compiles)
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from suite import CONFIGS, build, geometry, lengths  # noqa: E402

from ahn_runtime import AHNModel, RuntimeConfig  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def spec(model: str) -> str:
    """A config name or 'BASE[+AHN_DIR]'; 'smollm2' is the SmolLM2 GGUF with models/smollm2-135m-ahn."""
    if model != "smollm2":
        return model
    from cpu_smollm2 import PRESET, find_gguf
    return find_gguf(None) + "+" + os.path.join(os.path.dirname(HERE), "models", PRESET)


def load(a) -> AHNModel:
    cfg = RuntimeConfig(window=a.window, sinks=a.sinks, chunk_size=a.chunk)
    if a.model in CONFIGS:
        return build(a.model, a.quant, cfg, device=a.device)
    from ahn_runtime.loading import load_model
    base, _, ahn = a.model.partition("+")
    quant = None if a.quant == "none" or a.device == "cpu" else a.quant
    return load_model(base, ahn or None, cfg, device=a.device, quantization=quant)


def first_only(first: dict, again: dict, n: int, depth: int = 12) -> None:
    """The n functions whose cumulative time grew most from `again` to `first` (pstats' raw stats:
    {(file, line, name): (calls, primitive calls, own time, cumulative, callers)}), each with the chain of its
    costliest callers: what only the first run paid."""
    def name(k):
        return f"{os.path.basename(k[0])}:{k[1]}({k[2]})"

    grew = sorted(first, key=lambda k: -(first[k][3] - again.get(k, (0, 0, 0, 0))[3]))[:n]
    print(f"--- first run vs repeat: {n} functions whose cumulative time grew most")
    for k in grew:
        d = first[k][3] - again.get(k, (0, 0, 0, 0))[3]
        chain, cur = [], k
        for _ in range(depth):
            callers = first[cur][4]
            if not callers:
                break
            cur = max(callers, key=lambda c: callers[c][3])
            chain.append(name(cur))
        print(f"{d * 1e3:8.1f} ms  {name(k)}  <- " + " <- ".join(chain))


def trace_triton_compiles() -> None:
    """Print every Triton JIT compilation from now on: the kernel (its specialization) and our frames that
    launched it."""
    import traceback
    try:
        import triton
        knobs = triton.knobs.runtime
    except Exception:  # noqa: BLE001  no Triton, or one without hooks
        return

    def hook(*, repr, **_):
        ours = [f"{os.path.basename(f.filename)}:{f.lineno}({f.name})" for f in traceback.extract_stack()
                if "ahn_runtime" in f.filename or "/fla/" in f.filename]
        print(f"--- Triton compiles {repr[:400]}\n    from " + " <- ".join(ours[::-1][:8]), flush=True)
    knobs.jit_cache_hook = hook


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-3b", help="a config name (random weights), 'smollm2' (the GGUF + "
                                                          "models/smollm2-135m-ahn) or BASE[+AHN_DIR]")
    ap.add_argument("--quant", help="none | nf4 | int8 (default: as bench/suite.py's `geometry`)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--window", type=int, help="W (default: the 3B presets' for configs, the model's preset's)")
    ap.add_argument("--sinks", type=int, help="S (default: likewise)")
    ap.add_argument("--chunk", type=int, help="prefill chunk (default: likewise, the preset's chunk for --device)")
    ap.add_argument("--doc", default="32k", help="document tokens")
    ap.add_argument("--questions", default="17,43,88,131,260", help="question lengths in tokens")
    ap.add_argument("--policies", default="default",
                    help="comma list of 'default' and 'all-cudnn' (every prefill call marked recurring: cuDNN for "
                         "every attention block where it is the faster backend, as before commit 8f32865)")
    ap.add_argument("--copies", default="fork",
                    help="comma list: how an answer's state is made: fork (the app's: sized for question and answer "
                         "at once) or clone (a plain copy that the question's prefill resizes, before commit "
                         "1fe4ffb); several are alternated like --policies")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="run the first question's fork and prefill, and its repeat, under cProfile; print the N "
                         "functions whose cumulative time grew most on the first run, with their callers (what "
                         "the process's first question pays once), and every Triton compilation after the "
                         "document; the profiled rows are marked")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/question_ttft.json when $OUT is set)")
    a = ap.parse_args()
    a.model = spec(a.model)
    a = geometry(a.model, a, a.device)
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    if set(policies) - {"default", "all-cudnn"}:
        ap.error(f"unknown policy in {a.policies!r}")
    copies = [c.strip() for c in a.copies.split(",") if c.strip()]
    if not copies or set(copies) - {"fork", "clone"}:
        ap.error(f"unknown copy in {a.copies!r}")
    combos = [(p, c) for p in policies for c in copies]
    force = [False]  # all-cudnn while True
    plain = AHNModel.forward

    def forward(self, *args, **kw):
        if force[0]:
            kw["recurring"] = True
        return plain(self, *args, **kw)
    AHNModel.forward = forward
    model = load(a)
    dev = model.device
    if dev.type == "cuda":
        model.warm_up()  # as the app does at load
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, model.vocab_size, (lengths(a.doc)[0],), generator=g)
    state = model.new_state("ahn")
    sync(dev)
    t0 = time.perf_counter()
    model.prefill(state, doc)
    sync(dev)
    doc_s = time.perf_counter() - t0
    print(f"document {doc.numel():,} tokens: {doc_s:.2f} s", flush=True)
    if a.cprofile:
        trace_triton_compiles()
    rows, profiles = [], []

    def ms(t):
        return round(t * 1e3, 2)

    for i, n in enumerate(lengths(a.questions)):
        q = torch.randint(0, model.vocab_size, (n,), generator=g)
        for policy, copy in (combos if i % 2 == 0 else combos[::-1]):
            force[0] = policy == "all-cudnn"
            for attempt in ("new shape", "same shape"):
                prof = None
                if a.cprofile and len(rows) < 2:
                    prof = cProfile.Profile()
                sync(dev)
                t0 = time.perf_counter()
                if prof is not None:
                    prof.enable()
                # as the app answers: a copy sized for the question and answer
                st = model.fork(state, n, 32) if copy == "fork" else state.clone()
                logits = model.prefill(st, q, max_new_tokens=32)
                tl = time.perf_counter()
                if prof is not None:
                    prof.disable()
                tok = int(logits[-1].argmax())
                t1 = time.perf_counter()
                dec = model.decoder(st, 32)
                tok = int(dec(tok).argmax())  # on CUDA: captures the decode graph, then replays it
                t2 = time.perf_counter()
                tok = int(dec(tok).argmax())
                t3 = time.perf_counter()
                row = {"question_tokens": n, "policy": policy, "copy": copy, "attempt": attempt,
                       "ttft_ms": ms(t1 - t0),
                       "launch_ms": ms(tl - t0), "decoder_setup_and_first_step_ms": ms(t2 - t1),
                       "step_ms": ms(t3 - t2)}
                if prof is not None:
                    row["profiled"] = True
                    profiles.append(pstats.Stats(prof).stats)
                    if len(profiles) == 2:
                        first_only(*profiles, a.cprofile)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del st, dec
    force[0] = False
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(dev)
            if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__,
            "python": platform.python_version(), "model": getattr(model, "model_id", a.model), "quant": a.quant,
            "window": a.window, "sinks": a.sinks, "chunk": a.chunk, "document_tokens": doc.numel(),
            "document_prefill_s": round(doc_s, 3), "policies": policies, "copies": copies,
            "command": " ".join(["python"] + sys.argv)}
    out = a.out or (os.path.join(os.environ["OUT"], "question_ttft.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
