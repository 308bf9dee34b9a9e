"""Invariants of spec §10 on tiny models (float32, CPU)."""
import copy

import pytest
import torch

from runtime_helpers import gdn, model_for, opath, random_ids, run_logits, tiny_random_model

ATOL = 2e-4


def close(a, b, atol=ATOL):
    return (a - b).abs().max().item() <= atol


@pytest.fixture(scope="module")
def hf_base():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(opath("models/base"), dtype=torch.float32).eval()


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


@pytest.mark.parametrize("W,S", [(32, 0), (32, 8), (16, 128)])
def test_short_sequence_equals_base(hf_base, W, S):
    """Up to S+W tokens the AHN is inactive: prefill and consistent decode equal the plain base model."""
    model = gdn(window=W, sinks=S)
    L = min(S + W, 150)
    ids = random_ids(L, seed=W + S)
    ref = hf_logits(hf_base, ids)
    got, st = run_logits(model, ids, decode_from=L // 2)
    assert close(got, ref)
    assert st.compressed == 0


@pytest.mark.parametrize("variant", ["gdn", "dn", "mamba2"])
def test_zero_memory_output_equals_window_mode(variant):
    model = model_for(opath("models/base"), opath(f"models/ahn_{variant}"), window=32, sinks=8)
    zero = copy.deepcopy(model.memories)
    for m in zero:
        m.o_proj.weight.data.zero_()
    zmodel = type(model)(model.hf, zero, model.config)
    ids = random_ids(200, seed=1)
    a, _ = run_logits(zmodel, ids, "ahn", decode_from=150)
    b, _ = run_logits(model, ids, "window", decode_from=150)
    c, _ = run_logits(model, ids, "ahn", decode_from=150)
    assert close(a, b, 1e-5)
    assert not close(c, b, 1e-2)  # the real memory does change the outputs


@pytest.mark.parametrize("variant", ["gdn", "dn", "mamba2"])
@pytest.mark.parametrize("chunk", [1, 7, 39, 40, 41, 64])
def test_chunked_prefill_equals_one_shot(variant, chunk):
    """Any chunking (incl. boundaries at S+W = 40) gives the same logits and the same final state."""
    model = model_for(opath("models/base"), opath(f"models/ahn_{variant}"), window=32, sinks=8)
    ids = random_ids(150, seed=2)
    ref, st_ref = run_logits(model, ids)
    got, st = run_logits(model, ids, chunk=chunk)
    assert close(got, ref, 1e-3 if variant == "mamba2" else ATOL)  # oracle tolerances: Mamba2 2.5x looser
    assert st.pos == st_ref.pos == 150 and st.n_slots == 40
    assert (st.memory - st_ref.memory).abs().max() < 1e-4
    n = st.n_slots
    assert (st.k[:, :, :n] - st_ref.k[:, :, :n]).abs().max() < 1e-4


@pytest.mark.parametrize("mode", ["ahn", "window", "full"])
def test_prefill_then_decode_equals_one_shot(mode):
    model = gdn(window=32, sinks=4)
    ids = random_ids(120, seed=3)
    ref, _ = run_logits(model, ids, mode)
    got, st = run_logits(model, ids, mode, decode_from=30)  # decode crosses S+W and wraps the ring buffer
    assert close(got, ref)
    assert st.rot != 0 or mode == "full"
    # a prefill after decode (next chat turn) linearises the ring and still matches
    more = random_ids(50, seed=4)
    st2 = st.clone()
    tail = model.prefill(st2, more, chunk_size=16, logits="all")
    full_ref, _ = run_logits(model, torch.cat([ids, more]), mode)
    assert close(tail, full_ref[120:])


def test_boundary_and_partition():
    """Lengths S+W-1, S+W, S+W+1 write 0, 0, 1 tokens; the cache never exceeds S+W entries."""
    model = gdn(window=32, sinks=8)
    for L, written in ((39, 0), (40, 0), (41, 1), (200, 160)):
        st = model.new_state("ahn")
        model.prefill(st, random_ids(L), chunk_size=13)
        assert st.compressed == written and st.n_slots == min(L, 40)
        assert st.capacity <= 40
        pos = st.positions()
        assert sorted(pos.tolist()) == list(range(min(8, L))) + list(range(max(8, L - 32), L))


def test_memory_locality_and_causality():
    model = gdn(window=32, sinks=4)
    ids = random_ids(120, seed=5)
    base, _ = run_logits(model, ids)
    pert = ids.clone()
    pert[10] = (pert[10] + 1) % 1024  # token 10 is in memory for t >= 42
    got, _ = run_logits(model, pert)
    assert close(got[:10], base[:10], 1e-6)  # causality
    assert not close(got[60:], base[60:], 1e-3)  # reaches later positions through the memory ...
    zero = copy.deepcopy(model.memories)
    for m in zero:
        m.o_proj.weight.data.zero_()
    z = type(model)(model.hf, zero, model.config)
    zb, _ = run_logits(z, ids)
    zp, _ = run_logits(z, pert)
    # with a zero AHN, token 10 reaches position t only through attention windows: 3 layers reach 3*31 tokens
    # back (plus the sinks, which token 10 is not), so positions beyond that see no change at all
    assert close(zp[10 + 3 * 32:], zb[10 + 3 * 32:], 1e-6)
    assert not close(zp[11:40], zb[11:40], 1e-4)


def test_clone_and_save_load_identical_continuation(tmp_path):
    model = gdn(window=32, sinks=4)
    ids = random_ids(100, seed=6)
    st = model.new_state("ahn")
    model.prefill(st, ids[:80])
    model.step(st, int(ids[80]))
    c = st.clone()
    path = tmp_path / "s.safetensors"
    st.save(str(path))
    from ahn_runtime import SequenceState
    loaded = SequenceState.load(str(path), expect=model.state_spec("ahn"))
    outs = []
    for s in (st, c, loaded):
        outs.append(torch.cat([model.step(s, int(t)) for t in ids[81:]]))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError):
        SequenceState.load(str(path), expect=model.state_spec("window"))


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_full_mode_equals_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM
    d = tiny_random_model(str(tmp_path), family)
    model = model_for(d, None, window=16, sinks=2)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = random_ids(90, vocab=512, seed=7)
    ref = hf_logits(hf, ids)
    got, _ = run_logits(model, ids, "full", decode_from=50, chunk=17)
    assert close(got, ref)
    # window mode differs once the sequence exceeds S+W (and equals before)
    win, _ = run_logits(model, ids, "window")
    assert close(win[:18], ref[:18]) and not close(win[40:], ref[40:], 1e-3)


