"""Memory planning (predicted state bytes = allocated bytes; refusal with what fits instead) and bitsandbytes
weight quantization on the CPU."""
import dataclasses
import sys

import pytest
import torch

from ahn_runtime import AHNError, AHNMemoryError, RuntimeConfig, load_model, plan_memory
from ahn_runtime.accounting import weight_bytes
from ahn_runtime.planning import state_bytes
from runtime_helpers import model_for, random_ids, tiny_random_model
from test_runtime_variants import with_random_memory


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return tiny_random_model(str(tmp_path_factory.mktemp("qwen2")), "qwen2", hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def model(qwen2_dir):
    return with_random_memory(model_for(qwen2_dir, None, window=32, sinks=4), "GatedDeltaNet")


@pytest.mark.parametrize("mode", ["ahn", "window", "full"])
@pytest.mark.parametrize("n", [3, 36, 200])
def test_predicted_state_bytes_are_the_allocated_bytes(model, mode, n):
    st = model.new_state(mode)
    plan = plan_memory(model, mode, n)
    model.prefill(st, random_ids(n, vocab=512))
    assert plan.state == st.nbytes()["total"] == state_bytes(model, mode, st.capacity)
    assert plan.fits and plan.workspace > 0
    # more tokens for an existing state: only the growth is new
    assert plan_memory(model, mode, 10, state=st).new_state == max(0, state_bytes(
        model, mode, min(st.spec.max_slots, n + 10)) - st.nbytes()["total"])


def test_full_attention_over_the_limit_is_refused_with_what_fits(model):
    w = weight_bytes(model)
    per_token_full = state_bytes(model, "full", 1) - state_bytes(model, "full", 0)
    # room for the bounded AHN state and 1,000 tokens of full-attention KV, not for 50k
    limit = w["base_weights"] + w["ahn_weights"] + plan_memory(model, "ahn", 50_000).need + 1000 * per_token_full
    m = model.with_config(dataclasses.replace(model.config, memory_limit=int(limit)))
    assert plan_memory(m, "ahn", 50_000).fits and plan_memory(m, "window", 50_000).fits
    full = plan_memory(m, "full", 50_000)
    assert not full.fits and full.need > full.available
    st = m.new_state("full")
    with pytest.raises(AHNMemoryError, match="AHN mode") as e:
        m.prefill(st, random_ids(50_000, vocab=512))
    assert "full attention over at most ~" in str(e.value)
    assert st.pos == 0 and st.capacity == 0  # nothing was allocated
    fit = int(str(e.value).split("at most ~")[1].split()[0].replace(",", ""))
    assert 1000 <= fit < 50_000
    st = m.new_state("full")  # what it says fits does fit
    m.prefill(st, random_ids(fit - 10, vocab=512))
    assert st.pos == fit - 10
    # the AHN mode takes the whole document within the same limit
    st = m.new_state("ahn")
    m.prefill(st, random_ids(3000, vocab=512), chunk_size=512)
    assert st.pos == 3000 and st.compressed == 3000 - 36


def test_fork_allocates_the_answer_once_and_counts_the_whole_copy(model):
    """`fork` copies a document's state at the size its question and answer will need: the prefill and every
    decode step then write into that one allocation (no resize), the answer equals the one decoded into a plain
    copy, and the document's state is untouched. Its memory check counts the whole copy (the base stays), where
    the prefill's check for an existing state counts only its growth."""
    ids = random_ids(120, vocab=512, seed=21)
    for mode in ("ahn", "full"):
        base = model.new_state(mode)
        model.prefill(base, ids[:60])  # ahn: window full, memory written
        before = base.clone()
        st = model.fork(base, 12, 20)
        assert st.capacity == min(base.spec.max_slots, base.n_slots + 32)
        ptr = st.k.data_ptr()
        ref = base.clone()
        la, lb = model.prefill(st, ids[60:72], max_new_tokens=20), model.prefill(ref, ids[60:72])
        assert torch.allclose(la, lb, atol=1e-5)
        for t in ids[72:92]:
            assert torch.allclose(model.step(st, int(t)), model.step(ref, int(t)), atol=1e-5)
        assert st.k.data_ptr() == ptr  # never reallocated
        assert torch.equal(base.k, before.k) and base.pos == before.pos
        if mode == "ahn":
            assert torch.equal(base.memory, before.memory) and not torch.equal(st.memory, base.memory)
    base = model.new_state("full")
    model.prefill(base, ids[:100])
    w = weight_bytes(model)
    grow, copy = (plan_memory(model, "full", 12, 20, state=base, fresh=f).need for f in (False, True))
    assert copy - grow == base.nbytes()["total"]
    m = model.with_config(dataclasses.replace(model.config, memory_limit=int(
        w["base_weights"] + w["ahn_weights"] + (grow + copy) // 2)))
    with pytest.raises(AHNMemoryError, match="need about"):
        m.fork(base, 12, 20)
    assert base.pos == 100 and base.capacity == 100


def test_invalid_memory_limit_is_refused(model):
    with pytest.raises(AHNError, match="memory limit"):
        model.with_config(dataclasses.replace(model.config, memory_limit=-5))


@pytest.mark.parametrize("mode,min_cos", [("nf4", 0.97), ("int8", 0.999), ("fp4", 0.95)])
def test_quantized_weights_on_cpu(qwen2_dir, mode, min_cos):
    pytest.importorskip("bitsandbytes")
    cfg = RuntimeConfig(window=16, sinks=4)
    ref = load_model(qwen2_dir, None, cfg, device="cpu")
    q = load_model(qwen2_dir, None, cfg, device="cpu", quantization=mode)
    from ahn_runtime.quantize import quantization_of
    assert quantization_of(q.hf) == mode and quantization_of(ref.hf) == "none" and q.ahn_info["quantization"] == mode
    assert type(q.lm_head) is torch.nn.Linear and q.embed.weight.dtype == torch.float32  # not quantized
    lin = sum(p.numel() for l in ref.layers for n, p in l.named_parameters() if n.endswith("proj.weight"))
    saved = weight_bytes(ref)["base_weights"] - weight_bytes(q)["base_weights"]
    assert saved > lin * 4 * (0.8 if mode in ("nf4", "fp4") else 0.7)  # float32 -> 4 or 8 bits
    ids = random_ids(60, vocab=512, seed=2)
    a = ref.prefill(ref.new_state("window"), ids, logits="all")
    st = q.new_state("window")
    b = q.prefill(st, ids, logits="all")
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0)
    assert min_cos < cos < 1.0  # close to the float weights, and really quantized
    assert q.step(st, 7).shape == (1, 512)


def test_quantization_errors(qwen2_dir, monkeypatch):
    with pytest.raises(AHNError, match="quantization must be one of"):
        load_model(qwen2_dir, None, device="cpu", quantization="q3")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(AHNError, match="pip install bitsandbytes"):
        load_model(qwen2_dir, None, device="cpu", quantization="nf4")
