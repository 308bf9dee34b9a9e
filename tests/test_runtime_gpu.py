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


@pytest.mark.parametrize("T,W,S,start", [(512, 256, 4, 1000), (2048, 32640, 128, 40000), (300, 100, 0, 0)])
def test_window_attention_fused_matches_reference(T, W, S, start):
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
    out = A.window_attention(q, start, blocks, W, S, D ** -0.5)
    kpos = torch.cat([torch.arange(n_sink), torch.arange(w0, start), torch.arange(start, start + T)]).cuda()
    ref = A.attention_ref(q.float(), torch.cat([old, k]).float(), torch.cat([oldv, v]).float(),
                          torch.arange(start, start + T).cuda(), kpos, W, S, D ** -0.5)
    assert rel(out, ref) < 2e-2


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


def test_head_dim_128_model_fla_vs_cpu(tmp_path):
    """A random Qwen2 with 128-dim heads (as the published models) and a random non-zero GDN memory."""
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
    ref, _ = run_logits(cpu, ids, decode_from=600, chunk=256)
    got, _ = run_logits(cu, ids.cuda(), decode_from=600, chunk=256)
    cos = torch.nn.functional.cosine_similarity(got.float().cpu(), ref, dim=-1)
    assert cos.min() > 0.995, cos.min()
