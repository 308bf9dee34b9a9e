"""Benchmark suite (GPU): our runtime in `ahn` and `full` modes against transformers' own `generate` (sdpa),
measured in the same run, on random weights of the real Qwen2.5 shapes (4-bit nf4 by default), plus a simulated
8 GiB card. A script, not a test.

    python bench/suite.py --out docs/bench            # the default plan (3B and 7B), JSON + markdown
    python bench/suite.py --models qwen2.5-3b,qwen2.5-7b,$M/SmolLM2-135M-Instruct.Q4_1.gguf+models/smollm2-135m-ahn,\
$M/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf+models/qwen2.5-coder-0.5b-ahn   # and the real small models
        # ($M: where ../shared/tools/fetch-test-models put them); each model runs with its own window, sinks,
        # chunk and precision (`geometry`: the 3B presets' for the configs, the matching preset's for real models)
    python bench/suite.py --plot docs/bench/suite_2026-11-28.json --img docs/img   # plots from a JSON (matplotlib)

For each (model, mode, context length): time to first token (prefill of the whole context + the first token's
logits), prefill tokens/s, decode ms/token (64 greedy tokens after 4 warm-up tokens, each token read back to the
host as a chat stream does), peak allocated and reserved memory, and our memory plan's prediction. Requests that
the memory plan refuses are recorded with the refusal message.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from ahn_runtime import AHNModel, RuntimeConfig, plan_memory  # noqa: E402
from ahn_runtime.memory import VARIANTS  # noqa: E402
from ahn_runtime.planning import AHNMemoryError  # noqa: E402

GiB = 1 << 30
K = 1024

# public configurations of the real models (random weights are built from these)
CONFIGS = {
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # SmolLM2-135M's shape (random weights: the kernel-count / launch-overhead regime of the real small models)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=True),
}


def build(name: str, quant: str, cfg: RuntimeConfig, variant: str = "GatedDeltaNet",
          device: str = "cuda") -> AHNModel:
    """Random weights of a real shape, built on the GPU (or `device`) in bf16 and quantized there (4-bit: 1/4 the
    memory)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ahn_runtime.quantize import quantize_model
    c = Qwen2Config(**CONFIGS[name], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    c._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf = Qwen2ForCausalLM(c).eval().requires_grad_(False)
            H, h = c.num_attention_heads, c.hidden_size
            mems = torch.nn.ModuleList([VARIANTS[variant](h, H, h // H) for _ in range(c.num_hidden_layers)])
    finally:
        torch.set_default_dtype(prev)
    for m in mems:
        m.reset_parameters()
        m.o_proj.weight.data.normal_(0, 0.02)  # a working (non-zero) memory, as after training
    if quant != "none":
        quantize_model(hf, quant, device, torch.bfloat16)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    gc.collect()
    torch.cuda.empty_cache()
    return AHNModel(hf, mems.to(torch.bfloat16).eval().requires_grad_(False), cfg, model_id=f"random-{name}-{quant}")


def _reset():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()


def ours(model: AHNModel, mode: str, L: int, steps: int) -> dict:
    _reset()
    base = torch.cuda.memory_allocated()
    ids = torch.randint(0, model.vocab_size, (L,), device="cuda")
    r = {"impl": "ours", "mode": mode, "tokens": L}
    plan = plan_memory(model, mode, L, steps + 8)
    r["predicted_peak_gib"] = round((base + plan.need) / GiB, 3)
    state = model.new_state(mode)
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model.prefill(state, ids, max_new_tokens=steps + 8)
        tok = int(logits[-1].argmax())
        ttft = time.perf_counter() - t0
    except AHNMemoryError as e:
        return r | {"refused": str(e)}
    dec = model.decoder(state, steps + 8)
    for _ in range(4):  # warm-up (captures the CUDA graph)
        tok = int(dec(tok).argmax())
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(steps):
        tok = int(dec(tok).argmax())
    d = (time.perf_counter() - t1) / steps
    r |= {"ttft_s": round(ttft, 3), "prefill_tok_per_s": round(L / ttft), "decode_ms_per_token": round(d * 1e3, 3),
          "decode_graph": bool(getattr(dec, "graph", None) is not None),
          "prefill_graph": model.last_prefill_graph,
          "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
          "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3),
          "weights_gib": round(base / GiB, 3), "state_mib": round(state.nbytes()["total"] / 2**20, 1)}
    del state, logits, dec
    return r


class _Clock:
    """A generate() streamer that timestamps every new token (the first put() is the prompt)."""

    def __init__(self):
        self.times = []
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    def end(self):
        pass


def baseline(model: AHNModel, L: int, steps: int) -> dict:
    """transformers' own generate (sdpa, its dynamic KV cache, greedy) on the same weights."""
    _reset()
    base = torch.cuda.memory_allocated()
    ids = torch.randint(0, model.vocab_size, (1, L), device="cuda")
    r = {"impl": "transformers", "mode": "full", "tokens": L}
    clock = _Clock()
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                              min_new_tokens=steps + 1, do_sample=False, streamer=clock)
    except torch.OutOfMemoryError as e:
        _reset()
        return r | {"error": "out of memory: " + str(e).splitlines()[0][:160]}
    ttft = clock.times[0] - t0
    d = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
    r |= {"ttft_s": round(ttft, 3), "prefill_tok_per_s": round(L / ttft), "decode_ms_per_token": round(d * 1e3, 3),
          "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
          "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3), "weights_gib": round(base / GiB, 3)}
    return r


def lengths(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        if x:
            out.append(int(float(x[:-1]) * K) if x.endswith("k") else int(float(x[:-1]) * K * K) if x.endswith("m")
                       else int(x))
    return out


def label(name: str) -> str:
    """A config name, or 'BASE[+AHN_DIR]' shortened to the file / directory names (tables and plots)."""
    if name in CONFIGS:
        return name
    return "+".join(os.path.basename(os.path.normpath(p)) for p in name.split("+"))


def load_real(spec: str, quant: str, cfg: RuntimeConfig) -> AHNModel:
    """A real model: 'BASE[+AHN_DIR]' (HF id or directory, or .gguf file; AHN-only checkpoint directory)."""
    from ahn_runtime import load_model
    base, _, ahn = spec.partition("+")
    model = load_model(base, ahn or None, cfg, device="cuda", quantization=None if quant == "none" else quant)
    model.hf.generation_config.eos_token_id = None
    model.hf.generation_config.pad_token_id = 0
    return model


CONFIG_GEOMETRY = dict(window=32640, sinks=128, chunk=6144, quant="nf4")  # the 3B presets' (7B: see --sim-*)


def geometry(name: str, a, device: str = "cuda") -> argparse.Namespace:
    """Window, sinks, chunk and quantization for one model: the flags where given, else for a random-weight config
    the 3B presets' (nf4), and for a real model 'BASE+AHN_DIR' those of the preset with that AHN directory
    (models/presets.json: on CUDA its GPU chunk and its quantization, on the CPU its chunk, unquantized), so that
    one command can run the 3B/7B configs and the real small models, each with the geometry its AHN weights were
    trained for."""
    cuda = device.startswith("cuda")
    g = dict(CONFIG_GEOMETRY)
    if name not in CONFIGS:
        _, _, ahn = name.partition("+")
        with open(os.path.join(os.path.dirname(HERE), "models", "presets.json")) as f:
            presets = json.load(f)["presets"].values()
        want = os.path.normpath(os.path.abspath(ahn)) if ahn else None
        match = [p for p in presets if want and isinstance(p.get("ahn"), str)
                 and os.path.normpath(os.path.join(os.path.dirname(HERE), p["ahn"])) == want]
        if match:
            p = match[0]
            g = dict(window=p["window"], sinks=p["sinks"],
                     chunk=(p.get("chunk_size_cuda") if cuda else None) or p["chunk_size"],
                     quant=p.get("quantization", "none") if cuda else "none")
        elif None in (a.window, a.sinks):
            sys.exit(f"no preset has the AHN weights of {name!r}: give --window and --sinks")
    for k in ("window", "sinks", "chunk", "quant"):
        if getattr(a, k) is not None:
            g[k] = getattr(a, k)
    return argparse.Namespace(**(vars(a) | g))


def run_model(a, name, quant, results, meta):
    cfg = RuntimeConfig(window=a.window, sinks=a.sinks, chunk_size=a.chunk)
    t0 = time.perf_counter()
    model = build(name, quant, cfg) if name in CONFIGS else load_real(name, quant, cfg)
    print(f"# built {name} {quant} in {time.perf_counter() - t0:.1f} s; weights "
          f"{torch.cuda.memory_allocated() / GiB:.2f} GiB", flush=True)
    # warm-up: every kernel shape once (fla autotuning, cuBLAS plans) at a length with full memory chunks
    ours(model, "ahn", a.sinks + a.window + 3 * a.chunk, 8)
    ours(model, "full", 2 * a.chunk, 8)
    baseline(model, 2 * a.chunk, 4)
    plan = [("ours", "ahn", L) for L in lengths(a.ahn_lengths)] + \
           [("ours", "full", L) for L in lengths(a.full_lengths)] + \
           [("transformers", "full", L) for L in lengths(a.hf_lengths)]
    if name == "qwen2.5-7b" and quant == "nf4":  # the 7B runs: fewer lengths (device time)
        plan = [p for p in plan if p[2] in lengths(a.lengths_7b)]
    if a.only_sim:
        plan = []
    for impl, mode, L in plan:
        r = ours(model, mode, L, a.steps) if impl == "ours" else baseline(model, L, a.steps)
        r |= {"model": label(name), "quant": quant, "window": a.window, "sinks": a.sinks, "chunk": a.chunk}
        r |= {} if name in CONFIGS else {"spec": name}
        results.append(r)
        print(json.dumps(r), flush=True)
        save(a, meta, results)
    if a.sim_gib and name == a.sim_model:
        total = torch.cuda.get_device_properties(0).total_memory
        sim = model.with_config(RuntimeConfig(window=a.sim_window, sinks=a.sinks, chunk_size=a.sim_chunk))
        ours(sim, "ahn", a.sinks + a.sim_window + 3 * a.sim_chunk, 8)  # warm-up of this geometry
        _reset()
        torch.cuda.set_per_process_memory_fraction(a.sim_gib * GiB / total)
        try:
            for mode in ("ahn", "full"):
                r = ours(sim, mode, lengths(a.sim_length)[0], a.steps)
                r |= {"model": name, "quant": quant, "simulated_card_gib": a.sim_gib, "window": a.sim_window,
                      "chunk": a.sim_chunk}
                results.append(r)
                print(json.dumps(r), flush=True)
                save(a, meta, results)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
    del model
    _reset()


def save(a, meta, results):
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"suite_{meta['date']}{a.tag}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(path[:-5] + ".md", "w") as f:
        f.write(table(results))


def table(results) -> str:
    base = {(r["model"], r["quant"], r["tokens"]): r for r in results
            if r["impl"] == "transformers" and "ttft_s" in r}
    lines = ["| model | impl | mode | tokens | TTFT s | prefill tok/s | decode ms/tok | peak alloc GiB | "
             "predicted GiB | vs transformers (TTFT / decode) |", "|" + "---|" * 10]
    for r in results:
        card = (f" (simulated {r['simulated_card_gib']} GiB card, W={r['window']}, chunk {r['chunk']})"
                if "simulated_card_gib" in r else "")
        head = f"| {r['model']} {r['quant']}{card} | {r['impl']} | {r['mode']} | {r['tokens']:,} |"
        if "ttft_s" not in r:
            lines.append(head + f" {r.get('refused') or r.get('error')} | | | | | |")
            continue
        b = base.get((r["model"], r["quant"], r["tokens"]))
        ratio = (f"{r['ttft_s'] / b['ttft_s']:.2f}x / {r['decode_ms_per_token'] / b['decode_ms_per_token']:.2f}x"
                 if b and r["impl"] == "ours" else "")
        lines.append(head + f" {r['ttft_s']:.2f} | {r['prefill_tok_per_s']:,} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['peak_allocated_gib']:.2f} | {r.get('predicted_peak_gib', '')} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(path: str, img: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        res = json.load(f)["results"]
    os.makedirs(img, exist_ok=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    for key, ylabel, fn in (("peak_allocated_gib", "peak allocated (GiB)", "memory"),
                            ("ttft_s", "time to first token (s)", "ttft"),
                            ("decode_ms_per_token", "decode (ms/token)", "decode")):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        groups = {}
        for r in res:
            if key in r and "simulated_card_gib" not in r:
                groups.setdefault(f"{r['model']} {r['quant']} {r['impl']} {r['mode']}", []).append(r)
        for label, rs in sorted(groups.items()):
            rs.sort(key=lambda r: r["tokens"])
            ax.plot([r["tokens"] for r in rs], [r[key] for r in rs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out = os.path.join(img, f"{stem}_{fn}.png")
        fig.savefig(out, dpi=110)
        print(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-3b,qwen2.5-7b",
                    help="config names (random weights: " + ", ".join(CONFIGS) + ") or real models as BASE[+AHN_DIR], "
                    "e.g. SmolLM2-135M-Instruct.Q4_1.gguf+models/smollm2-135m-ahn (window, sinks, chunk and "
                    "quantization then come from the preset with that AHN directory)")
    ap.add_argument("--quant", default=None, help="none | nf4 | fp4 | int8 (bitsandbytes), or a comma list; default: "
                    "nf4 for the configs, the preset's for real models")
    ap.add_argument("--ahn-lengths", default="8k,32k,128k,512k,1m")
    ap.add_argument("--full-lengths", default="8k,32k,128k")
    ap.add_argument("--hf-lengths", default="8k,32k,128k")
    ap.add_argument("--lengths-7b", default="32k,128k", help="lengths measured for the 7B model")
    ap.add_argument("--window", type=int, default=None, help="default: 32640 for the configs, the preset's for "
                    "real models")
    ap.add_argument("--sinks", type=int, default=None, help="default: 128, or the preset's")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk; default: 6144 (the 3B presets'; 4096 in "
                    "the first runs), or the preset's GPU chunk")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed")
    ap.add_argument("--sim-gib", type=float, default=7.5, help="simulated card: memory the process may use "
                    "(an 8 GiB card less ~0.5 GiB of CUDA context); 0 = skip")
    ap.add_argument("--sim-model", default="qwen2.5-7b")
    ap.add_argument("--sim-window", type=int, default=8064, help="window of the 8 GiB configuration (+ sinks)")
    ap.add_argument("--sim-chunk", type=int, default=2048)
    ap.add_argument("--sim-length", default="128k")
    ap.add_argument("--only-sim", action="store_true", help="only the simulated-card runs")
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--tag", default="")
    ap.add_argument("--plot", default=None, help="only plot this JSON")
    ap.add_argument("--img", default="docs/img")
    a = ap.parse_args()
    if a.plot:
        plot(a.plot, a.img)
        return
    if not torch.cuda.is_available():
        sys.exit("bench/suite.py needs a CUDA GPU")
    import transformers
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GiB, 1),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "window": a.window, "sinks": a.sinks, "chunk": a.chunk, "quant": a.quant, "decode_steps": a.steps,
            "command": " ".join(["python"] + sys.argv)}
    try:
        import bitsandbytes
        meta["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    print(json.dumps(meta), flush=True)
    results = []
    for name in a.models.split(","):
        g = geometry(name, a)
        for quant in g.quant.split(","):
            run_model(g, name, quant, results, meta)
    print(table(results))


if __name__ == "__main__":
    main()
