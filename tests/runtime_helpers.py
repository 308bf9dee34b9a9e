"""Shared helpers for the runtime tests: oracle paths, cached model loading, tiny random models."""
from __future__ import annotations

import functools
import json
import os

import torch

from ahn_runtime import RuntimeConfig, load_model

ORACLE = os.environ.get("AHN_ORACLE") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "oracle"))
TEST_MODELS = os.environ.get("AHN_TEST_MODELS", os.path.expanduser("~/.cache/ahn-test-models"))
SMOLLM2 = os.path.join(TEST_MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf")


def oracle_cases() -> list[dict]:
    with open(os.path.join(ORACLE, "cases.json")) as f:
        return json.load(f)["cases"]


def opath(rel: str) -> str:
    return os.path.join(ORACLE, rel)


@functools.lru_cache(maxsize=None)
def _load(base: str, ahn: str | None, dtype: str):
    return load_model(base, ahn, RuntimeConfig(window=32, sinks=0), dtype=dtype, device="cpu")


def model_for(base: str, ahn: str | None = None, *, window=32, sinks=0, decode_exclusion="consistent",
              chunk_size=2048, dtype="float32"):
    """A model over cached weights with the given inference settings."""
    return _load(base, ahn, dtype).with_config(
        RuntimeConfig(window=window, sinks=sinks, decode_exclusion=decode_exclusion, chunk_size=chunk_size))


def gdn(**kw):
    return model_for(opath("models/base"), opath("models/ahn_gdn"), **kw)


def run_logits(model, ids: torch.Tensor, mode="ahn", decode_from=None, chunk=None):
    """Logits for every position [T, V]: prefill of the first decode_from tokens, then single steps."""
    ids = ids.reshape(-1)
    P = ids.numel() if decode_from is None else decode_from
    st = model.new_state(mode)
    out = [model.prefill(st, ids[:P], chunk_size=chunk, logits="all")]
    out += [model.step(st, int(t)) for t in ids[P:]]
    return torch.cat(out), st


def random_ids(n: int, vocab: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def tiny_random_model(tmpdir: str, family: str, seed: int = 0, **overrides) -> str:
    """Save a tiny random transformers model of a family (llama, qwen2, qwen3) to tmpdir; returns the dir."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)
    if family == "qwen3":
        cfg["head_dim"] = 32  # != hidden / heads, as in real Qwen3
    cfg.update(overrides)
    config = AutoConfig.for_model(family, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmpdir)
    return tmpdir
