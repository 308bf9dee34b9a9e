"""CUDA paths (fla Triton kernels, fused attention) against the CPU float32 reference. Skipped without a GPU."""
import copy

import pytest
import torch

from ahn_runtime.kernels import attention as A
from ahn_runtime.kernels import recurrent as R
from runtime_helpers import gdn, model_for, opath, random_ids, run_logits, tiny_random_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.mark.parametrize("kind", ["gdn", "dn", "gla"])
@pytest.mark.parametrize("T", [1, 37, 64, 65, 300])
def test_fla_kernels_match_reference(kind, T):
    assert R.fla_available(), "fla must be importable on the GPU machine"
    g = torch.Generator().manual_seed(T)
    H, K = 4, 128
    q = R.l2norm(torch.randn(T, H, K, generator=g))
    k = R.l2norm(torch.randn(T, H, K, generator=g))
    v = torch.randn(T, H, K, generator=g)
    gate = None if kind == "dn" else -torch.rand(T, H, generator=g) * 0.3
    beta = None if kind == "gla" else torch.rand(T, H, generator=g)
    s0 = torch.randn(H, K, K, generator=g) * 0.1
    ref_o, ref_s = R.recurrent_ref(q.double(), k.double(), v.double(), gate, beta, K ** -0.5, s0.double())
    cu = [None if x is None else x.cuda() for x in (q, k, v, gate, beta)]
    o, s = R.run(cu[0].bfloat16(), cu[1].bfloat16(), cu[2].bfloat16(), cu[3],
                 None if cu[4] is None else cu[4].bfloat16(), K ** -0.5, s0.cuda(), use_fla=True)
    assert rel(o, ref_o) < 3e-2 and rel(s, ref_s) < 3e-2


@pytest.mark.parametrize("T,W,S,start", [(512, 256, 4, 1000), (2048, 32640, 128, 40000), (300, 100, 0, 0),
                                         (32, 96, 4, 96), (1024, 2048, 16, 1800)])  # (the window fills in the chunk)
@pytest.mark.parametrize("recurring", [True, False])  # cuDNN where it is the faster backend / FlashAttention-2
def test_window_attention_fused_matches_reference(T, W, S, start, recurring):
    g = torch.Generator().manual_seed(T)
    H, Hkv, D = 16, 2, 128
    q = torch.randn(T, H, D, generator=g).cuda().bfloat16()
    n_sink = min(S, start)
    w0 = min(start, max(S, start - W))
    old = torch.randn(n_sink + start - w0, Hkv, D, generator=g).cuda().bfloat16()
    oldv = torch.randn_like(old)
    k = torch.randn(T, Hkv, D, generator=g).cuda().bfloat16()
    v = torch.randn_like(k)
    blocks = [A.KeyBlock(old[:n_sink], oldv[:n_sink], 0), A.KeyBlock(old[n_sink:], oldv[n_sink:], w0),
              A.KeyBlock(k, v, start)]
    out = A.window_attention(q, start, blocks, W, S, D ** -0.5, recurring)
    kpos = torch.cat([torch.arange(n_sink), torch.arange(w0, start), torch.arange(start, start + T)]).cuda()
    ref = A.attention_ref(q.float(), torch.cat([old, k]).float(), torch.cat([oldv, v]).float(),
                          torch.arange(start, start + T).cuda(), kpos, W, S, D ** -0.5)
    assert torch.isfinite(out).all() and rel(out, ref) < 2e-2


