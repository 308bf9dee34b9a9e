"""Command line (a stable contract):

    python -m ahn_runtime logits --base DIR --ahn DIR|none --input IN.safetensors --output OUT.safetensors
        --window W --sinks S --mode ahn|window|full [--chunk N] [--decode-from P]
        [--decode-exclusion consistent|official128] [--dtype float32|bfloat16] [--device cpu|cuda]
    python -m ahn_runtime generate --base ... [--ahn ...] (--prompt TEXT | --file PATH) [sampling options]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time


def _common(p: argparse.ArgumentParser, window_default=32640, sinks_default=128):
    p.add_argument("--base", required=True, help="base model: Hugging Face id, local directory or .gguf file")
    p.add_argument("--ahn", default="none", help="AHN-only checkpoint directory, or 'none' (merged or no AHN)")
    p.add_argument("--window", type=int, default=window_default, help="W: recent tokens attended (without sinks)")
    p.add_argument("--sinks", type=int, default=sinks_default, help="S: leading tokens always attended")
    p.add_argument("--mode", choices=["ahn", "window", "full"], default="ahn")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk size (tokens)")
    p.add_argument("--decode-exclusion", choices=["consistent", "official128"], default="consistent")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _load(a):
    from . import RuntimeConfig, load_model
    cfg = RuntimeConfig(window=a.window, sinks=a.sinks, decode_exclusion=a.decode_exclusion)
    if a.chunk is not None:
        cfg.chunk_size = a.chunk
    return load_model(a.base, a.ahn, cfg, dtype=a.dtype, device=a.device)


def cmd_logits(a) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from .errors import AHNError
    try:
        ids = load_file(a.input)["input_ids"]
    except Exception as e:  # noqa: BLE001
        raise AHNError(f"cannot read input_ids from {a.input}: {e}") from e
    ids = ids.reshape(-1).long()
    if ids.numel() == 0:
        raise AHNError("empty input: input_ids has no tokens")
    model = _load(a)
    if int(ids.max()) >= model.vocab_size or int(ids.min()) < 0:
        raise AHNError(f"input_ids out of range for a vocabulary of {model.vocab_size}")
    P = ids.numel() if a.decode_from is None else a.decode_from
    if not 1 <= P <= ids.numel():
        raise AHNError(f"--decode-from must be between 1 and {ids.numel()} (got {P})")
    state = model.new_state(a.mode)
    out = [model.prefill(state, ids[:P], logits="all")]
    out += [model.step(state, int(t)) for t in ids[P:]]
    save_file({"logits": torch.cat(out).float().cpu().contiguous()}, a.output)
    return 0


def cmd_generate(a) -> int:
    from .errors import AHNError
    from .generate import SamplingParams, chat_ids, stream_text
    if (a.prompt is None) == (a.file is None):
        raise AHNError("give exactly one of --prompt TEXT or --file PATH")
    if a.file is not None:
        try:
            with open(a.file, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise AHNError(f"cannot read {a.file}: {e}") from e
        if a.question:
            text = f"{text}\n\n{a.question}"
    else:
        text = a.prompt
    if not text.strip():
        raise AHNError("empty prompt")
    model = _load(a)
    ids = chat_ids(model, [{"role": "user", "content": text}])
    params = SamplingParams.from_model(model, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                       repetition_penalty=a.repetition_penalty, max_new_tokens=a.max_new_tokens,
                                       seed=a.seed)
    state = model.new_state(a.mode)
    stop = threading.Event()
    t0 = time.perf_counter()
    first = None
    n = 0

    def progress(done, total):
        print(f"\rprefill {done}/{total} tokens", end="", file=sys.stderr, flush=True)

    try:
        for piece in stream_text(model, state, ids, params, stop=stop, progress=progress):
            if first is None:
                first = time.perf_counter()
                print(file=sys.stderr)
            n += 1
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
    print()
    t1 = time.perf_counter()
    parts = state.nbytes()
    print(f"[{ids.numel()} prompt tokens, time to first token {((first or t1) - t0):.2f}s, "
          f"state {parts['total'] / 2**20:.1f} MiB, mode {a.mode}]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from .errors import AHNError
    ap = argparse.ArgumentParser(prog="python -m ahn_runtime", description="AHN long-context runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logits", help="logits for every position of input_ids (validation against the oracle)")
    _common(p)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--decode-from", type=int, default=None,
                   help="prefill the first P tokens, then feed the rest one token at a time")
    p.set_defaults(fn=cmd_logits)
    g = sub.add_parser("generate", help="stream an answer using the model's chat template")
    _common(g)
    g.add_argument("--prompt", default=None)
    g.add_argument("--file", default=None, help="a text file to put in the prompt")
    g.add_argument("--question", default=None, help="appended after --file's text")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(fn=cmd_generate)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except AHNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
