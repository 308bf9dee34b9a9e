"""The fixed-shape decode step (CUDA-graph form, here run eagerly on the CPU) = the plain per-token step: logits and
final states, for every memory variant and mode, across sink filling, window filling and ring eviction."""
import os

import pytest
import torch

from ahn_runtime.decode import SPLIT, EagerDecoder, StaticDecoder
from ahn_runtime.memory import VARIANTS
from runtime_helpers import model_for, random_ids, tiny_random_model
from test_runtime_variants import with_random_memory


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return tiny_random_model(str(tmp_path_factory.mktemp("qwen2")), "qwen2")


def _states_equal(a, b, tol):
    n = a.n_slots
    assert (a.pos, a.rot, a.n_slots) == (b.pos, b.rot, b.n_slots)
    assert (a.k[:, :, :n] - b.k[:, :, :n]).abs().max() <= tol
    assert (a.v[:, :, :n] - b.v[:, :, :n]).abs().max() <= tol
    for g in a.gates:
        assert (a.gates[g][:, :n] - b.gates[g][:, :n]).abs().max() <= tol
    if a.memory is not None:
        assert (a.memory - b.memory).abs().max() <= tol * 10


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["ahn", "window", "full"])
@pytest.mark.parametrize("prompt", [2, 10, 25, 60])
def test_static_decoder_equals_step(qwen2_dir, variant, mode, prompt):
    model = with_random_memory(model_for(qwen2_dir, None, window=16, sinks=4), variant)
    ids = random_ids(prompt + 40, vocab=512, seed=prompt)
    a, b = model.new_state(mode), model.new_state(mode)
    la = model.prefill(a, ids[:prompt])[-1]
    model.prefill(b, ids[:prompt])
    dec = model.decoder(b, 40, graph=False)
    assert isinstance(dec, StaticDecoder) and b.capacity % SPLIT == 0
    worst = 0.0
    for t in ids[prompt:]:
        la = model.step(a, int(t))[-1]
        lb = dec(int(t))
        worst = max(worst, float((la - lb).abs().max()))
    assert worst < 2e-4, worst
    assert a.compressed == b.compressed and (mode == "full" or a.compressed > 0 or prompt + 40 <= 20)
    _states_equal(a, b, 1e-5)


def test_a_decoder_is_reused_on_the_buffers_it_was_made_for(qwen2_dir):
    """In a chat every answer decodes into a fresh copy of the document's state. When the copy gets the previous
    answer's memory (the allocator's usual choice on CUDA, where the decoder is a captured graph that addresses
    those buffers), the model's decoder for them is rebound to it and decodes exactly as a new one; other buffers
    get a new decoder; a kept decoder does not keep its answer's state alive; a model keeps a few."""
    import gc
    import weakref

    from ahn_runtime.state import SequenceState
    model = with_random_memory(model_for(qwen2_dir, None, window=16, sinks=4), "GatedDeltaNet")
    ids = random_ids(80, vocab=512, seed=5)
    base = model.new_state("ahn")
    model.prefill(base, ids[:10])  # sinks + window = 20: not full yet
    s1 = base.clone()
    d1 = model.decoder(s1, 20, graph=False)
    for t in ids[10:24]:  # the first answer fills the window and writes to the memory
        d1(int(t))
    # the second answer lands on the first one's buffers: a new state over the same tensors, the document again
    n = base.n_slots
    for buf, src in ((s1.k, base.k), (s1.v, base.v)):  # [L, Hkv, slots, D]
        buf.zero_()
        buf[:, :, :n] = src[:, :, :n]
    for g in base.gates:  # [L, slots, H]
        s1.gates[g].zero_()
        s1.gates[g][:, :n] = base.gates[g][:, :n]
    s1.memory.copy_(base.memory)
    s2 = SequenceState(base.spec, base.device, base.pos, base.rot, s1.k, s1.v, s1.gates, s1.memory)
    del s1
    d2 = model.decoder(s2, 20, graph=False)
    assert d2 is d1
    ref = base.clone()
    fresh = StaticDecoder(model, ref, 20, graph=False)
    assert fresh is not d1
    for t in ids[24:40]:  # from 10 slots in use (the first answer had used 20) past the window's end again
        assert torch.equal(d2(int(t)), fresh(int(t)))
    _states_equal(s2, ref, 0.0)
    assert s2.compressed > 0
    assert model.decoder(base.clone(), 20, graph=False) is not d1  # other buffers: a new decoder
    alive = weakref.ref(s2)
    del s2
    gc.collect()
    assert alive() is None and d1 in model.decoders.values()  # kept, without its state
    with pytest.raises(RuntimeError, match="freed"):
        d1(1)
    states = [base.clone() for _ in range(6)]  # alive at once: six sets of buffers
    for st in states:
        model.decoder(st, 4, graph=False)
    assert len(model.decoders) == 4


