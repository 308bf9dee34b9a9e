"""cuDNN attention layouts on this GPU (a script): grouped-query heads native vs repeated vs folded into the query
axis; strided views of the state's buffers vs contiguous copies. Prints JSON (and writes $OUT/probe_cudnn.json).

    python bench/probe_cudnn.py
"""
import time, torch, json, os
from ahn_runtime.kernels.attention import _cudnn, attention_ref

dev = "cuda"; dt = torch.bfloat16
T, H, Hkv, D, W, S = 6144, 16, 2, 128, 32640, 128
G = H // Hkv
cap = S + W + T + 512
g = torch.Generator(device=dev).manual_seed(0)
q = torch.randn(T, H, D, device=dev, dtype=dt, generator=g)
K = torch.randn(Hkv, cap, D, device=dev, dtype=dt, generator=g)
V = torch.randn(Hkv, cap, D, device=dev, dtype=dt, generator=g)
N = W - T
kw, vw = K[:, S:S + N], V[:, S:S + N]  # strided [Hkv, N, D]
sc = D ** -0.5
res = {}

def tm(fn, n=10):
    fn(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3

def raw(qq, kk, vv, causal):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, True, 0.0, causal, False, scale=sc)[:2]
    return out, lse

# fold (current): qg [Hkv, G*T, D] contiguous, k contiguous
qh = q.transpose(0, 1)
def fold():
    qg = qh.reshape(Hkv, G * T, D)
    return _cudnn(qg, kw, vw, sc, False)
o_f, l_f = fold()
o_f = o_f.reshape(H, T, D); l_f = l_f.reshape(H, T)
res["fold_contig_ms"] = tm(fold)
# native GQA, contiguous
qc, kc, vc = qh.contiguous()[None], kw.contiguous()[None], vw.contiguous()[None]
try:
    o_n, l_n = raw(qc, kc, vc, False)
    res["gqa_contig_diff"] = [float((o_n[0].float() - o_f.float()).abs().max()), float((l_n[0].reshape(H, T) - l_f).abs().max())]
    res["gqa_contig_ms"] = tm(lambda: raw(qc, kc, vc, False))
except Exception as e:
    res["gqa_contig_err"] = repr(e)[:300]
# native GQA, strided q and k/v (no copies)
try:
    o_s, l_s = raw(q.transpose(0, 1)[None], kw[None], vw[None], False)
    res["gqa_strided_diff"] = [float((o_s[0].float() - o_f.float()).abs().max()), float((l_s[0].reshape(H, T) - l_f).abs().max())]
    res["gqa_strided_ms"] = tm(lambda: raw(q.transpose(0, 1)[None], kw[None], vw[None], False))
    res["gqa_strided_out_stride"] = list(o_s.stride()); res["lse_shape"] = list(l_s.shape)
except Exception as e:
    res["gqa_strided_err"] = repr(e)[:300]
# q in BSHD layout through the transpose, k contiguous
try:
    o_s2, _ = raw(q.transpose(0, 1)[None], kc, vc, False)
    res["gqa_qstrided_diff"] = float((o_s2[0].float() - o_f.float()).abs().max())
    res["gqa_qstrided_ms"] = tm(lambda: raw(q.transpose(0, 1)[None], kc, vc, False))
except Exception as e:
    res["gqa_qstrided_err"] = repr(e)[:300]
# causal block: chunk's own keys, GQA native vs repeat
kn = torch.randn(T, Hkv, D, device=dev, dtype=dt, generator=g)
vn = torch.randn(T, Hkv, D, device=dev, dtype=dt, generator=g)
def rep():
    return _cudnn(qh, kn.transpose(0, 1).repeat_interleave(G, 0), vn.transpose(0, 1).repeat_interleave(G, 0), sc, True)
o_r, l_r = rep()
res["causal_repeat_ms"] = tm(rep)
try:
    f = lambda: raw(q.transpose(0, 1)[None], kn.transpose(0, 1)[None], vn.transpose(0, 1)[None], True)
    o_c, l_c = f()
    res["causal_gqa_strided_diff"] = [float((o_c[0].float() - o_r.float()).abs().max()), float((l_c[0].reshape(H, T) - l_r).abs().max())]
    res["causal_gqa_strided_ms"] = tm(f)
except Exception as e:
    res["causal_gqa_strided_err"] = repr(e)[:300]
# reference check on a small slice: the strided GQA causal vs attention_ref
Ts = 512
qs, ks, vs = q[:Ts], kn[:Ts], vn[:Ts]
pos = torch.arange(Ts, device=dev)
ref = attention_ref(qs, ks, vs, pos, pos, float("inf"), 0, sc)
try:
    oc, _ = raw(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], True)
    res["causal_small_vs_ref"] = float((oc[0].transpose(0, 1).float() - ref.float()).abs().max())
except Exception as e:
    res["causal_small_err"] = repr(e)[:300]
# edge: flip of q rows
res["flip_q_ms"] = tm(lambda: q.flip(0))
res["copy_q_ms"] = tm(lambda: qh.contiguous())
res["copy_window_kv_ms"] = tm(lambda: (kw.contiguous(), vw.contiguous()))
print(json.dumps(res, indent=1))
out = os.environ.get("OUT")
if out:
    json.dump(res, open(f"{out}/probe_cudnn.json", "w"), indent=1)
