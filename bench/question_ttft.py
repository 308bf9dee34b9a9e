"""Time to first token of follow-up questions after a long document (a script, not a test).

A chat about a document prefills the document once, then every question is appended to that state: its time to
first token is the prefill of the question's tokens (the first answer token comes from its last logits), and the
second token waits for the decoder (on CUDA, the answer's CUDA graph). Every question has a new length, so
kernels that plan per shape (cuDNN attention) pay their plan on every question; the runtime keeps those to full
prefill chunks (`forward(recurring=)`), and --all-cudnn restores the earlier behaviour for an A/B.

For each question length, twice (a new shape, then the same shape again), from a copy of the document's state:
prints and writes JSON with the question prefill (TTFT) and the time to the second token.

    python bench/question_ttft.py                                  # CUDA: random 3B nf4, 32k-token document
    python bench/question_ttft.py --all-cudnn                      # the same with cuDNN for every block
    python bench/question_ttft.py --device cpu --model smollm2 --doc 8k   # CPU: SmolLM2 + our AHN weights
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from suite import CONFIGS, build, lengths  # noqa: E402

from ahn_runtime import AHNModel, RuntimeConfig  # noqa: E402


# geometry defaults: the 3B/7B presets for the random-weight configs, the smollm2 preset for real small models
DEFAULTS = {"config": dict(window=32640, sinks=128, chunk=6144), "real": dict(window=1984, sinks=64, chunk=512)}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def load(a) -> AHNModel:
    cfg = RuntimeConfig(window=a.window, sinks=a.sinks, chunk_size=a.chunk)
    if a.model in CONFIGS:
        return build(a.model, a.quant, cfg, device=a.device)
    from ahn_runtime.loading import load_model
    if a.model == "smollm2":
        from cpu_smollm2 import PRESET, find_gguf
        base, ahn = find_gguf(None), os.path.join(os.path.dirname(HERE), "models", PRESET)
    else:
        base, _, ahn = a.model.partition("+")
    quant = None if a.quant == "none" or a.device == "cpu" else a.quant
    return load_model(base, ahn or None, cfg, device=a.device, quantization=quant)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-3b", help="a config name (random weights), 'smollm2' (the GGUF + "
                                                          "models/smollm2-135m-ahn) or BASE[+AHN_DIR]")
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--window", type=int, help="W (default: DEFAULTS by --model)")
    ap.add_argument("--sinks", type=int, help="S (default: DEFAULTS by --model)")
    ap.add_argument("--chunk", type=int, help="prefill chunk (default: DEFAULTS by --model)")
    ap.add_argument("--doc", default="32k", help="document tokens")
    ap.add_argument("--questions", default="17,43,88,131,260", help="question lengths in tokens")
    ap.add_argument("--all-cudnn", action="store_true",
                    help="mark every prefill call as recurring (cuDNN for every attention block where it is the "
                         "faster backend), as before commit 8f32865")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/question_ttft.json when $OUT is set)")
    a = ap.parse_args()
    for k, v in DEFAULTS["config" if a.model in CONFIGS else "real"].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.all_cudnn:
        plain = AHNModel.forward

        def forward(self, *args, **kw):
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
    rows = []
    for n in lengths(a.questions):
        q = torch.randint(0, model.vocab_size, (n,), generator=g)
        for attempt in ("new shape", "same shape"):
            st = state.clone()
            sync(dev)
            t0 = time.perf_counter()
            logits = model.prefill(st, q, max_new_tokens=32)
            tok = int(logits[-1].argmax())
            t1 = time.perf_counter()
            dec = model.decoder(st, 32)
            tok = int(dec(tok).argmax())
            sync(dev)
            t2 = time.perf_counter()
            row = {"question_tokens": n, "attempt": attempt, "ttft_ms": round((t1 - t0) * 1e3, 2),
                   "second_token_ms": round((t2 - t1) * 1e3, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del st, dec
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(dev)
            if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__,
            "python": platform.python_version(), "model": getattr(model, "model_id", a.model), "quant": a.quant,
            "window": a.window, "sinks": a.sinks, "chunk": a.chunk, "document_tokens": doc.numel(),
            "document_prefill_s": round(doc_s, 3), "all_cudnn": a.all_cudnn, "command": " ".join(["python"] + sys.argv)}
    out = a.out or (os.path.join(os.environ["OUT"], "question_ttft.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