def test_state_memory_is_constant_in_ahn_mode():
    model = gdn(window=32, sinks=4)
    st = model.new_state("ahn")
    sizes = []
    for _ in range(6):
        model.prefill(st, random_ids(64), chunk_size=64)
        sizes.append(st.nbytes()["total"])
    assert len(set(sizes[1:])) == 1
    full = model.new_state("full")
    grow = []
    for _ in range(3):
        model.prefill(full, random_ids(300))
        grow.append(full.nbytes()["total"])
    assert grow[0] < grow[1] < grow[2]


@pytest.mark.parametrize("T,W,S,start", [(64, 100, 4, 500), (64, 64, 0, 300), (7, 32, 8, 40), (100, 32, 8, 0),
                                         (50, 1000, 16, 30), (33, 32, 0, 77),
                                         (32, 96, 4, 96), (16, 40, 8, 40)])  # the window fills in the chunk
def test_window_attention_matches_reference(T, W, S, start):
    """The block decomposition (full / causal / reversed-causal edge / masked) equals the dense-mask reference."""
    from ahn_runtime.kernels import attention as A
    g = torch.Generator().manual_seed(T + W)
    H, Hkv, D = 4, 2, 16
    n_sink = min(S, start)
    w0 = min(start, max(S, start - W))
    old = torch.randn(n_sink + start - w0, Hkv, D, generator=g)
    oldv = torch.randn(old.shape, generator=g)
    q = torch.randn(T, H, D, generator=g)
    k = torch.randn(T, Hkv, D, generator=g)
    v = torch.randn(T, Hkv, D, generator=g)
    blocks = [A.KeyBlock(old[:n_sink], oldv[:n_sink], 0), A.KeyBlock(old[n_sink:], oldv[n_sink:], w0),
              A.KeyBlock(k, v, start)]
    out = A.window_attention(q, start, blocks, W, S, 0.25)
    kpos = torch.cat([torch.arange(n_sink), torch.arange(w0, start), torch.arange(start, start + T)])
    ref = A.attention_ref(q, torch.cat([old, k]), torch.cat([oldv, v]), torch.arange(start, start + T), kpos, W, S,
                          0.25)
    assert close(out, ref, 1e-5)


