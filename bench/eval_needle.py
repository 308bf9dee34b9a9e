"""Needle in a haystack: a key-value fact planted at a chosen depth of held-out text, asked at the end through the
model's chat template; greedy decoding; exact match of the 6-digit code. A script.

The prompt is exactly `length` tokens: chat frame (instruction, question, assistant primer) + haystack tokens with
the needle inserted at `depth` (fraction of the document part; moved by at most --snap tokens to the nearest sentence
or line end). The haystack is trimmed in tokens, never characters. Each trial draws a new name, code, document and
start offset; all modes and cells of a trial use the same needle and haystack (paired comparison).

    python bench/eval_needle.py --base ~/.cache/ahn-test-models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --window 512 --sinks 4 --lengths 1024,2048,4096 --depths 0.1,0.5,0.9 --trials 2 --modes full,window \
        --json out/needle.json --md out/needle.md --plot out/needle.png
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ahn_runtime import RuntimeConfig, load_model  # noqa: E402
from ahn_runtime.generate import SamplingParams, generate  # noqa: E402
from bench.evallib import (HELDOUT, encode, load_docs, make_needle, md_table, needle_answer_ok,  # noqa: E402
                           needle_text, place_needle, run_meta, write_json, write_text)

DOC = "\x00DOCUMENT\x00"
INSTRUCTION = "Read the document below and answer the question after it.\n\n<document>\n" + DOC + "\n</document>\n\n"
QUESTION = "What is the secret code for {name}? Answer with the 6-digit number only."
PRIMER = "The secret code for {name} is"


def frame_ids(tokenizer, name: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the document: chat template with the question, plus the assistant primer."""
    msgs = [{"role": "user", "content": INSTRUCTION + QUESTION.format(name=name)}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    else:
        text = msgs[0]["content"] + "\n\n"
    head, tail = text.split(DOC)
    return encode(tokenizer, head), encode(tokenizer, tail + PRIMER.format(name=name))


def sentence_end(tokenizer, hay: list[int]):
    """boundary(i): token i ends a sentence or a line."""
    def boundary(i: int) -> bool:
        return tokenizer.decode([hay[i]]).rstrip(" ").endswith((".", "!", "?", "\n"))
    return boundary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--ahn", default=None)
    ap.add_argument("--modes", default="full,window,ahn")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens (exact)")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depth as a fraction of the document")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--snap", type=int, default=48, help="move the needle up to N tokens to a sentence end (0: off)")
    ap.add_argument("--data", default=HELDOUT)
    ap.add_argument("--lang", default="en")
    ap.add_argument("--sources", default=None, help="comma list of corpus sources for the haystack (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    pending = {}
    if "ahn" in modes and not args.ahn:
        modes.remove("ahn")
        pending["ahn"] = "pending trained weights (--ahn DIR)"
    if not modes:
        raise SystemExit("nothing to run: give --modes (and --ahn DIR for the ahn mode)")
    cfg = RuntimeConfig(window=args.window, sinks=args.sinks, chunk_size=args.chunk)
    model = load_model(args.base, args.ahn, cfg, dtype=args.dtype, device=args.device)
    tok = model.tokenizer
    if tok is None:
        raise SystemExit("the needle test needs a model with a tokenizer and chat template")
    docs = load_docs(args.data, lang=args.lang, sources=args.sources.split(",") if args.sources else None)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)

    trials = []
    for i in range(args.trials):
        rng = random.Random(args.seed * 1000 + i)
        name, code = make_needle(rng)
        for _ in range(100):  # a document long enough for the longest prompt, from a random offset
            d = rng.choice(docs)
            hay = encode(tok, d["text"][:(max(lengths) + 2000) * 8])
            if len(hay) >= max(lengths) + 1:
                break
        else:
            raise SystemExit("no held-out document is long enough")
        off = rng.randrange(0, len(hay) - max(lengths))
        trials.append({"name": name, "code": code, "doc": d["id"], "offset": off, "hay": hay[off:]})

    cells = {m: {str(L): {str(dp): [] for dp in depths} for L in lengths} for m in modes}
    for ti, tr in enumerate(trials):
        head, tail = frame_ids(tok, tr["name"])
        needle = encode(tok, needle_text(tr["name"], tr["code"]))
        for L in lengths:
            for dp in depths:
                ids, pos = place_needle(head, tr["hay"], needle, tail, L, dp, sentence_end(tok, tr["hay"]), args.snap)
                for m in modes:
                    t = time.time()
                    out = list(generate(model, model.new_state(m), torch.tensor(ids), params, chunk_size=args.chunk))
                    pred = tok.decode(out, skip_special_tokens=True)
                    ok = needle_answer_ok(pred, tr["code"])
                    cells[m][str(L)][str(dp)].append({"trial": ti, "ok": ok, "pred": pred, "needle_pos": pos,
                                                      "tokens_back": L - pos, "seconds": round(time.time() - t, 2)})
                    print(f"trial {ti} L={L} depth={dp} {m}: {'ok ' if ok else 'MISS'} {pred!r}", file=sys.stderr)
    acc = {m: {L: {dp: sum(c["ok"] for c in v) / len(v) for dp, v in row.items()} for L, row in grid.items()}
           for m, grid in cells.items()}
    mean = {m: sum(sum(r.values()) for r in g.values()) / (len(lengths) * len(depths)) for m, g in acc.items()}
    res = {"base": args.base, "ahn": args.ahn, "window": args.window, "sinks": args.sinks, "lengths": lengths,
           "depths": depths, "trials": [{k: v for k, v in t.items() if k != "hay"} for t in trials],
           "accuracy": acc, "mean_accuracy": mean, "outside_window": outside_window(cells, args.window),
           "cells": cells, "pending": pending,
           "prompt": {"instruction": INSTRUCTION.replace(DOC, "{document}"), "question": QUESTION, "primer": PRIMER},
           "meta": run_meta(args, t0, time.time())}
    write_json(args.json, res)
    md = markdown(res)
    write_text(args.md, md)
    if args.plot:
        plot(res, args.plot)
    print(md)
    return res


