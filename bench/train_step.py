"""Seconds per training step (teacher + student forward/backward + KL) and peak memory of the AHN trainer.

    python bench/train_step.py --preset smollm2-135m --seq-len 4096 16384 --device cuda
    python bench/train_step.py --base ~/.cache/ahn-test-models/SmolLM2-135M-Instruct.Q4_1.gguf --seq-len 2048

--preset builds a randomly initialised base with the real architecture (no download); --base loads real weights.
Each step uses a fixed geometry: budget = the largest spec-§4.2 budget below L (worst case for attention) and
128 sinks, unless --budget/--sinks are given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PRESETS = {  # public configs of the real models
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768),
}


def build_base(a, dtype, device):
    if a.base:
        from ahn_runtime.loading import load_base
        return load_base(a.base, dtype, device)[0]
    from transformers import AutoConfig, AutoModelForCausalLM
    p = dict(PRESETS[a.preset])
    cfg = AutoConfig.for_model(p.pop("model_type"), **p)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)
    return m.eval().requires_grad_(False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m", choices=list(PRESETS))
    ap.add_argument("--base", default=None)
    ap.add_argument("--variant", default="GatedDeltaNet")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--memory-kernel", default="auto")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-grad-checkpointing", action="store_true")
    a = ap.parse_args()
    from ahn_runtime.loading import _resolve_dtype
    from ahn_runtime.train.forward import Distiller, init_memories
    from ahn_runtime.train.trainer import BUDGET_CHOICES
    dtype = _resolve_dtype(a.dtype, a.device)
    hf = build_base(a, dtype, a.device)
    mems = init_memories(a.variant, hf.config, 0, a.device)
    with torch.no_grad():  # a non-zero memory output, as after some training
        for m in mems:
            m.o_proj.weight.normal_(0, 0.02)
    d = Distiller(hf, mems, attention=a.attention, grad_checkpointing=not a.no_grad_checkpointing,
                  memory_kernel=a.memory_kernel)
    opt = torch.optim.AdamW([p for p in mems.parameters() if p.requires_grad], lr=1e-4)
    cuda = a.device.startswith("cuda")
    for L in a.seq_len:
        B = a.budget or max(c for c in BUDGET_CHOICES if c < L)
        ids = torch.randint(0, hf.config.vocab_size, (L,), generator=torch.Generator().manual_seed(L))
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for i in range(a.steps + 1):
            if cuda:
                torch.cuda.synchronize()
            t = time.time()
            opt.zero_grad(set_to_none=True)
            loss, n = d(ids, B - a.sinks, a.sinks)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.time() - t)
        s = sum(times[1:]) / len(times[1:])  # the first step compiles / warms up
        rec = {"model": a.base or a.preset, "variant": a.variant, "device": a.device, "dtype": str(dtype),
               "attention": d._attn_impl(L), "torch_memory_kernel": d.uses_torch_kernel(), "seq_len": L, "budget": B, "sinks": a.sinks, "loss_positions": n,
               "first_step_s": round(times[0], 3), "s_per_step": round(s, 3), "tokens_per_s": round(L / s, 1),
               "loss": round(loss.item(), 5)}
        if cuda:
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
