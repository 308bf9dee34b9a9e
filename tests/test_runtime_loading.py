"""Loader validation (spec §3.6, §3.7, §6) and clear errors on bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ahn_runtime import AHNError, RuntimeConfig, load_model
from ahn_runtime.memory import VARIANTS
from runtime_helpers import SMOLLM2, opath, random_ids, run_logits, tiny_random_model


@pytest.mark.parametrize("variant,counts", [
    ("GatedDeltaNet", (12_982_464, 21_280_560, 60_960_384)),
    ("DeltaNet", (11_801_088, 18_468_352, 51_124_224)),
    ("Mamba2", (11_872_512, 18_568_256, 51_371_520)),
])
def test_parameter_counts_match_published_checkpoints(variant, counts):
    shapes = [(2048, 36, 16), (3584, 28, 28), (5120, 48, 40)]  # Qwen2.5 3B / 7B / 14B, head_dim 128
    cls = VARIANTS[variant]
    for (h, L, H), n in zip(shapes, counts):
        assert L * cls.param_count(h, H, 128) == n
    m = cls(2048, 16, 128)  # the modules really have that many parameters
    assert sum(p.numel() for p in m.parameters()) == cls.param_count(2048, 16, 128)


def copy_ahn(tmp_path, name="ahn_gdn"):
    d = tmp_path / name
    shutil.copytree(opath(f"models/{name}"), d)
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o644)
    return d


def edit_config(d, **kv):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


BASE = opath("models/base")


@pytest.mark.parametrize("edit,msg", [
    ({"use_q_proj": True}, "use_q_proj"),
    ({"use_ahn_router": True}, "use_ahn_router"),
    ({"fa_layer_ids": "0,2"}, "fa_layer_ids"),
    ({"_ahn_implementation": "RWKV7"}, "unsupported"),
    ({"hidden_size": 256}, "different base"),
])
def test_unsupported_or_mismatched_configs(tmp_path, edit, msg):
    d = copy_ahn(tmp_path)
    edit_config(d, **edit)
    with pytest.raises(AHNError, match=msg):
        load_model(BASE, str(d), RuntimeConfig(window=32, sinks=0), device="cpu")


def test_missing_and_stray_tensors(tmp_path):
    d = copy_ahn(tmp_path)
    t = load_file(str(d / "model.safetensors"))
    missing = dict(t)
    del missing["model.layers.1.ahn.fn.a_proj.weight"]
    save_file(missing, str(d / "model.safetensors"))
    with pytest.raises(AHNError, match="missing model.layers.1.ahn.fn.a_proj.weight"):
        load_model(BASE, str(d), device="cpu")
    stray = dict(t)
    stray["model.layers.0.ahn.fn.q_proj.weight"] = torch.zeros(4, 32, 32)
    save_file(stray, str(d / "model.safetensors"))
    with pytest.raises(AHNError, match="unexpected AHN tensors"):
        load_model(BASE, str(d), device="cpu")
    bad = dict(t)
    bad["model.layers.0.ahn.fn.o_proj.weight"] = torch.zeros(4, 32, 16)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(AHNError, match="shape"):
        load_model(BASE, str(d), device="cpu")


def test_ahn_for_another_base(tmp_path):
    other = tiny_random_model(str(tmp_path / "other"), "qwen2", hidden_size=64)
    with pytest.raises(AHNError, match="different base"):
        load_model(other, opath("models/ahn_gdn"), device="cpu")


def test_bad_paths_and_settings(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AHNError, match="not found"):
        load_model("/nonexistent/model", None, device="cpu")
    with pytest.raises(AHNError, match="could not load base model"):
        load_model("no-such-org/no-such-model", None, device="cpu")
    with pytest.raises(AHNError, match="AHN checkpoint not found"):
        load_model(BASE, "/nonexistent/ahn", device="cpu")
    with pytest.raises(AHNError, match="could not fetch AHN checkpoint"):  # a Hub id, offline
        load_model(BASE, "ByteDance-Seed/AHN-GDN-for-Qwen-2.5-Instruct-3B", device="cpu")
    with pytest.raises(AHNError, match="window"):
        load_model(BASE, None, RuntimeConfig(window=0), device="cpu")
    with pytest.raises(AHNError, match="sinks"):
        load_model(BASE, None, RuntimeConfig(sinks=-1), device="cpu")
    plain = load_model(BASE, None, RuntimeConfig(window=32, sinks=0), device="cpu")
    with pytest.raises(AHNError, match="no AHN weights"):
        plain.new_state("ahn")
    with pytest.raises(AHNError, match="unknown mode"):
        plain.new_state("sparse")


def test_bf16_load_keeps_ahn_tensors_bf16():
    m = load_model(BASE, opath("models/ahn_gdn"), RuntimeConfig(window=32, sinks=0), dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in m.memories.parameters())
    assert m.ahn_info["params"] == 3 * VARIANTS["GatedDeltaNet"].param_count(128, 4, 32)
    assert m.ahn_info["config_sliding_window"] == 256  # read from the checkpoint, not applied (spec D2)


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ahn_runtime", *args], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), **kw)


def test_cli_errors(tmp_path):
    empty = tmp_path / "empty.safetensors"
    save_file({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, str(empty))
    r = cli("logits", "--base", BASE, "--ahn", opath("models/ahn_gdn"), "--input", str(empty), "--output",
            str(tmp_path / "o.safetensors"), "--window", "32", "--sinks", "0", "--mode", "ahn")
    assert r.returncode == 2 and "empty input" in r.stderr and "Traceback" not in r.stderr
    r = cli("logits", "--base", "/no/such/dir", "--input", str(empty), "--output", "x", "--window", "32",
            "--sinks", "0", "--mode", "full")
    assert r.returncode == 2 and "empty input" in r.stderr  # input is checked before the model loads
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": random_ids(10)[None]}, str(ids))
    r = cli("logits", "--base", "/no/such/dir", "--input", str(ids), "--output", "x", "--window", "32",
            "--sinks", "0", "--mode", "full")
    assert r.returncode == 2 and "model not found" in r.stderr
    r = cli("logits", "--base", BASE, "--input", str(ids), "--output", "x", "--window", "0", "--sinks", "0",
            "--mode", "full")
    assert r.returncode == 2 and "window must be" in r.stderr
    r = cli("logits", "--base", BASE, "--ahn", opath("models/ahn_dn"), "--input", str(ids), "--output",
            str(tmp_path / "o.safetensors"), "--window", "4", "--sinks", "1", "--mode", "ahn", "--decode-from", "6")
    assert r.returncode == 0, r.stderr
    assert load_file(str(tmp_path / "o.safetensors"))["logits"].shape == (10, 1024)


needs_smollm2 = pytest.mark.skipif(not os.path.isfile(SMOLLM2), reason=f"real test model missing: {SMOLLM2} "
                                   "(run ../shared/tools/fetch-test-models)")


@needs_smollm2
def test_real_gguf_llama_model_full_mode_equals_transformers():
    """SmolLM2-135M-Instruct (Llama family) from its GGUF: our forward equals transformers' own."""
    from transformers import AutoModelForCausalLM
    model = load_model(SMOLLM2, None, RuntimeConfig(window=48, sinks=4), dtype="float32", device="cpu")
    assert model.family == "llama" and model.tokenizer is not None
    hf = model.hf
    ids = torch.tensor(model.tokenizer("The hippocampus compresses long-term memories. " * 8)["input_ids"])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    got, _ = run_logits(model, ids, "full", decode_from=len(ids) - 10, chunk=32)
    assert (got - ref).abs().max() < 2e-3
    win, _ = run_logits(model, ids, "window", chunk=16)
    win1, _ = run_logits(model, ids, "window", decode_from=20)
    assert (win - win1).abs().max() < 2e-3
    assert (win[:52] - ref[:52]).abs().max() < 2e-3 and (win[60:] - ref[60:]).abs().max() > 1e-2
