"""The runtime reproduces the official AHN implementation (../shared/oracle) in float32 on CPU."""
import os
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from runtime_helpers import ORACLE, model_for, opath, oracle_cases, run_logits

CASES = oracle_cases()
pytestmark = pytest.mark.skipif(not os.path.isdir(ORACLE), reason=f"oracle vectors not found at {ORACLE}")


def _check(case, fmt, exclusion):
    inp, exp = load_file(opath(case["input"])), load_file(opath(case["expected"]))
    ids = inp["input_ids"][0]
    decode_from = int(inp["prefill_len"][0]) if case["mode"] == "decode" else None
    if fmt == "merged":
        model = model_for(opath(case["merged"]), None, window=case["window"], sinks=case["sinks"],
                          decode_exclusion=exclusion)
    else:
        model = model_for(opath(case["base"]), opath(case["ahn"]), window=case["window"], sinks=case["sinks"],
                          decode_exclusion=exclusion)
    assert model.variant == case["ahn_type"]
    got, _ = run_logits(model, ids, "ahn", decode_from)
    key = "alt_logits_prefill_semantics" if (case["mode"] == "decode" and exclusion == "consistent") else "logits"
    want = exp[key]
    got = got[exp["rows"]]
    err = (got - want).abs().max().item()
    tol = case["tolerance"]
    assert err <= tol["max_abs"] and err / want.abs().max().item() <= tol["max_rel"], (case["name"], err)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("fmt", ["ahn_only", "merged"])
def test_oracle_official(case, fmt):
    """Prefill cases, and decode cases with the official decode quirk emulated (official128)."""
    _check(case, fmt, "official128")


@pytest.mark.parametrize("case", [c for c in CASES if c["mode"] == "decode"],
                         ids=[c["name"] for c in CASES if c["mode"] == "decode"])
def test_oracle_consistent_decode(case):
    """Decode consistent with prefill semantics (the product default) against alt_logits_prefill_semantics."""
    _check(case, "ahn_only", "consistent")


def test_official_quirk_matters():
    """The two decode semantics really differ where the oracle says they do (the test above can fail)."""
    case = next(c for c in CASES if c["name"] == "gdn_decode_w32_s0_P100_N20")
    exp = load_file(opath(case["expected"]))
    assert (exp["logits"] - exp["alt_logits_prefill_semantics"]).abs().max() > 1e-2


CLI = ("{py} -m ahn_runtime logits --base {base} --ahn {ahn} --input {input} --output {output} --window {window} "
       "--sinks {sinks} --mode ahn --dtype float32 --device cpu {extra}")


@pytest.mark.slow
@pytest.mark.parametrize("only,extra,sem", [
    ("^(gdn|dn|mamba2)_prefill_w32_s8_L200$", "", "official"),
    ("^(gdn|dn|mamba2)_decode_w32_s8_P100_N20$", "--decode-from 100 --decode-exclusion official128", "official"),
    ("^gdn_decode_w32_s128_P120_N60$", "--decode-from 120", "prefill"),
])
def test_cli_check_runtime(only, extra, sem, tmp_path):
    """The official checker script drives our CLI (AHN-only + base); merged dirs via --base MERGED --ahn none."""
    cmd = CLI.format(py=shlex.quote(sys.executable), base="{base}", ahn="{ahn}", input="{input}", output="{output}",
                     window="{window}", sinks="{sinks}", extra=extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for template in (cmd, cmd.replace("--base {base} --ahn {ahn}", "--base {merged} --ahn none")):
        r = subprocess.run([sys.executable, os.path.join(ORACLE, "check_runtime.py"), "--cmd", template, "--only", only,
                            "--decode-semantics", sem], cwd=root, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 failed" in r.stdout