def outside_window(cells: dict, window: int) -> dict:
    """Per mode: exact-match accuracy over the trials whose needle starts more than `window` tokens before the end
    of the prompt (out of the window when the answer is generated; the issue's target compares these)."""
    res = {}
    for m, grid in cells.items():
        runs = [c for row in grid.values() for v in row.values() for c in v if c["tokens_back"] > window]
        ok = sum(c["ok"] for c in runs)
        res[m] = {"trials": len(runs), "correct": ok, "accuracy": ok / len(runs) if runs else None}
    return res


def markdown(res: dict) -> str:
    out = []
    ow = res.get("outside_window") or {}
    if ow:
        out.append("Needles out of the window (more than W tokens back): " + ", ".join(
            f"{m} {v['correct']}/{v['trials']}" for m, v in ow.items()) + "\n")
    n = len(res["trials"])
    for m in ("full", "window", "ahn"):
        if m not in res["accuracy"]:
            if m in res["pending"]:
                out.append(f"**{m}**: {res['pending'][m]}\n")
            continue
        out.append(f"**{m}** (W={res['window']}, S={res['sinks']}; exact-match accuracy over {n} trials; "
                   f"mean {res['mean_accuracy'][m]:.2f})\n")
        rows = [[L] + [f"{res['accuracy'][m][str(L)][str(d)]:.2f}" for d in res["depths"]] for L in res["lengths"]]
        out.append(md_table(["length \\ depth"] + [str(d) for d in res["depths"]], rows))
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(res["accuracy"])
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6.0, 4.5 * len(modes)), 3.8), squeeze=False)
    for ax, m in zip(axes[0], modes):
        grid = [[res["accuracy"][m][str(L)][str(d)] for d in res["depths"]] for L in res["lengths"]]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(res["depths"])), [str(d) for d in res["depths"]])
        ax.set_yticks(range(len(res["lengths"])), [str(L) for L in res["lengths"]])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("prompt length (tokens)")
        ax.set_title(f"{m}" + ("" if m == "full" else f" (W={res['window']}, S={res['sinks']})"))
    fig.suptitle(f"{os.path.basename(res['base'])}: needle exact match, {len(res['trials'])} trials/cell", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
