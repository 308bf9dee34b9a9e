"""Trainer CUDA paths: FlexAttention / blocked / dense student attention (values and gradients), bf16 student
against the bf16 runtime, bf16 training steps through fla's chunk kernels (incl. <= 64 written tokens).
Skipped without a GPU."""
from __future__ import annotations

import os

import pytest
import torch

from ahn_runtime.kernels import recurrent
from ahn_runtime.loading import _ahn_tensors, build_memories, load_base, load_model
from ahn_runtime.model import RuntimeConfig
from ahn_runtime.train.forward import Distiller, init_memories
from ahn_runtime.train.kernels import _FLA_KIND, fla_backward_ok

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ORACLE = os.environ.get("AHN_ORACLE") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "oracle")
BASE = os.path.join(ORACLE, "models", "base")
AHN_DIRS = {"GatedDeltaNet": "ahn_gdn", "DeltaNet": "ahn_dn", "Mamba2": "ahn_mamba2"}


def _mems(hf, variant, dtype=torch.float32):
    d = os.path.join(ORACLE, "models", AHN_DIRS[variant])
    mems, _ = build_memories(variant, hf.config, _ahn_tensors(d), dtype, "cuda", d)
    return mems.float().requires_grad_(True)


def _ids(n, seed=0):
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_attention_impls_agree_with_gradients_fp32():
    hf, _ = load_base(BASE, torch.float32, "cuda")
    mems = _mems(hf, "GatedDeltaNet")
    ids = _ids(1024)
    res = {}
    for impl in ("dense", "blocked", "flex"):
        d = Distiller(hf, mems, attention=impl)
        mems.zero_grad(set_to_none=True)
        loss, _ = d(ids, 100, 32)
        loss.backward()
        res[impl] = (loss.item(), [p.grad.clone() for p in mems.parameters() if p.grad is not None])
    ref_loss, ref_g = res["dense"]
    for impl in ("blocked", "flex"):
        loss, g = res[impl]
        assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss), impl
        assert max(_rel(a, b) for a, b in zip(g, ref_g)) < 1e-3, impl


@pytest.mark.parametrize("variant", list(AHN_DIRS))
def test_bf16_student_matches_bf16_runtime(variant):
    hf, _ = load_base(BASE, torch.bfloat16, "cuda")
    d = Distiller(hf, _mems(hf, variant), attention="flex")
    ids = _ids(1024, seed=1)
    W, S = 200, 64
    model = load_model(BASE, os.path.join(ORACLE, "models", AHN_DIRS[variant]), RuntimeConfig(window=W, sinks=S),
                       dtype="bfloat16", device="cuda")
    ref = model.prefill(model.new_state("ahn"), ids, logits="all")
    with torch.no_grad():
        got = d.student_logits(ids, W, S)
    assert _rel(got, ref) < 2e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


@pytest.mark.parametrize("variant", list(AHN_DIRS))
def test_bf16_training(variant):
    """bf16 base, float32 AHN masters; memory through fla's chunk kernels, or through the chunk-parallel PyTorch
    kernel where fla refuses the backward (gated kernels on Hopper with Triton < 3.7.1)."""
    assert recurrent.fla_available(), "fla must be importable on the GPU machine"
    hf, _ = load_base(BASE, torch.bfloat16, "cuda")
    mems = init_memories(variant, hf.config, seed=0, device="cuda")
    d = Distiller(hf, mems, attention="flex")
    print(variant, "fla backward ok:", fla_backward_ok(_FLA_KIND[variant], "cuda:0"),
          "torch kernel:", d.uses_torch_kernel())
    if variant == "DeltaNet":
        assert not d.uses_torch_kernel()
    params = [p for p in mems.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    ids = _ids(1024, seed=2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss, _ = d(ids, 192, 64)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in params)
    assert losses[-1] < 0.8 * losses[0], losses
    # <= 64 written tokens (fla's fused-recurrent kernels have no backward: padded to the chunk kernel)
    hf32, _ = load_base(BASE, torch.float32, "cuda")
    ref = Distiller(hf32, mems, attention="dense")
    fast = Distiller(hf, mems, attention="blocked")
    short = ids[:256 + 40]
    grads = []
    for dist in (fast, ref):
        mems.zero_grad(set_to_none=True)
        loss, n = dist(short, 192, 64)
        assert n == 40
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    assert all(torch.isfinite(g).all() for g in grads[0])
    assert max(_rel(a, b) for a, b in zip(*grads)) < 0.1


def test_torch_memory_kernel_on_cuda_matches_fp32():
    hf, _ = load_base(BASE, torch.bfloat16, "cuda")
    hf32, _ = load_base(BASE, torch.float32, "cuda")
    mems = _mems(hf, "GatedDeltaNet")
    ids = _ids(1024, seed=3)
    grads = []
    for dist in (Distiller(hf, mems, attention="flex", memory_kernel="torch"),
                 Distiller(hf32, mems, attention="dense", memory_kernel="module")):
        mems.zero_grad(set_to_none=True)
        loss, _ = dist(ids, 192, 64)
        loss.backward()
        grads.append([p.grad.clone() for p in mems.parameters() if p.grad is not None])
    assert max(_rel(a, b) for a, b in zip(*grads)) < 0.1


@pytest.mark.parametrize("kind", ["gated_delta", "simple_gla"])
def test_fla_backward_with_pytorch_dqkwg_matches_pytorch_kernel(kind):
    """fla's chunk backward (with our PyTorch chunk_bwd_dqkwg where fla refuses its Triton kernel) gives the
    gradients of the chunk-parallel PyTorch recurrence, bf16 inputs, 1000 tokens (a partial last chunk)."""
    from ahn_runtime.train.fla_dqkwg import fla_refuses_gated_backward, register_backend
    from ahn_runtime.train.kernels import chunk_recurrence
    print("fla refuses the gated kernel here:", fla_refuses_gated_backward(), "registered:", register_backend())
    assert fla_backward_ok(kind, "cuda:0")
    gdr, _, sg = recurrent._fla()
    T, H, D = 1000, 4, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, v = (torch.randn(T, H, D, device="cuda", generator=gen).bfloat16() for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(T, H, D, device="cuda", generator=gen), dim=-1).bfloat16()
    g = torch.nn.functional.logsigmoid(torch.randn(T, H, device="cuda", generator=gen) + 4)
    beta = torch.rand(T, H, device="cuda", generator=gen).bfloat16()
    do = torch.randn(T, H, D, device="cuda", generator=gen)
    grads = []
    for impl in ("fla", "torch"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, g)] + [beta.detach().clone().requires_grad_()]
        qq, kk, vv, gg, bb = xs
        if impl == "fla" and kind == "gated_delta":
            o, _ = gdr.chunk_gated_delta_rule(qq[None], kk[None], vv[None], g=gg[None], beta=bb[None], scale=D ** -0.5)
        elif impl == "fla":
            o, _ = sg.chunk_simple_gla(qq[None], kk[None], vv[None], g=gg[None], scale=D ** -0.5)
        else:
            o, _ = chunk_recurrence(qq, kk, vv, gg, bb if kind == "gated_delta" else None, D ** -0.5)
        o = o.reshape(T, H, D)
        inputs = xs if kind == "gated_delta" else xs[:4]
        grads.append(torch.autograd.grad((o.float() * do).sum(), inputs))
    for name, a, b in zip("qkvgb", *grads):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 3e-2, (name, _rel(a, b))
