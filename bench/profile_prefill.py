"""Where prefill and decode time goes (GPU): times one long prefill and graph decode, then profiles one
steady-state prefill chunk and one eager decode step with torch.profiler (top CUDA kernels). A script.

    python bench/profile_prefill.py --config qwen2.5-3b --quant nf4 --length 131072 --chunks 4096
    python bench/profile_prefill.py --length 128k --cold      # first-use cost in a fresh process
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from suite import build, lengths  # noqa: E402

from ahn_runtime import RuntimeConfig  # noqa: E402


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
    a = ap.parse_args()
    L = lengths(a.length)[0]
    model = build(a.config, a.quant, RuntimeConfig(window=a.window, sinks=a.sinks))
    ids = torch.randint(0, model.vocab_size, (L,), device="cuda")
    if a.cold:
        C = int(a.chunks.split(",")[0])
        m = model.with_config(RuntimeConfig(window=a.window, sinks=a.sinks, chunk_size=C))
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
        t0 = time.perf_counter()
        m.prefill(st, ids)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"prefill {a.mode} {L} tokens chunk {C}: {dt:.2f} s ({L / dt:,.0f} tok/s), peak "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        dec = m.decoder(st, 80)
        tok = 1
        for _ in range(4):
            tok = int(dec(tok).argmax())
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(64):
            tok = int(dec(tok).argmax())
        print(f"decode (graph={dec.graph is not None}): {(time.perf_counter() - t0) / 64 * 1e3:.2f} ms/token",
              flush=True)
        e = st.clone()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(16):
            tok = int(m.step(e, tok)[-1].argmax())
        print(f"decode eager step: {(time.perf_counter() - t0) / 16 * 1e3:.2f} ms/token", flush=True)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            m.forward(st, ids[:C], logits="none")
            torch.cuda.synchronize()
        print(f"--- one steady-state prefill chunk of {C} tokens")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec(tok)
            torch.cuda.synchronize()
        print("--- one graph decode step")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=70))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m.step(e, tok)
            torch.cuda.synchronize()
        print("--- one eager decode step")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))
        del st, e, dec


if __name__ == "__main__":
    main()
