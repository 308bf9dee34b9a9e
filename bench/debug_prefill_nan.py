"""Where a CUDA prefill goes non-finite (a script; it found the window-filling chunk's bug of 2026-11-29):
a tiny random hd128 model in chunks shorter than the window (default pieces, eager pieces, FlashAttention-2),
`window_attention` on the state's strided layout against the dense reference, and a 64k prefill of the random 3B
with and without the prefill CUDA graph.

    python bench/debug_prefill_nan.py
"""
import copy, os, sys, torch
sys.path.insert(0, "tests"); sys.path.insert(0, "bench")
from runtime_helpers import model_for, random_ids, tiny_random_model
from ahn_runtime import AHNModel, RuntimeConfig
from ahn_runtime.memory import VARIANTS
from ahn_runtime.kernels import attention as A

d = tiny_random_model("/tmp/hd128", "qwen2", hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=1024, num_hidden_layers=3)
hf = copy.deepcopy(model_for(d, None).hf).to(torch.bfloat16).cuda()
mems = torch.nn.ModuleList([VARIANTS["GatedDeltaNet"](512, 4, 128) for _ in range(3)])
gen = torch.Generator().manual_seed(0)
for mm in mems:
    mm.reset_parameters(gen); mm.o_proj.weight.data.normal_(0, 0.05, generator=gen)
m = AHNModel(hf, mems.to(torch.bfloat16).cuda(), RuntimeConfig(window=96, sinks=4, chunk_size=32))
ids = random_ids(600, vocab=512, seed=12).cuda()

def scan(label):
    for mode in ("ahn", "window"):
        st = m.new_state(mode)
        st.reserve(600, exact=True)
        msg = "no nan"
        for s in range(0, 600, 32):
            m.forward(st, ids[s:s + 32], logits="none", recurring=True)
            bad = [l for l in range(3) if torch.isnan(st.k[l]).any()]
            if bad:
                msg = f"nan after chunk at {s}, layers {bad}"; break
        print(label, mode, msg, flush=True)

scan("default")
os.environ["AHN_COMPILE"] = "0"; scan("eager pieces"); del os.environ["AHN_COMPILE"]
os.environ["AHN_ATTENTION"] = "flash"; scan("flash attention"); del os.environ["AHN_ATTENTION"]

# window_attention with the state's strided layout vs the reference
def wa(T, W, S, a, H=16, Hkv=2, D=128):
    g = torch.Generator(device="cuda").manual_seed(T)
    cap = S + W + 7
    K = torch.randn(Hkv, cap, D, device="cuda", dtype=torch.bfloat16, generator=g)
    V = torch.randn(Hkv, cap, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    w0 = a - W
    blocks = [A.KeyBlock(K[:, :S].transpose(0, 1), V[:, :S].transpose(0, 1), 0),
              A.KeyBlock(K[:, S:S + W].transpose(0, 1), V[:, S:S + W].transpose(0, 1), w0), A.KeyBlock(k, v, a)]
    out = A.window_attention(q, a, blocks, W, S, D ** -0.5, recurring=True)
    kk = torch.cat([K[:, :S].transpose(0, 1), K[:, S:S + W].transpose(0, 1), k])
    vv = torch.cat([V[:, :S].transpose(0, 1), V[:, S:S + W].transpose(0, 1), v])
    kpos = torch.cat([torch.arange(S), torch.arange(w0, a), torch.arange(a, a + T)]).cuda()
    ref = A.attention_ref(q.float(), kk.float(), vv.float(), torch.arange(a, a + T).cuda(), kpos, W, S, D ** -0.5)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"window_attention T={T} W={W} S={S} H={H}: rel err {err:.2e}, nan {bool(torch.isnan(out).any())}", flush=True)
    # parts separately
    qh = q.transpose(0, 1)
    for name, (kb, vb, causal) in {"sinks": (K[:, :S], V[:, :S], False), "chunk": (k.transpose(0, 1), v.transpose(0, 1), True)}.items():
        o, l = A._sdpa_lse(qh, kb, vb, D ** -0.5, causal=causal)
        o2, l2 = A._sdpa_lse(qh.contiguous(), kb.contiguous().repeat_interleave(H // Hkv, 0), vb.contiguous().repeat_interleave(H // Hkv, 0), D ** -0.5, causal=causal)
        print(f"   part {name}: nan {bool(torch.isnan(o).any())}, diff vs contiguous-repeated {(o.float() - o2.float()).abs().max().item():.2e}, lse diff {(l - l2).abs().max().item():.2e}", flush=True)

for args in ((32, 96, 4, 200, 4, 2), (32, 96, 4, 200), (31, 96, 4, 200), (64, 96, 4, 200), (6144, 32640, 128, 50000)):
    wa(*args[:4], *(args[4:] and (args[4], args[5], 128)))

from suite import build
big = build("qwen2.5-3b", "nf4", RuntimeConfig(window=32640, sinks=128, chunk_size=6144))
ids = torch.randint(0, big.vocab_size, (65536,), device="cuda")
for env in ("1", "0"):
    os.environ["AHN_PREFILL_GRAPH"] = env
    st = big.new_state("ahn")
    lg = big.prefill(st, ids)
    print(f"3B 64k graph={env}: k nan {bool(torch.isnan(st.k).any())}, memory nan {bool(torch.isnan(st.memory).any())}, "
          f"logits finite {bool(torch.isfinite(lg).all())}, graph {big.last_prefill_graph}, argmax {int(lg.argmax())}", flush=True)
    del st
