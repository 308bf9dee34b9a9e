"""Matrix-vector product with a bitsandbytes 4-bit weight (nf4 or fp4, plain or double-quantized absmax).

Decode multiplies one token's activations by every 4-bit linear of the model: 252 products per token for a
3B model. bitsandbytes' own kernel (`gemm_4bit_simt`) takes about 9 us per product on an H200, far from the
bandwidth floor; this Triton kernel reads the packed weight once, at (close to) memory speed, with the
absmax de-quantization (nested or not) done in the kernel.

Weight format (bitsandbytes `Params4bit`, weight [N, K] = [out, in]): the row-major weight is cut into blocks
of `blocksize` consecutive elements; element i of a block is code[c_i] * absmax[block], c_i a 4-bit index,
two per byte (the first element in the high nibble): packed [N*K/2] uint8. With double quantization
("nested"), absmax itself is uint8: absmax[b] = code2[a_b] * absmax2[b // blocksize2] + offset.

    params = Nf4Params.of(linear)       # None if the layout is not supported (then use the module itself)
    y = gemv(x [M, K], params)          # [M, N] in x's dtype (bias added); M is small (decode: 1)

`gemv_ref` is the PyTorch reference (de-quantize, then matmul, float32); `gemv` picks the Triton kernel on
CUDA and the reference elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Nf4Params:
    packed: torch.Tensor  # [N*K/2] uint8
    absmax: torch.Tensor  # [N*K/blocksize] float32, or uint8 when nested
    code: torch.Tensor  # [16] float32
    code2: torch.Tensor | None  # [256] float32 (nested)
    absmax2: torch.Tensor | None  # [n2] float32 (nested)
    offset: float
    blocksize: int
    blocksize2: int
    N: int
    K: int
    bias: torch.Tensor | None

    @classmethod
    def of(cls, mod) -> "Nf4Params | None":
        """The 4-bit weight of a bitsandbytes Linear4bit (None for anything this kernel does not cover)."""
        w = getattr(mod, "weight", None)
        st = getattr(w, "quant_state", None)
        if st is None or getattr(st, "shape", None) is None or len(st.shape) != 2 or st.code is None:
            return None
        N, K = int(st.shape[0]), int(st.shape[1])
        bs = int(st.blocksize)
        if K % bs or bs % 32 or w.dtype != torch.uint8 or w.numel() * 2 != N * K or st.code.numel() != 16:
            return None
        nested = bool(getattr(st, "nested", False))
        if nested and (st.state2 is None or st.absmax.dtype != torch.uint8):
            return None
        dev = w.device
        return cls(packed=w.data.reshape(-1), absmax=st.absmax if nested else st.absmax.float(),
                   code=st.code.to(dev, torch.float32),
                   code2=st.state2.code.to(dev, torch.float32) if nested else None,
                   absmax2=st.state2.absmax.to(dev, torch.float32) if nested else None,
                   offset=float(st.offset) if nested else 0.0, blocksize=bs,
                   blocksize2=int(st.state2.blocksize) if nested else 1, N=N, K=K,
                   bias=None if mod.bias is None else mod.bias.data)

    def absmax_f32(self) -> torch.Tensor:
        if self.code2 is None:
            return self.absmax
        blk = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.blocksize2
        return self.code2[self.absmax.long()] * self.absmax2[blk] + self.offset

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] float32."""
        b = self.packed
        idx = torch.stack([(b >> 4).long(), (b & 15).long()], -1).reshape(-1)
        w = self.code[idx].view(-1, self.blocksize) * self.absmax_f32()[:, None]
        return w.view(self.N, self.K)


def gemv_ref(x: torch.Tensor, p: Nf4Params) -> torch.Tensor:
    """x [M, K] -> x @ W.T (+ bias) [M, N], float32 math, result in x's dtype."""
    y = x.float() @ p.dequantize().t()
    if p.bias is not None:
        y = y + p.bias.float()
    return y.to(x.dtype)


try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  no triton (the CPU build of torch): the reference is used
    triton = None

