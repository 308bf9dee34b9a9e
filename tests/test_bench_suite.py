"""bench/suite.py's per-model settings: one command runs the random 3B/7B configs and the real small models, each
with the window, sinks, chunk and precision its AHN weights and preset call for (the suite itself needs a GPU)."""
import argparse

import pytest

from bench import suite


def _flags(**kw):
    return argparse.Namespace(**({"window": None, "sinks": None, "chunk": None, "quant": None} | kw))


def test_configs_take_the_3b_presets_geometry_and_real_models_their_presets():
    g = suite.geometry("qwen2.5-3b", _flags())
    assert (g.window, g.sinks, g.chunk, g.quant) == (32640, 128, 6144, "nf4")
    for spec in ("/somewhere/SmolLM2-135M-Instruct.Q4_1.gguf+models/smollm2-135m-ahn",
                 "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf+models/qwen2.5-coder-0.5b-ahn"):
        g = suite.geometry(spec, _flags())
        # the presets' training geometry, their GPU chunk (not the CPU's 512) and bf16
        assert (g.window, g.sinks, g.chunk, g.quant) == (1984, 64, 1984, "none"), spec
    g = suite.geometry("x.gguf+models/smollm2-135m-ahn", _flags(), device="cpu")
    assert (g.window, g.sinks, g.chunk, g.quant) == (1984, 64, 512, "none")  # the preset's CPU chunk
    g = suite.geometry("x.gguf+models/smollm2-135m-ahn", _flags(chunk=512, quant="nf4", window=1000))
    assert (g.window, g.sinks, g.chunk, g.quant) == (1000, 64, 512, "nf4")  # flags win
    assert suite.label("/a/b/SmolLM2-135M-Instruct.Q4_1.gguf+models/smollm2-135m-ahn/") == \
        "SmolLM2-135M-Instruct.Q4_1.gguf+smollm2-135m-ahn"


def test_real_model_without_a_preset_needs_its_geometry(tmp_path):
    with pytest.raises(SystemExit, match="give --window and --sinks"):
        suite.geometry(f"base.gguf+{tmp_path}", _flags())
    g = suite.geometry(f"base.gguf+{tmp_path}", _flags(window=512, sinks=4))
    assert (g.window, g.sinks, g.chunk, g.quant) == (512, 4, 6144, "nf4")
