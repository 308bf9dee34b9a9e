"""The 4-bit GEMV of the decode step (`ahn_runtime/kernels/nf4.py`): its reading of the bitsandbytes weight format
against bitsandbytes itself (CPU), and the Triton kernels against that reference (GPU)."""
import pytest
import torch

from ahn_runtime.kernels import nf4

bnb = pytest.importorskip("bitsandbytes")


def linear4(N, K, bias, quant="nf4", nested=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
    m = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=torch.bfloat16, compress_statistics=nested,
                          quant_type=quant, device="meta")
    m.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=nested, quant_type=quant)
    if bias:
        m.bias = torch.nn.Parameter((torch.randn(N, generator=g) * 0.05).to(torch.bfloat16), requires_grad=False)
    return m.to(device)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_reads_the_bitsandbytes_format(quant, nested):
    """Our de-quantization (nibble order, code table, absmax blocks, nested absmax) = bitsandbytes' own, and the
    reference product = the module's forward."""
    m = linear4(40, 512, bias=True, quant=quant, nested=nested)
    p = nf4.Nf4Params.of(m)
    assert p is not None and (p.code2 is not None) == nested and p.N == 40 and p.K == 512
    d = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
    assert torch.equal(p.dequantize().to(torch.bfloat16), d)
    x = torch.randn(3, 512).to(torch.bfloat16)
    y, yb = nf4.gemv_ref(x, p), m(x)
    assert y.shape == (3, 40) and y.dtype == torch.bfloat16
    assert (y.float() - yb.float()).abs().max() <= 0.02 * yb.float().abs().max()
    assert nf4.gemv(x, p).equal(y)  # on the CPU, gemv is the reference


def test_fused_references_equal_their_parts():
    ms = [linear4(64, 256, True, seed=s) for s in range(3)]
    ps = [nf4.Nf4Params.of(m) for m in ms]
    assert nf4.same_layout(*ps)
    x = torch.randn(1, 256).to(torch.bfloat16)
    assert nf4.gemv3(x, ps).equal(torch.cat([nf4.gemv_ref(x, p) for p in ps], -1))
    g, u = nf4.Nf4Params.of(linear4(48, 256, False, seed=4)), nf4.Nf4Params.of(linear4(48, 256, False, seed=5))
    assert nf4.glu(x, g, u).equal(torch.nn.functional.silu(nf4.gemv_ref(x, g)) * nf4.gemv_ref(x, u))
    assert not nf4.same_layout(ps[0], g)  # bias presence differs: not one launch


def test_unsupported_layouts_are_declined():
    assert nf4.Nf4Params.of(torch.nn.Linear(64, 8)) is None
    m = linear4(8, 96, bias=False)  # K not a multiple of the 64-element absmax block
    assert nf4.Nf4Params.of(m) is None


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@gpu
@pytest.mark.parametrize("N,K", [(2048, 2048), (256, 2048), (11008, 2048), (2048, 11008), (512, 3584),
                                 (18944, 3584), (3584, 18944), (40, 512)])
@pytest.mark.parametrize("quant,nested,bias", [("nf4", True, False), ("nf4", True, True), ("nf4", False, True),
                                               ("fp4", True, False)])
def test_triton_gemv_matches_reference(N, K, quant, nested, bias):
    m = linear4(N, K, bias, quant, nested, device="cuda")
    p = nf4.Nf4Params.of(m)
    x = torch.randn(2, K, device="cuda").to(torch.bfloat16)
    y, ref = nf4.gemv_triton(x, p), nf4.gemv_ref(x, p)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    assert _rel(y, ref) < 1e-2
    assert _rel(m(x[:1]), ref[:1]) < 2e-2  # and bitsandbytes' own kernel agrees with the reference


@gpu
@pytest.mark.parametrize("K,Nq,Nkv,Ni", [(2048, 2048, 256, 11008), (512, 512, 256, 1024)])
def test_triton_fused_launches_match_reference(K, Nq, Nkv, Ni):
    ps = [nf4.Nf4Params.of(linear4(n, K, True, device="cuda", seed=i)) for i, n in enumerate((Nq, Nkv, Nkv))]
    x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
    assert _rel(nf4.gemv3(x, ps), nf4.gemv3_ref(x, ps)) < 1e-2
    g, u = (nf4.Nf4Params.of(linear4(Ni, K, False, device="cuda", seed=s)) for s in (7, 8))
    assert _rel(nf4.glu(x, g, u), nf4.glu_ref(x, g, u)) < 2e-2