def test_static_decoder_falls_back_past_its_reservation(qwen2_dir):
    model = with_random_memory(model_for(qwen2_dir, None, window=16, sinks=4), "GatedDeltaNet")
    ids = random_ids(30, vocab=512, seed=3)
    a, b = model.new_state("full"), model.new_state("full")
    model.prefill(a, ids[:5])
    model.prefill(b, ids[:5])
    dec = model.decoder(b, 2, graph=False)  # reserved for 2 tokens; the buffer rounds up to SPLIT slots
    n = dec.scratch - b.n_slots + 3  # go past the scratch slot: the eager step takes over and grows the buffer
    for i in range(n):
        t = int(ids[5 + i % 25])
        assert (model.step(a, t)[-1] - dec(t)).abs().max() < 2e-4
    assert b.pos == a.pos and b.capacity > dec.cap


def test_official_decode_uses_the_eager_step(qwen2_dir):
    model = with_random_memory(model_for(qwen2_dir, None, window=16, sinks=4, decode_exclusion="official128"),
                               "GatedDeltaNet")
    st = model.new_state("ahn")
    model.prefill(st, random_ids(8, vocab=512))
    assert isinstance(model.decoder(st, 4), EagerDecoder)
    assert isinstance(model.decoder(st, 4, graph=False), EagerDecoder)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_step_without_eviction_leaves_the_state_exactly(qwen2_dir, variant):
    """The batched memory write runs in every fixed-shape step; in a step where no token leaves the window (here
    the capture's warm-up on the scratch slot) every layer's memory stays bit for bit, as do the valid slots,
    and decoding afterwards still equals `step`."""
    model = with_random_memory(model_for(qwen2_dir, None, window=16, sinks=4), variant)
    ids = random_ids(50, vocab=512, seed=7)
    a, b = model.new_state("ahn"), model.new_state("ahn")
    model.prefill(a, ids[:40])
    model.prefill(b, ids[:40])
    assert b.compressed > 0 and b.memory.abs().max() > 0
    dec = model.decoder(b, 10, graph=False)
    n = b.n_slots
    with torch.inference_mode():
        dec._set(3, b.pos, dec.scratch, False)
        dec._step()
    assert torch.equal(a.memory, b.memory)
    assert torch.equal(a.k[:, :, :n], b.k[:, :, :n]) and torch.equal(a.v[:, :, :n], b.v[:, :, :n])
    for g in a.gates:
        assert torch.equal(a.gates[g][:, :n], b.gates[g][:, :n])
    for t in ids[40:]:
        assert (model.step(a, int(t))[-1] - dec(int(t))).abs().max() < 2e-4
    _states_equal(a, b, 1e-5)


@pytest.mark.slow
def test_static_decoder_compiled_pieces_equal_step(qwen2_dir):
    """The torch.compile'd pieces (batched write, attention + memory read, RoPE, residual + norm, activation:
    what the CUDA graph captures), here compiled for the CPU: equal to `step` across window filling and
    eviction, with the warm-up discarded."""
    import shutil
    from ahn_runtime import decode
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    model = with_random_memory(model_for(qwen2_dir, None, window=16, sinks=4), "GatedDeltaNet")
    ids = random_ids(50, vocab=512, seed=8)
    a, b = model.new_state("ahn"), model.new_state("ahn")
    model.prefill(a, ids[:10])
    model.prefill(b, ids[:10])
    dec = model.decoder(b, 40, graph=False)
    dec._set_pieces(decode._compiled())
    for t in ids[10:]:
        assert (model.step(a, int(t))[-1] - dec(int(t))).abs().max() < 2e-4
    assert a.compressed > 0
    _states_equal(a, b, 1e-5)


def test_warm_up_is_a_no_op_without_a_gpu(qwen2_dir):
    model = with_random_memory(model_for(qwen2_dir, None, window=16, sinks=4), "GatedDeltaNet")
    assert model.warm_up() is False