@pytest.mark.parametrize("T,N", [(9, 4), (4, 9), (6, 6)])
def test_causal_attention_of_unequal_lengths_is_aligned_top_left(T, N):
    """`_sdpa_lse(..., causal=True)`: query t sees keys <= t for any lengths (the edge block of the chunk where the
    window fills has fewer keys than queries), grouped-query heads included."""
    from ahn_runtime.kernels import attention as A
    g = torch.Generator().manual_seed(T * N)
    q, k, v = torch.randn(4, T, 8, generator=g), torch.randn(2, N, 8, generator=g), torch.randn(2, N, 8, generator=g)
    o, lse = A._sdpa_lse(q, k, v, 0.3, causal=True)
    mask = torch.ones(T, N, dtype=torch.bool).tril()
    ro, rl = A._sdpa_lse_math(q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0), 0.3, mask=mask)
    assert o.shape == (4, T, 8) and close(o, ro, 1e-5) and close(lse, rl, 1e-5)


def test_bfloat16_on_cpu_close_to_float32():
    ref, _ = run_logits(gdn(window=32, sinks=8), random_ids(160, seed=12), decode_from=120)
    got, _ = run_logits(gdn(window=32, sinks=8, dtype="bfloat16"), random_ids(160, seed=12), decode_from=120)
    cos = torch.nn.functional.cosine_similarity(got.float(), ref, dim=-1)
    assert got.dtype == torch.float32 and cos.min() > 0.99
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_forward_with_given_positions_is_the_same_chunk():
    """`forward(..., positions=)` (how the prefill's CUDA graph passes positions in a static buffer) equals the
    default, and the steady-chunk predicate of the graph holds exactly for full chunks once sinks and window are
    full (the graph itself needs CUDA: test_runtime_gpu.py)."""
    from ahn_runtime.prefill_graph import ChunkGraph
    m = gdn(window=32, sinks=4)
    ids = random_ids(150, seed=4)
    a, b = m.new_state("ahn"), m.new_state("ahn")
    g = ChunkGraph(m, b, 16)
    steady = []
    for s in range(0, 150, 16):
        chunk = ids[s:s + 16]
        steady.append(g.applies(chunk.shape[0], "none"))
        la = m.forward(a, chunk, logits="all")
        lb = m.forward(b, chunk, logits="all", positions=torch.arange(s, s + chunk.shape[0]))
        assert torch.equal(la, lb)
    assert torch.equal(a.memory, b.memory) and torch.equal(a.k, b.k)
    # sinks + window = 36 tokens: chunks starting at 48, 64, ..., 128 are steady; the last one (6 tokens) is not
    assert steady == [s >= 36 and s + 16 <= 150 for s in range(0, 150, 16)], steady
    assert not ChunkGraph.enabled(m)  # CPU: prefill runs eagerly


