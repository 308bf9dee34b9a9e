"""Per-position negative log-likelihood on held-out documents in `full`, `window` and `ahn` modes. A script.

nll[t] = -log p(x[t+1] | x[0..t]) for the prediction made at position t. Positions t < S + W see exactly the same
keys in every mode; "beyond the window" means t >= S + W, where window mode has forgotten tokens and ahn mode has
them in its memory. Each document is fed once at the longest length, in chunks (logits for one chunk at a time,
never [L, V]); shorter lengths are prefixes (the model is causal), so one pass gives every length.

    python bench/eval_nll.py --base ~/.cache/ahn-test-models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --windows 512 --sinks 4 --max-mult 8 --docs 3 --modes full,window --json out/nll.json \
        --md out/nll.md --plot out/nll.png
    python bench/eval_nll.py --base /work/shared/oracle/models/base --ahn /work/shared/oracle/models/ahn_gdn \
        --synthetic --windows 16 --sinks 2 --max-mult 4 --docs 2 --json /tmp/nll.json   # smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ahn_runtime import RuntimeConfig, load_model  # noqa: E402
from bench.evallib import (HELDOUT, bucket_edges, bucket_means, fmt, gap_recovered, load_docs, md_table,  # noqa: E402
                           mean_over, pick_documents, run_meta, write_json, write_text)

MODES = ("full", "window", "ahn")


def parse_lengths(spec: str | None, window: int, max_mult: int) -> list[int]:
    """'2x,4x,4096' -> token counts for window W (multiples of W with an x); default 2x, 4x, ... up to max_mult x."""
    if not spec:
        out, m = [], 2
        while m <= max_mult:
            out.append(m * window)
            m *= 2
        return out or [max_mult * window]
    return [int(float(s[:-1]) * window) if s.endswith("x") else int(s) for s in spec.split(",") if s]


@torch.inference_mode()
def sequence_nll(model, mode: str, ids: torch.Tensor, chunk: int) -> np.ndarray:
    """nll[t] for t = 0 .. L-2, fed chunk by chunk; holds logits of one chunk only."""
    L = ids.numel()
    state = model.new_state(mode)
    state.reserve(L - 1, exact=True)
    out = torch.empty(L - 1)
    for s in range(0, L - 1, chunk):
        e = min(s + chunk, L - 1)
        logits = model.prefill(state, ids[s:e], chunk_size=chunk, logits="all")
        out[s:e] = F.cross_entropy(logits, ids[s + 1:e + 1].to(logits.device), reduction="none").cpu()
    print(f"  {mode} W={state.spec.window} S={state.spec.sinks}: {L} tokens, mean NLL {out.mean():.4f}", file=sys.stderr)
    return out.numpy().astype(np.float64)


def summarize(nll: np.ndarray, W: int, S: int, lengths: list[int]) -> dict:
    """nll: [docs, L-1] for one mode and window."""
    n_docs, T = nll.shape
    s, c = nll.sum(0), np.full(T, n_docs)
    lo = min(S + W, T)
    per_doc = nll[:, lo:].mean(1) if T > lo else np.full(n_docs, np.nan)
    log_edges = sorted({0, T} | {min(T, W * 2 ** k) for k in range(16) if W * 2 ** k < T})
    return {
        "nll_beyond_window": mean_over(s, c, lo, T),
        "stderr_over_docs": float(per_doc.std(ddof=1) / np.sqrt(n_docs)) if n_docs > 1 else None,
        "per_doc_beyond_window": [float(x) for x in per_doc],
        "nll_all": mean_over(s, c, 0, T),
        "nll_at_8W": mean_over(s, c, 7 * W, 8 * W) if T + 1 >= 8 * W else None,
        "by_length": {str(L): mean_over(s, c, lo, L - 1) for L in lengths},
        "buckets": bucket_means(s, c, bucket_edges(W, T)),
        "log_buckets": bucket_means(s, c, log_edges),
        "plot_buckets": bucket_means(s, c, bucket_edges(W, T, max(1, W // 4))),
    }


def gaps(modes: dict) -> dict | None:
    if not all(m in modes for m in MODES):
        return None
    f, w, a = modes["full"], modes["window"], modes["ahn"]
    return {
        "overall": gap_recovered(w["nll_beyond_window"], a["nll_beyond_window"], f["nll_beyond_window"]),
        "at_8W": gap_recovered(w["nll_at_8W"], a["nll_at_8W"], f["nll_at_8W"]),
        "by_length": {L: gap_recovered(w["by_length"][L], a["by_length"][L], f["by_length"][L])
                      for L in f["by_length"]},
        "buckets": [gap_recovered(bw["nll"], ba["nll"], bf["nll"])
                    for bw, ba, bf in zip(w["buckets"], a["buckets"], f["buckets"])],
    }


def markdown(res: dict) -> str:
    out = []
    for W, r in res["results"].items():
        modes = r["modes"]
        first = next(iter(modes.values()))
        cols = [f"[{b['lo']},{b['hi']})" for b in first["log_buckets"]]
        out.append(f"### W = {W}, S = {r['sinks']}, {r['n_docs']} documents of {r['length']} tokens\n")
        rows = []
        for m in MODES:
            if m in modes:
                x = modes[m]
                rows.append([m, fmt(x["nll_beyond_window"]) + (f" ± {x['stderr_over_docs']:.3f}"
                                                               if x["stderr_over_docs"] is not None else ""),
                             fmt(x["nll_at_8W"])] + [fmt(b["nll"]) for b in x["log_buckets"]])
            else:
                rows.append([m, r["pending"].get(m, "not run"), ""] + [""] * len(cols))
        if r["gap_recovered"]:
            g = r["gap_recovered"]
            rows.append(["gap recovered", fmt(g["overall"]), fmt(g["at_8W"])] + [""] * len(cols))
        out.append(md_table(["mode", "NLL t >= S+W", "NLL [7W,8W)"] + cols, rows))
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items = list(res["results"].items())
    fig, axes = plt.subplots(1, len(items), figsize=(max(6.0, 5.5 * len(items)), 4), squeeze=False)
    for ax, (W, r) in zip(axes[0], items):
        for m, x in r["modes"].items():
            b = [b for b in x["plot_buckets"] if b["nll"] is not None]
            ax.plot([(v["lo"] + v["hi"]) / 2 for v in b], [v["nll"] for v in b], marker=".", label=m)
        ax.axvline(r["sinks"] + int(W), color="grey", ls="--", lw=0.8, label="S + W")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position t (tokens)")
        ax.set_ylabel("NLL (nats)")
        ax.set_title(f"W={W}, S={r['sinks']}, {r['n_docs']} docs")
        ax.legend()
    fig.suptitle(f"{os.path.basename(res['base'])}: NLL by position", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, model=None) -> dict:
    """model: an already loaded AHNModel to use instead of loading --base/--ahn (in-process callers)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="HF model dir/id or .gguf file")
    ap.add_argument("--ahn", default=None, help="AHN-only checkpoint dir (needed for the ahn mode)")
    ap.add_argument("--modes", default="full,window,ahn")
    ap.add_argument("--windows", default="256,512,1024", help="comma list of W")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--lengths", default=None, help="comma list of token counts or multiples of W ('8x')")
    ap.add_argument("--max-mult", type=int, default=16, help="without --lengths: 2x, 4x, ... up to this multiple of W")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--data", default=HELDOUT, help="held-out gzip JSONL (never the train split)")
    ap.add_argument("--lang", default=None, help="only documents of this lang field (e.g. en)")
    ap.add_argument("--synthetic", action="store_true", help="random token ids instead of documents (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=512, help="tokens per prefill chunk (logits held per chunk)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    windows = [int(w) for w in args.windows.split(",")]
    S = args.sinks
    lengths = {W: parse_lengths(args.lengths, W, args.max_mult) for W in windows}
    for W, ls in lengths.items():
        if max(ls) <= S + W + 1:
            raise SystemExit(f"W={W}: lengths {ls} do not go beyond the window (need > S + W + 1 = {S + W + 1})")
    n_tokens = max(max(ls) for ls in lengths.values())
    modes = [m for m in args.modes.split(",") if m]
    pending = {}
    if "ahn" in modes and not args.ahn:
        modes.remove("ahn")
        pending["ahn"] = "pending trained weights (--ahn DIR)"
    if not modes:
        raise SystemExit("nothing to run: give --modes (and --ahn DIR for the ahn mode)")

    if model is None:
        model = load_model(args.base, args.ahn, RuntimeConfig(window=max(windows), sinks=S, chunk_size=args.chunk),
                           dtype=args.dtype, device=args.device)
    if args.synthetic:
        g = torch.Generator().manual_seed(args.seed)
        seqs = [(f"random-{i}", torch.randint(0, model.vocab_size, (n_tokens,), generator=g))
                for i in range(args.docs)]
    else:
        if model.tokenizer is None:
            raise SystemExit("this model has no tokenizer: use --synthetic")
        docs = load_docs(args.data, lang=args.lang)
        seqs = [(i, torch.tensor(ids)) for i, ids in pick_documents(docs, model.tokenizer, n_tokens, args.docs, args.seed)]
    print(f"{len(seqs)} sequences of {n_tokens} tokens: {[s[0] for s in seqs]}", file=sys.stderr)

    timing = {}
    full = None
    if "full" in modes:  # independent of W and S: once at the longest length
        t = time.time()
        full = np.stack([sequence_nll(model.with_config(RuntimeConfig(window=max(windows), sinks=S,
                                                                      chunk_size=args.chunk)), "full", ids, args.chunk)
                         for _, ids in seqs])
        timing["full"] = round(time.time() - t, 1)
    results = {}
    for W in windows:
        L = max(lengths[W])
        m_w = model.with_config(RuntimeConfig(window=W, sinks=S, chunk_size=args.chunk))
        per_mode = {}
        for mode in modes:
            if mode == "full":
                per_mode["full"] = summarize(full[:, :L - 1], W, S, lengths[W])
                continue
            t = time.time()
            nll = np.stack([sequence_nll(m_w, mode, ids[:L], args.chunk) for _, ids in seqs])
            timing[f"{mode}_W{W}"] = round(time.time() - t, 1)
            per_mode[mode] = summarize(nll, W, S, lengths[W])
            print(f"W={W} {mode}: NLL beyond window {per_mode[mode]['nll_beyond_window']:.4f}", file=sys.stderr)
        results[str(W)] = {"window": W, "sinks": S, "length": L, "lengths": lengths[W], "n_docs": len(seqs),
                           "modes": per_mode, "gap_recovered": gaps(per_mode), "pending": pending}
    res = {"base": args.base, "ahn": args.ahn, "data": "synthetic" if args.synthetic else args.data,
           "documents": [str(s[0]) for s in seqs], "results": results, "timing_s": timing,
           "meta": run_meta(args, t0, time.time())}
    write_json(args.json, res)
    md = markdown(res)
    write_text(args.md, md)
    if args.plot:
        plot(res, args.plot)
    print(md)
    return res


if __name__ == "__main__":
    main()
