"""First-call cost of the fused attention backends for shapes not seen before (a script).

cuDNN builds an execution plan per problem shape (and caches it); FlashAttention-2 has no plan. Most attention
shapes of a prefill recur (every layer of a chunk, and full chunks sit at the same positions in every document),
but a document's last partial chunk and every follow-up question have new (queries, keys) lengths. This times, per
backend, the first call of such a shape and a repeat, for the blocks `window_attention` issues (q [H, T, D] with
H = 16, KV heads 2, D = 128, bf16: the 3B layout). Prints JSON (and writes $OUT/probe_attention_plans.json).

    python bench/probe_attention_plans.py
"""
import json
import os
import random
import time

import torch

from ahn_runtime.kernels import attention as A

dev, dt = "cuda", torch.bfloat16
H, Hkv, D = 16, 2, 128
rng = random.Random(0)


def once(backend, T, N, causal):
    os.environ["AHN_ATTENTION"] = backend
    q = torch.randn(H, T, D, device=dev, dtype=dt)
    k = torch.randn(Hkv, N, D, device=dev, dtype=dt)
    v = torch.randn(Hkv, N, D, device=dev, dtype=dt)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        A._sdpa_lse(q, k, v, D ** -0.5, causal=causal)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"first_ms": round(times[0], 3), "repeat_ms": round(min(times[1:]), 3)}


def main():
    for b in ("flash", "cudnn"):  # load the libraries / first kernels outside the measurement
        once(b, 256, 1024, False)
        once(b, 256, 256, True)
    cases = []
    for T in (23, 61, 700, 2048, 5000):  # a question turn ... a document's last partial chunk
        for causal in (True, False):
            N = T if causal else rng.randrange(6000, 32640)
            row = {"T": T, "N": N, "causal": causal}
            for b in ("flash", "cudnn"):
                row[b] = once(b, T, N, causal)
            cases.append(row)
            print(json.dumps(row), flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": cases}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_attention_plans.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
