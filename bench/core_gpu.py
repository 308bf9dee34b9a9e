"""Core runtime benchmark: random weights of real model shapes, `ahn` vs `full`, time to first token, decode
ms/token, peak memory, by context length. A script, not a test.

    python bench/core_gpu.py --config qwen2.5-3b --lengths 32768,131072,524288 --full-lengths 32768,131072 \
        --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ahn_runtime import AHNModel, RuntimeConfig  # noqa: E402
from ahn_runtime.memory import VARIANTS  # noqa: E402

CONFIGS = {
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=True),
}


def build(name: str, variant: str, cfg: RuntimeConfig, device: str, dtype: torch.dtype) -> AHNModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    c = Qwen2Config(**CONFIGS[name], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen2ForCausalLM(c).to(dtype).eval().requires_grad_(False)
        H, h = c.num_attention_heads, c.hidden_size
        mems = torch.nn.ModuleList([VARIANTS[variant](h, H, h // H) for _ in range(c.num_hidden_layers)])
    for m in mems:
        m.reset_parameters()
        m.o_proj.weight.data.normal_(0, 0.02)  # a working (non-zero) memory, as after training
    return AHNModel(hf, mems.to(dtype).eval().requires_grad_(False), cfg, model_id=f"random-{name}")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(model: AHNModel, mode: str, L: int, decode_steps: int) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    ids = torch.randint(0, model.vocab_size, (L,), device=model.device)
    state = model.new_state(mode)
    sync()
    t0 = time.perf_counter()
    logits = model.prefill(state, ids)
    tok = int(logits[-1].argmax())
    sync()
    ttft = time.perf_counter() - t0
    for _ in range(4):  # warm-up
        tok = int(model.step(state, tok)[-1].argmax())
    sync()
    t1 = time.perf_counter()
    for _ in range(decode_steps):
        tok = int(model.step(state, tok)[-1].argmax())
    sync()
    dec = (time.perf_counter() - t1) / decode_steps
    r = {"mode": mode, "tokens": L, "ttft_s": round(ttft, 3), "prefill_tok_per_s": round(L / ttft),
         "decode_ms_per_token": round(dec * 1e3, 2), "state_mib": round(state.nbytes()["total"] / 2**20, 1)}
    if torch.cuda.is_available():
        r["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        r["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        r["weights_gib"] = round(base_alloc / 2**30, 3)
    del state, logits
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="qwen2.5-3b", choices=list(CONFIGS))
    ap.add_argument("--variant", default="GatedDeltaNet", choices=list(VARIANTS))
    ap.add_argument("--lengths", default="32768,131072,524288")
    ap.add_argument("--full-lengths", default="32768,131072")
    ap.add_argument("--window", type=int, default=32640)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    cfg = RuntimeConfig(window=a.window, sinks=a.sinks, chunk_size=a.chunk)
    model = build(a.config, a.variant, cfg, a.device, dtype)
    meta = {"date": datetime.date.today().isoformat(), "config": a.config, "variant": a.variant,
            "window": a.window, "sinks": a.sinks, "chunk": a.chunk, "dtype": str(dtype), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    print(json.dumps(meta), flush=True)
    # compile/autotune every kernel shape once: long enough for memory writes in full chunks
    measure(model, "ahn", min(a.sinks + a.window + 3 * a.chunk, max(map(int, a.lengths.split(",")))), 4)
    results = []
    runs = [("ahn", int(x)) for x in a.lengths.split(",") if x] + [("full", int(x)) for x in a.full_lengths.split(",") if x]
    for mode, L in runs:
        try:
            r = measure(model, mode, L, a.decode_steps)
        except torch.OutOfMemoryError as e:
            r = {"mode": mode, "tokens": L, "error": f"out of memory: {str(e).splitlines()[0]}"}
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\n{'mode':6s} {'tokens':>8s} {'TTFT s':>8s} {'tok/s':>9s} {'dec ms':>7s} {'peak GiB':>9s} {'state MiB':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:6s} {r['tokens']:8d} {r['error']}")
        else:
            print(f"{r['mode']:6s} {r['tokens']:8d} {r['ttft_s']:8.2f} {r['prefill_tok_per_s']:9d} "
                  f"{r['decode_ms_per_token']:7.2f} {r.get('peak_allocated_gib', 0):9.2f} {r['state_mib']:9.1f}")


if __name__ == "__main__":
    main()
