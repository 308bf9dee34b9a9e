"""4-bit GEMV (one decode token times a bitsandbytes nf4 weight): bitsandbytes' own kernel against ours
(`ahn_runtime/kernels/nf4.py`), per weight shape of Qwen2.5-3B and -7B, over a sweep of our kernel's tile
configurations. A script for the GPU machine; writes JSON.

    python bench/gemv4bit.py --out docs/bench/gemv4bit.json

Each timing is a CUDA graph of 20 back-to-back products, replayed 20 times (as in the decode graph: no launch
overhead from Python), in microseconds per product; GB/s counts the packed weight and its absmax bytes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ahn_runtime.kernels import nf4  # noqa: E402

SHAPES = {"qwen2.5-3b": [(2048, 2048), (256, 2048), (11008, 2048), (2048, 11008)],
          "qwen2.5-7b": [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)]}


def linear4(N, K, bias=False, quant="nf4", nested=True):
    import bitsandbytes as bnb
    w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
    m = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=torch.bfloat16, compress_statistics=nested,
                          quant_type=quant, device="meta")
    m.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=nested, quant_type=quant)
    if bias:
        m.bias = torch.nn.Parameter(torch.randn(N, dtype=torch.bfloat16) * 0.02, requires_grad=False)
    return m.cuda()


def graph_us(fn, reps=20, replays=20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(replays):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / (reps * replays)


def configs(K, bs):
    for bk in (256, 512, 1024):
        if K % bk or bk % bs:
            continue
        for bn in (2, 4, 8, 16):
            for nw in (2, 4, 8):
                if bn * bk // 2 >= 32 * nw:
                    yield bn, bk, nw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-3b,qwen2.5-7b")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    rows = []
    for model in a.models.split(","):
        for N, K in SHAPES[model]:
            m = linear4(N, K)
            p = nf4.Nf4Params.of(m)
            x = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
            ref = nf4.gemv_ref(x, p).float()
            err = (m(x).float() - ref).abs().max().item()
            nbytes = p.packed.numel() + p.absmax.numel() * p.absmax.element_size()
            r = {"model": model, "N": N, "K": K, "bnb_us": round(graph_us(lambda: m(x)), 2), "bnb_err": err}
            sweep = []
            for cfg in configs(K, p.blocksize):
                try:
                    e = (nf4.gemv_triton(x, p, cfg).float() - ref).abs().max().item()
                    sweep.append({"config": cfg, "us": round(graph_us(lambda: nf4.gemv_triton(x, p, cfg)), 2),
                                  "err": e})
                except Exception as ex:  # noqa: BLE001  a tile the compiler rejects
                    sweep.append({"config": cfg, "error": str(ex)[:200]})
            ok = [s for s in sweep if "us" in s]
            best = min(ok, key=lambda s: s["us"])
            default = nf4._config(N, K, p.blocksize)
            r |= {"default_config": default, "default_us": round(graph_us(lambda: nf4.gemv_triton(x, p)), 2),
                  "best": best, "GBps_best": round(nbytes / best["us"] / 1e3, 1), "sweep": sweep}
            print(json.dumps({k: v for k, v in r.items() if k != "sweep"}), flush=True)
            rows.append(r)
        # the fused launches at the default configs
        (Nq, K), (Nk, _), (Ni, _), _ = SHAPES[model]
        q, k, v = linear4(Nq, K, bias=True), linear4(Nk, K, bias=True), linear4(Nk, K, bias=True)
        g, u = linear4(Ni, K), linear4(Ni, K)
        ps = [nf4.Nf4Params.of(t) for t in (q, k, v)]
        pg, pu = nf4.Nf4Params.of(g), nf4.Nf4Params.of(u)
        x = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
        fused = {"model": model,
                 "qkv_bnb_us": round(graph_us(lambda: (q(x), k(x), v(x))), 2),
                 "qkv_ours_us": round(graph_us(lambda: nf4.gemv3_triton(x, ps)), 2),
                 "qkv_err": (nf4.gemv3_triton(x, ps).float() - nf4.gemv3_ref(x, ps).float()).abs().max().item(),
                 "glu_bnb_us": round(graph_us(lambda: torch.nn.functional.silu(g(x)) * u(x)), 2),
                 "glu_ours_us": round(graph_us(lambda: nf4.glu_triton(x, pg, pu)), 2),
                 "glu_err": (nf4.glu_triton(x, pg, pu).float() - nf4.glu_ref(x, pg, pu).float()).abs().max().item()}
        print(json.dumps(fused), flush=True)
        rows.append(fused)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