def test_only_full_chunks_of_windowed_modes_are_marked_recurring(monkeypatch):
    """The prefill marks the attention of a chunk as recurring (cuDNN may plan those shapes on CUDA) only when
    its shapes come back: a full chunk of a windowed mode (the chunks that fill the window see k * C keys in every
    document, the later ones S + W + C). Full attention (more keys with every chunk: as many shapes as chunks), a
    partial chunk and a question are not (FlashAttention-2 there: test_runtime_gpu.py checks the kernels)."""
    from ahn_runtime.kernels import attention as A
    calls = []
    real = A._sdpa_lse

    def spy(q, *args, recurring=False, **kw):
        calls.append(recurring)
        return real(q, *args, recurring=recurring, **kw)
    monkeypatch.setattr(A, "_sdpa_lse", spy)
    m = gdn(window=32, sinks=4, chunk_size=16)
    ids = random_ids(90, seed=6)
    for mode in ("ahn", "window"):
        calls.clear()
        st = m.new_state(mode)
        m.prefill(st, ids[:80])  # 5 full chunks: 3 fill the sinks and the window, 2 steady
        assert calls and all(calls), mode
        calls.clear()
        m.prefill(st, ids[80:])  # 10 tokens: a partial chunk or a question
        assert calls and not any(calls), mode
    calls.clear()
    m.prefill(m.new_state("full"), ids[:80])  # full attention: every chunk sees more keys than the one before
    assert calls and not any(calls)


def test_a_state_is_one_allocation_through_clone_resize_and_release():
    """k, v, the gates and the memory of a state live in one block (`SequenceState._alloc`): on CUDA the
    caching allocator then hands a freed state's memory back whole to the next state of its size, which is what
    lets an answer reuse a captured decode step and a document a captured prefill chunk. Separate buffers came
    back permuted among blocks of one size (k and v; the gates and, for the 3B, the memory). Values survive
    every reallocation, and the views do not overlap."""
    m = gdn(window=32, sinks=4)
    ids = random_ids(60, seed=6)

    def one_block(st):
        ts = [st.k, st.v, *st.gates.values(), st.memory]
        assert len({t.untyped_storage().data_ptr() for t in ts}) == 1
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in ts)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # disjoint
        assert all(t.is_contiguous() for t in ts)

    st = m.new_state("ahn")
    one_block(st)
    m.prefill(st, ids[:50])  # reserve, window full, memory written
    one_block(st)
    assert st.memory.abs().sum() > 0
    c = st.clone()
    one_block(c)
    assert c.k.untyped_storage().data_ptr() != st.k.untyped_storage().data_ptr()
    c.resize(c.capacity + 7)
    one_block(c)
    n = st.n_slots
    assert torch.equal(c.k[:, :, :n], st.k[:, :, :n]) and torch.equal(c.memory, st.memory)
    assert all(torch.equal(c.gates[g][:, :n], st.gates[g][:, :n]) for g in st.gates)
    la, lb = m.prefill(st, ids[50:]), m.prefill(c, ids[50:])
    assert torch.allclose(la, lb) and torch.equal(c.memory, st.memory)
    c.release()
    one_block(c)
    assert c.pos == 0 and c.capacity == 0 and c.memory.abs().sum() == 0


def test_state_and_decoder_tensors_are_ordinary_even_under_inference_mode():
    """The compiled prefill pieces and decode step guard on their inputs' dispatch keys: an inference tensor and an
    ordinary one are different inputs to them. `warm_up()` runs under inference_mode and the app does not, so
    warm-up states used to be inference tensors and the first real question recompiled the memory pieces (1.2 s
    on an H200). State buffers and a decoder's static tensors are ordinary wherever they are made, and a
    prefill's resize under inference_mode keeps them so."""
    from ahn_runtime.decode import StaticDecoder
    m = gdn(window=32, sinks=4)
    ids = random_ids(60, seed=7)
    with torch.inference_mode():
        st = m.new_state("ahn")
        m.prefill(st, ids[:40], max_new_tokens=8)  # resizes inside inference_mode
        c = st.clone()
        dec = StaticDecoder(m, c, 8, graph=False)
    outside = m.new_state("ahn")
    for s_ in (st, c, outside):
        ts = [s_.k, s_.v, *s_.gates.values(), s_.memory]
        assert not any(t.is_inference() for t in ts)
    assert not any(t.is_inference() for t in (dec.tok, dec.pos, dec.slot, dec.evict, dec.keep, dec.bias))
    assert not any(t.is_inference() for t in dec._wparams.values() if isinstance(t, torch.Tensor))
    tok = int(ids[40])
    assert torch.allclose(dec(tok), m.step(st, tok)[-1], atol=1e-4)  # and it still decodes as the eager step
