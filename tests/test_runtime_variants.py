"""Every memory variant on every base family (Qwen2, Qwen3 with q/k norms, Llama), and DN == GDN with no decay."""
import pytest
import torch

from ahn_runtime import AHNModel
from ahn_runtime.memory import VARIANTS, DeltaNet, GatedDeltaNet
from runtime_helpers import model_for, random_ids, run_logits, tiny_random_model


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def family_dir(request, tmp_path_factory):
    return tiny_random_model(str(tmp_path_factory.mktemp(request.param)), request.param)


def with_random_memory(model, variant, seed=0):
    c = model.hf.config
    gen = torch.Generator().manual_seed(seed)
    mems = torch.nn.ModuleList([VARIANTS[variant](c.hidden_size, model.n_heads, model.head_dim)
                                for _ in range(model.n_layers)])
    for m in mems:
        m.reset_parameters(gen)
        m.o_proj.weight.data.normal_(0, 0.2, generator=gen)
    return AHNModel(model.hf, mems, model.config)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_on_family_invariants(family_dir, variant):
    model = with_random_memory(model_for(family_dir, None, window=24, sinks=4), variant)
    ids = random_ids(120, vocab=512, seed=1)
    ref, st = run_logits(model, ids)
    assert st.compressed == 120 - 28
    chunked, _ = run_logits(model, ids, chunk=9)
    decoded, _ = run_logits(model, ids, decode_from=20)
    assert (chunked - ref).abs().max() < 5e-4 and (decoded - ref).abs().max() < 5e-4
    full, _ = run_logits(model, ids, "full")
    win, _ = run_logits(model, ids, "window")
    assert (ref[:28] - full[:28]).abs().max() < 5e-4  # short = base
    assert (ref[40:] - win[40:]).abs().max() > 1e-2  # the memory contributes


def test_deltanet_equals_gated_with_zero_decay():
    dn = DeltaNet(64, 4, 16)
    dn.reset_parameters(torch.Generator().manual_seed(0))
    dn.o_proj.weight.data.normal_(0, 0.3)
    g = GatedDeltaNet(64, 4, 16)
    g.reset_parameters(torch.Generator().manual_seed(1))
    g.load_state_dict(dn.state_dict(), strict=False)
    g.A_log.data.fill_(-1e4)  # exp(A_log) = 0: no decay
    x = torch.randn(30, 64)
    q, k, v = torch.randn(30, 4, 16), torch.randn(30, 4, 16), torch.randn(30, 4, 16)
    s0 = torch.randn(4, 16, 16)
    with torch.no_grad():
        a, sa = dn(q, k, v, dn.gates(x), x, s0)
        b, sb = g(q, k, v, g.gates(x), x, s0)
    assert (a - b).abs().max() < 1e-5 and (sa - sb).abs().max() < 1e-5


@pytest.mark.parametrize("gated,delta", [(True, True), (False, True), (True, False)])
def test_batched_write_equals_reference_update(gated, delta):
    """recurrent.write_ref (one token into N states, the batched decode write of all layers) == the state update
    of the per-token reference recurrence, head by head."""
    from ahn_runtime.kernels import recurrent
    gen = torch.Generator().manual_seed(0)
    N, K, V = 12, 8, 16
    S0 = torch.randn(N, K, V, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(N, K, generator=gen), dim=-1)
    v = torch.randn(N, V, generator=gen)
    g = -torch.rand(N, generator=gen) if gated else None
    beta = torch.rand(N, generator=gen) if delta else None
    _, ref = recurrent.recurrent_ref(torch.zeros(1, N, K), k[None], v[None], None if g is None else g[None],
                                     None if beta is None else beta[None], 1.0, S0)
    got = recurrent.write_ref(k, v, g, beta, S0.clone())
    assert (got - ref).abs().max() < 1e-5