@pytest.mark.parametrize("variant", ["gdn", "dn", "mamba2"])
def test_oracle_model_bf16_cuda_close_to_cpu_fp32(variant):
    cpu = model_for(opath("models/base"), opath(f"models/ahn_{variant}"), window=32, sinks=8)
    cu = model_for(opath("models/base"), opath(f"models/ahn_{variant}"), window=32, sinks=8, dtype="bfloat16")
    cu = type(cu)(copy.deepcopy(cu.hf).cuda(), copy.deepcopy(cu.memories).cuda(), cu.config)
    ids = random_ids(400, seed=11)
    ref, _ = run_logits(cpu, ids, decode_from=300, chunk=128)
    got, _ = run_logits(cu, ids.cuda(), decode_from=300, chunk=128)
    # the bf16 noise floor of this tiny random model, measured on the CPU (Mamba2's is ~0.987 in cosine)
    cpu16 = model_for(opath("models/base"), opath(f"models/ahn_{variant}"), window=32, sinks=8, dtype="bfloat16")
    floor, _ = run_logits(cpu16, ids, decode_from=300, chunk=128)
    cos = torch.nn.functional.cosine_similarity(got.float().cpu(), ref, dim=-1)
    cos_floor = torch.nn.functional.cosine_similarity(floor, ref, dim=-1)
    assert cos.min() > min(0.995, cos_floor.min() - 0.01), (cos.min(), cos_floor.min())
    agree = (got.cpu().argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > min(0.95, (floor.argmax(-1) == ref.argmax(-1)).float().mean() - 0.03)


@pytest.mark.parametrize("chunk", [256, 48])
def test_head_dim_128_model_fla_vs_cpu(tmp_path, chunk):
    """A random Qwen2 with 128-dim heads (as the published models) and a random non-zero GDN memory. Chunks longer
    than the window, and shorter (the window fills inside a chunk)."""
    d = tiny_random_model(str(tmp_path), "qwen2", hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=1024, num_hidden_layers=3)
    from ahn_runtime.memory import GatedDeltaNet
    mems = torch.nn.ModuleList([GatedDeltaNet(512, 4, 128) for _ in range(3)])
    gen = torch.Generator().manual_seed(0)
    for m in mems:
        m.reset_parameters(gen)
        m.o_proj.weight.data.normal_(0, 0.05, generator=gen)
    mems = mems.to(torch.bfloat16).float()  # bf16-exact weights for both sides
    cpu = model_for(d, None, window=64, sinks=4)
    cpu = type(cpu)(cpu.hf, mems, cpu.config)
    hf16 = copy.deepcopy(cpu.hf).to(torch.bfloat16).cuda()
    cu = type(cpu)(hf16, copy.deepcopy(mems).to(torch.bfloat16).cuda(), cpu.config)
    ids = random_ids(700, vocab=512, seed=3)
    ref, _ = run_logits(cpu, ids, decode_from=600, chunk=chunk)
    got, _ = run_logits(cu, ids.cuda(), decode_from=600, chunk=chunk)
    cos = torch.nn.functional.cosine_similarity(got.float().cpu(), ref, dim=-1)
    assert cos.min() > 0.995, cos.min()


def _hd128_model(tmp_path, quantization="none", variant="GatedDeltaNet", window=64, sinks=4):
    """A random Qwen2 with 128-dim heads on CUDA in bf16 (optionally 4-bit) with a random non-zero memory."""
    from ahn_runtime import AHNModel, RuntimeConfig
    from ahn_runtime.memory import VARIANTS
    from ahn_runtime.quantize import quantize_model
    d = tiny_random_model(str(tmp_path), "qwen2", hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=1024, num_hidden_layers=3)
    hf = copy.deepcopy(model_for(d, None).hf).to(torch.bfloat16)
    if quantization != "none":
        quantize_model(hf, quantization, "cuda", torch.bfloat16)
    hf = hf.cuda()
    mems = torch.nn.ModuleList([VARIANTS[variant](512, 4, 128) for _ in range(3)])
    gen = torch.Generator().manual_seed(0)
    for m in mems:
        m.reset_parameters(gen)
        m.o_proj.weight.data.normal_(0, 0.05, generator=gen)
    return AHNModel(hf, mems.to(torch.bfloat16).cuda(), RuntimeConfig(window=window, sinks=sinks, chunk_size=128))


@pytest.mark.parametrize("variant", ["GatedDeltaNet", "DeltaNet", "Mamba2"])
def test_prefill_cuda_graph_replays_the_eager_chunks(tmp_path, monkeypatch, variant):
    """Steady-state chunks replayed from the captured graph give the same state and logits as eager chunks."""
    from ahn_runtime import RuntimeConfig
    m = _hd128_model(tmp_path, variant=variant)
    m = m.with_config(RuntimeConfig(window=96, sinks=4, chunk_size=32))
    ids = random_ids(600, vocab=512, seed=12).cuda()
    for mode in ("ahn", "window"):
        a, b = m.new_state(mode), m.new_state(mode)
        la = m.prefill(a, ids)
        # chunks at 128..544 are steady (sinks and window full): the first of this shape eager, then captured
        # and replayed
        assert m.last_prefill_graph[0] == 14 and m.last_prefill_graph[1] >= 13, m.last_prefill_graph
        m.prefill(m.new_state(mode), ids)
        assert m.last_prefill_graph == (14, 14)  # a shape seen before: captured at once
        monkeypatch.setenv("AHN_PREFILL_GRAPH", "0")
        lb = m.prefill(b, ids)
        assert m.last_prefill_graph is None
        monkeypatch.delenv("AHN_PREFILL_GRAPH")
        assert a.pos == b.pos == 600 and a.n_slots == b.n_slots == 100
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
        assert all(torch.equal(a.gates[g], b.gates[g]) for g in a.gates)
        assert rel(la, lb) < 1e-3
        if mode == "ahn":
            assert rel(a.memory, b.memory) < 1e-3


@pytest.mark.parametrize("variant", ["GatedDeltaNet", "DeltaNet", "Mamba2"])
def test_compiled_prefill_pieces_match_the_eager_ones(tmp_path, monkeypatch, variant):
    """The prefill's torch.compile'd pieces (dynamic shapes: chunks of 128 and a ragged last one) against the same
    functions run eagerly (AHN_COMPILE=0), in every mode; and they really ran compiled."""
    from ahn_runtime import pieces
    m = _hd128_model(tmp_path, variant=variant)
    ids = random_ids(457, vocab=512, seed=8).cuda()
    for mode in ("ahn", "window", "full"):
        a, b = m.new_state(mode), m.new_state(mode)
        la = m.prefill(a, ids, logits="all")
        assert pieces.prefill_pieces(m.device).compiled and not pieces._FAILED
        monkeypatch.setenv("AHN_COMPILE", "0")
        assert pieces.prefill_pieces(m.device) is pieces.EAGER
        lb = m.prefill(b, ids, logits="all")
        monkeypatch.delenv("AHN_COMPILE")
        # bf16 rounding differs where the compiled kernels keep float32 between ops; the random recurrent
        # memory amplifies it over the chunks (as in the decode test below)
        assert rel(la, lb) < 0.1 and (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.9, (mode, rel(la, lb))
        assert rel(a.k, b.k) < 3e-2, rel(a.k, b.k)
        if mode == "ahn":
            assert a.compressed > 300 and rel(a.memory, b.memory) < 5e-2, rel(a.memory, b.memory)


@pytest.mark.parametrize("variant", ["GatedDeltaNet", "DeltaNet", "Mamba2"])
@pytest.mark.parametrize("mode", ["ahn", "window", "full"])
def test_cuda_graph_decode_matches_eager_step(tmp_path, variant, mode):
    """Graph replay = the fixed-shape step run eagerly (same kernels), and close to the plain step (another
    attention kernel), across window filling and eviction."""
    from ahn_runtime.decode import StaticDecoder
    m = _hd128_model(tmp_path, variant=variant)
    ids = random_ids(200, vocab=512, seed=5).cuda()
    s0 = m.new_state(mode)
    m.prefill(s0, ids[:40])  # window not yet full: decode fills it, then evicts
    a, b, c = s0.clone(), s0.clone(), s0.clone()
    ga, gb = m.decoder(a, 160), m.decoder(b, 160, graph=False)
    assert isinstance(ga, StaticDecoder) and ga.graphed and not gb.graphed and not gb.compiled
    cos_min, same = 1.0, 0.0
    for t in ids[40:].tolist():
        la, lb = ga(t).clone(), gb(t)
        lc = m.step(c, t)[-1]
        # replay (compiled pieces) == eager fixed-shape step up to bf16 rounding, which the random recurrent memory
        # amplifies over 160 steps (Mamba2 reached 0.053 on the H200, GDN/DN < 0.03)
        assert rel(la, lb) < 0.1
        cos_min = min(cos_min, torch.nn.functional.cosine_similarity(la.float(), lc.float(), 0).item())
        same += float(la.argmax() == lc.argmax()) / 160
    assert ga.graph is not None and ga.compiled and a.pos == c.pos == 200
    assert cos_min > 0.995 and same > 0.9, (cos_min, same)
    if mode == "ahn":
        assert a.compressed > 100 and rel(a.memory, c.memory) < 2e-2


def test_cuda_graph_decode_with_4bit_weights(tmp_path):
    pytest.importorskip("bitsandbytes")
    from ahn_runtime.quantize import quantization_of
    m = _hd128_model(tmp_path, quantization="nf4")
    assert quantization_of(m.hf) == "nf4"
    ids = random_ids(150, vocab=512, seed=6).cuda()
    s = m.new_state("ahn")
    m.prefill(s, ids[:100])
    e = s.clone()
    dec = m.decoder(s, 50)
    for t in ids[100:].tolist():
        la = dec(t).clone()
        lb = m.step(e, t)[-1]
        assert torch.nn.functional.cosine_similarity(la.float(), lb.float(), 0) > 0.995
    assert dec.graph is not None  # the bitsandbytes 4-bit kernels were captured


def test_prefill_out_of_memory_is_refused_or_caught_and_the_process_recovers(tmp_path):
    """On a simulated small card: refused up front with what fits instead; with the check off, the OOM is caught,
    the sequence's buffers are freed and the next request works."""
    from ahn_runtime import AHNMemoryError
    m = _hd128_model(tmp_path, window=256, sinks=4)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    ids = torch.randint(0, 512, (1_500_000,), device="cuda")
    try:
        torch.cuda.set_per_process_memory_fraction((base + (700 << 20)) / total)
        st = m.new_state("full")
        with pytest.raises(AHNMemoryError, match="What fits instead: AHN mode"):
            m.prefill(st, ids)
        assert st.capacity == 0
        st = m.new_state("full")
        with pytest.raises(AHNMemoryError, match="out of memory during the prefill"):
            m.prefill(st, ids, chunk_size=8192, check_memory=False)
        assert st.pos == 0 and st.capacity == 0
        assert torch.cuda.memory_allocated() - base < 64 << 20  # freed
        st = m.new_state("ahn")
        m.prefill(st, ids[:300_000], chunk_size=8192)  # constant memory: fits
        assert st.pos == 300_000
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.parametrize("mode", ["ahn", "full"])
def test_memory_plan_bounds_the_measured_peak(tmp_path, mode):
    from ahn_runtime import plan_memory
    m = _hd128_model(tmp_path, window=4096, sinks=64)
    m = m.with_config(type(m.config)(window=4096, sinks=64, chunk_size=2048))
    ids = torch.randint(0, 512, (60_000,), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    plan = plan_memory(m, mode, 60_000)
    st = m.new_state(mode)
    m.prefill(st, ids)
    used = torch.cuda.max_memory_allocated() - base
    assert used <= plan.need and used >= 0.3 * (plan.need - (256 << 20)), (used, plan)


@pytest.mark.parametrize("attention", ["flash", "cudnn"])
def test_requests_of_new_lengths_leave_no_device_memory_behind(tmp_path, attention, monkeypatch):
    """A long-running app answers request after request, each of a new length: prefill + graph decode must
    leave the allocated device memory where it was (no per-shape cache growing without bound)."""
    monkeypatch.setenv("AHN_ATTENTION", attention)
    m = _hd128_model(tmp_path, window=512, sinks=4)
    after = []
    for i, L in enumerate([700, 1500, 2300, 3100, 3900, 4700]):
        st = m.new_state("ahn")
        logits = m.prefill(st, torch.randint(0, 512, (L,), device="cuda"), max_new_tokens=16)
        dec = m.decoder(st, 16)
        tok = int(logits[-1].argmax())
        for _ in range(16):
            tok = int(dec(tok).argmax())
        del st, logits, dec
        import gc
        gc.collect()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    growth = [b - a for a, b in zip(after[1:], after[2:])]
    assert max(growth) < 1 << 20, [g / 2**20 for g in growth]


def test_warm_up_runs_the_memory_kernels_and_changes_nothing(tmp_path):
    from ahn_runtime import decode
    m = _hd128_model(tmp_path)
    ids = random_ids(300, vocab=512, seed=9).cuda()
    a = m.new_state("ahn")
    m.prefill(a, ids)
    assert m.warm_up() is True
    assert decode._COMPILED.get("fns") or decode._COMPILED.get("failed")  # the decode step's pieces were made
    b = m.new_state("ahn")
    m.prefill(b, ids)
    assert torch.equal(a.memory, b.memory) and a.compressed > 0
    assert m.with_config(m.config).warm_up() is True


def test_answers_reuse_the_captured_decode_step(tmp_path):
    """Each answer decodes into a fresh copy of the document's state (`fork`, as the app answers). The second
    answer's copy gets the first's memory (freed by then), so the model's captured step is rebound to it instead
    of captured again (`StaticDecoder.for_state`), and the answers decode as the eager step does."""
    m = _hd128_model(tmp_path, window=64, sinks=4)
    ids = random_ids(340, vocab=512, seed=13).cuda()
    base = m.new_state("ahn")
    m.prefill(base, ids[:300])
    ref = base.clone()
    m.prefill(ref, ids[300:310])
    want = [m.step(ref, int(t))[-1] for t in ids[310:326]]  # the eager step, before the answers allocate
    decs = []
    for _ in range(3):  # as the app answers (chat.py): a copy of the document, the question, the answer
        st = m.fork(base, 10, 16)
        ptr = st.k.data_ptr()
        m.prefill(st, ids[300:310], max_new_tokens=16)
        assert st.k.data_ptr() == ptr  # the copy was made at its final size
        dec = m.decoder(st, 16)
        got = [dec(int(t)).clone() for t in ids[310:326]]
        assert max(rel(a, b) for a, b in zip(got, want)) < 3e-2
        decs.append(dec)
        del st, dec, got
    assert decs[0].graph is not None and decs[1] is decs[0] and decs[2] is decs[0]


def test_cudnn_runs_new_shapes_only_when_they_pay_for_its_plan(monkeypatch):
    """A call that will not come again goes to cuDNN only when it is big enough to pay back the plan: a 3B
    full-attention chunk over 48k keys does (on FlashAttention-2 the 128k prefill took 8.99 s instead of 5.76 s),
    a question over the same keys does not; both agree with FlashAttention-2."""
    monkeypatch.setenv("AHN_ATTENTION", "cudnn")
    calls = []
    real = A._cudnn
    monkeypatch.setattr(A, "_cudnn", lambda q, k, v, scale, causal: calls.append(q.shape[1]) or
                        real(q, k, v, scale, causal))
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v = (torch.randn(2, 49152, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    for T, want in ((6144, [6144]), (17, [])):
        q = torch.randn(16, T, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        calls.clear()
        o, lse = A._sdpa_lse(q, k, v, 0.088)
        assert calls == want
        monkeypatch.setenv("AHN_ATTENTION", "flash")
        of, lf = A._sdpa_lse(q, k, v, 0.088)
        monkeypatch.setenv("AHN_ATTENTION", "cudnn")
        assert (o.float() - of.float()).abs().max() < 2e-2 and (lse - lf).abs().max() < 1e-2


def test_cudnn_runs_only_the_shapes_of_full_windowed_prefill_chunks(tmp_path, monkeypatch):
    """cuDNN builds a plan for every new attention shape (37-57 ms each on an H200,
    bench/probe_attention_plans.py): the full chunks of a windowed mode, whose shapes recur, use it; short
    full-attention chunks (a new number of keys with every chunk), a document's last partial chunk and a
    follow-up question go through FlashAttention-2, and the logits agree with an all-FlashAttention prefill."""
    monkeypatch.setenv("AHN_ATTENTION", "cudnn")
    monkeypatch.setenv("AHN_PREFILL_GRAPH", "0")  # every chunk through Python, so every call is seen
    rows = []  # query rows of each cuDNN call
    real = A._cudnn
    monkeypatch.setattr(A, "_cudnn", lambda q, k, v, scale, causal: rows.append(q.shape[1]) or
                        real(q, k, v, scale, causal))
    m = _hd128_model(tmp_path, window=512, sinks=4)
    C = m.config.chunk_size
    ids = random_ids(6 * C + 50, vocab=512, seed=11).cuda()
    parts = (ids[:6 * C], ids[6 * C:6 * C + 40], ids[6 * C + 40:])  # full chunks, a partial one, a question
    st = m.new_state("ahn")
    got = []
    for i, part in enumerate(parts):
        rows.clear()
        got.append(m.prefill(st, part))
        assert (len(rows) > 0) == (i == 0), (i, rows)
    rows.clear()
    m.prefill(m.new_state("full"), ids[:6 * C])
    assert rows == []
    monkeypatch.setenv("AHN_ATTENTION", "flash")
    ref = m.new_state("ahn")
    for a, part in zip(got, parts):
        b = m.prefill(ref, part)
        assert rel(a, b) < 3e-2 and (a.argmax(-1) == b.argmax(-1)).all()