if triton is not None:
    @triton.jit
    def _rows(x_ptr, w_ptr, am_ptr, code_ptr, code2_ptr, am2_ptr, bias_ptr, offset, r0, N, K,
              NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, QB: tl.constexpr, QB2: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows r0 .. r0 + BLOCK_N of W (4-bit) times the vector x [K]: returns (y [BLOCK_N] float32, rows).
        The bytes of a row come in tiles of BLOCK_K / 2 (BLOCK_K weights, BLOCK_K / QB absmax blocks)."""
        HALF: tl.constexpr = BLOCK_K // 2
        NB: tl.constexpr = BLOCK_K // QB
        rows = r0 + tl.arange(0, BLOCK_N)
        rows_c = tl.where(rows < N, rows, 0).to(tl.int64)
        byte_off = tl.arange(0, HALF)
        blk_off = tl.arange(0, NB)
        acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
        wrow = w_ptr + rows_c[:, None] * (K // 2)
        for k0 in range(0, K, BLOCK_K):
            b = tl.load(wrow + (k0 // 2 + byte_off)[None, :])  # [BLOCK_N, HALF] uint8
            hi = tl.load(code_ptr + (b >> 4).to(tl.int32))
            lo = tl.load(code_ptr + (b & 15).to(tl.int32))
            xe = tl.load(x_ptr + k0 + 2 * byte_off).to(tl.float32)
            xo = tl.load(x_ptr + k0 + 2 * byte_off + 1).to(tl.float32)
            part = hi * xe[None, :] + lo * xo[None, :]
            part = tl.sum(tl.reshape(part, [BLOCK_N, NB, QB // 2]), axis=2)  # per absmax block
            blk = rows_c[:, None] * (K // QB) + (k0 // QB + blk_off)[None, :]
            if NESTED:
                a8 = tl.load(am_ptr + blk).to(tl.int32)
                am = tl.load(code2_ptr + a8) * tl.load(am2_ptr + blk // QB2) + offset
            else:
                am = tl.load(am_ptr + blk)
            acc += part * am
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows_c).to(tl.float32)
        return y, rows

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, am_ptr, code_ptr, code2_ptr, am2_ptr, bias_ptr, y_ptr, offset, N, K,
                     NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, QB: tl.constexpr, QB2: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[m] = W x[m]: program (i, m) computes rows i * BLOCK_N .. of row m of the output."""
        m = tl.program_id(1)
        y, rows = _rows(x_ptr + m * K, w_ptr, am_ptr, code_ptr, code2_ptr, am2_ptr, bias_ptr, offset,
                        tl.program_id(0) * BLOCK_N, N, K, NESTED, HAS_BIAS, QB, QB2, BLOCK_N, BLOCK_K)
        tl.store(y_ptr + m * N + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)

    @triton.jit
    def _gemv3_kernel(x_ptr, y_ptr, K,
                      w0, a0, c0, d0, e0, b0, o0, N0,
                      w1, a1, c1, d1, e1, b1, o1, N1,
                      w2, a2, c2, d2, e2, b2, o2, N2,
                      NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, QB: tl.constexpr, QB2: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Three weights with the same input in one launch (q, k, v): y = [W0 x, W1 x, W2 x] [N0 + N1 + N2].
        Programs 0 .. cdiv(N0, BLOCK_N) - 1 take W0, the next ones W1, then W2."""
        pid = tl.program_id(0)
        n0 = tl.cdiv(N0, BLOCK_N)
        n1 = tl.cdiv(N1, BLOCK_N)
        if pid < n0:
            y, rows = _rows(x_ptr, w0, a0, c0, d0, e0, b0, o0, pid * BLOCK_N, N0, K,
                            NESTED, HAS_BIAS, QB, QB2, BLOCK_N, BLOCK_K)
            tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N0)
        elif pid < n0 + n1:
            y, rows = _rows(x_ptr, w1, a1, c1, d1, e1, b1, o1, (pid - n0) * BLOCK_N, N1, K,
                            NESTED, HAS_BIAS, QB, QB2, BLOCK_N, BLOCK_K)
            tl.store(y_ptr + N0 + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N1)
        else:
            y, rows = _rows(x_ptr, w2, a2, c2, d2, e2, b2, o2, (pid - n0 - n1) * BLOCK_N, N2, K,
                            NESTED, HAS_BIAS, QB, QB2, BLOCK_N, BLOCK_K)
            tl.store(y_ptr + N0 + N1 + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N2)

    @triton.jit
    def _glu_kernel(x_ptr, y_ptr, K, N,
                    w0, a0, c0, d0, e0, b0, o0,
                    w1, a1, c1, d1, e1, b1, o1,
                    NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, QB: tl.constexpr, QB2: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The gated MLP's first half in one launch: y = silu(W0 x) * (W1 x) [N], the products rounded to y's
        dtype first (as the module computes them)."""
        r0 = tl.program_id(0) * BLOCK_N
        g, rows = _rows(x_ptr, w0, a0, c0, d0, e0, b0, o0, r0, N, K, NESTED, HAS_BIAS, QB, QB2, BLOCK_N, BLOCK_K)
        u, rows = _rows(x_ptr, w1, a1, c1, d1, e1, b1, o1, r0, N, K, NESTED, HAS_BIAS, QB, QB2, BLOCK_N, BLOCK_K)
        g = g.to(y_ptr.dtype.element_ty).to(tl.float32)
        u = u.to(y_ptr.dtype.element_ty).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + rows, (a * u).to(y_ptr.dtype.element_ty), mask=rows < N)


def _config(N: int, K: int, bs: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight [N, K]; chosen on an H200 (bench/profile_decode.py --gemv)."""
    bk = 512 if K % 512 == 0 and bs <= 512 else (256 if K % 256 == 0 and bs <= 256 else bs)
    bn = 4 if N <= 4096 else 8
    return bn, bk, 4


def _args(p: Nf4Params):
    d = p.absmax
    return (p.packed, p.absmax, p.code, d if p.code2 is None else p.code2, d if p.absmax2 is None else p.absmax2,
            d if p.bias is None else p.bias, p.offset)


def _flags(p: Nf4Params, config):
    bn, bk, nw = config or _config(p.N, p.K, p.blocksize)
    return dict(NESTED=p.code2 is not None, HAS_BIAS=p.bias is not None, QB=p.blocksize, QB2=p.blocksize2,
                BLOCK_N=bn, BLOCK_K=bk, num_warps=nw), bn


def same_layout(*ps: Nf4Params) -> bool:
    """Whether one launch can serve these weights (same input size, block sizes, nesting and bias presence)."""
    a = ps[0]
    return all(p.K == a.K and p.blocksize == a.blocksize and p.blocksize2 == a.blocksize2
               and (p.code2 is None) == (a.code2 is None) and (p.bias is None) == (a.bias is None) for p in ps)


def gemv_triton(x: torch.Tensor, p: Nf4Params, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    M, K = x.shape
    assert K == p.K, (x.shape, p.K)
    x = x.contiguous()
    y = torch.empty(M, p.N, dtype=x.dtype, device=x.device)
    flags, bn = _flags(p, config)
    w, a, c, d, e, b, o = _args(p)
    _gemv_kernel[(triton.cdiv(p.N, bn), M)](x, w, a, c, d, e, b, y, o, p.N, K, **flags)
    return y


def gemv3_triton(x: torch.Tensor, ps, config=None) -> torch.Tensor:
    """x [1, K] times three weights of `same_layout`: [1, N0 + N1 + N2]."""
    x = x.contiguous()
    N = sum(p.N for p in ps)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    flags, bn = _flags(ps[0], config)
    grid = (sum(triton.cdiv(p.N, bn) for p in ps),)
    args = [a for p in ps for a in (*_args(p), p.N)]
    _gemv3_kernel[grid](x, y, ps[0].K, *args, **flags)
    return y


def glu_triton(x: torch.Tensor, gate: Nf4Params, up: Nf4Params, config=None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for x [1, K]: [1, N]."""
    x = x.contiguous()
    y = torch.empty(1, gate.N, dtype=x.dtype, device=x.device)
    flags, bn = _flags(gate, config)
    _glu_kernel[(triton.cdiv(gate.N, bn),)](x, y, gate.K, gate.N, *_args(gate), *_args(up), **flags)
    return y


def gemv3_ref(x, ps):
    return torch.cat([gemv_ref(x, p) for p in ps], -1)


def glu_ref(x, gate, up):
    return torch.nn.functional.silu(gemv_ref(x, gate)) * gemv_ref(x, up)


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None


def gemv(x: torch.Tensor, p: Nf4Params) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias): the Triton kernel on CUDA (where triton imports), the reference elsewhere."""
    return gemv_triton(x, p) if use_triton(x) else gemv_ref(x, p)


def gemv3(x: torch.Tensor, ps) -> torch.Tensor:
    """x [1, K] times three weights (`same_layout`) -> [1, N0 + N1 + N2], one launch on CUDA."""
    return gemv3_triton(x, ps) if use_triton(x) else gemv3_ref(x, ps)


def glu(x: torch.Tensor, gate: Nf4Params, up: Nf4Params) -> torch.Tensor:
    """silu(x W_gate.T) * (x W_up.T) for x [1, K] -> [1, N], one launch on CUDA."""
    return glu_triton(x, gate, up) if use_triton(x) else glu_ref(x, gate, up)
