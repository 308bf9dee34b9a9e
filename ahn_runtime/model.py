"""Our forward pass over a Hugging Face decoder (Qwen2, Qwen3, Llama families) with an optional AHN memory.

The transformers model only provides the weights and its small modules (embeddings, RMSNorms, projections,
MLP, rotary embedding, lm_head); attention, caches and memory are ours. One sequence at a time.

    forward(state, ids [T], logits=...)  any chunk of new tokens (prefill; keys sorted, no dense mask)
    step(state, token)                   one token (decode; ring buffer, fixed shapes once the window is full)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .kernels import recurrent
from .kernels.attention import KeyBlock, decode_attention, window_attention
from .memory.base import stack_write_params, write_layers
from .pieces import apply_rope, prefill_pieces
from .prefill_graph import ChunkGraph
from .state import MODES, SequenceState, StateSpec

FAMILIES = ("qwen2", "qwen3", "llama")


@dataclass
class RuntimeConfig:
    """Inference settings chosen at load time (spec §5.3 defaults)."""
    window: int = 32640  # W: most recent tokens attended, not counting sinks
    sinks: int = 128  # S: leading tokens always attended
    decode_exclusion: str = "consistent"  # or "official128" (spec §4.4)
    chunk_size: int = 2048
    memory_limit: int | None = None  # bytes this model may use on its device (weights included); None = all free

    def validate(self):
        from .errors import AHNError
        if not isinstance(self.window, int) or self.window < 1:
            raise AHNError(f"window must be an integer >= 1 (got {self.window!r})")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise AHNError(f"sinks must be an integer >= 0 (got {self.sinks!r})")
        if self.decode_exclusion not in ("consistent", "official128"):
            raise AHNError(f"decode_exclusion must be 'consistent' or 'official128' (got {self.decode_exclusion!r})")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise AHNError(f"chunk size must be an integer >= 1 (got {self.chunk_size!r})")
        if self.memory_limit is not None and (not isinstance(self.memory_limit, int) or self.memory_limit <= 0):
            raise AHNError(f"memory limit must be a positive number of bytes (got {self.memory_limit!r})")


def rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An HF RMSNorm module applied to x; on CUDA through the fused kernel (one launch instead of seven; the same
    float32 statistics, rounded once to x's dtype, then the gain, as the module does)."""
    if x.is_cuda:
        return norm.weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=norm_eps(norm))
    return norm(x)


def _join(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.cat([a, b]) along dim 0, without a copy when one side is empty (in a steady prefill chunk every
    token written into the memory comes from the window buffer)."""
    return b if a.shape[0] == 0 else a if b.shape[0] == 0 else torch.cat([a, b])


def norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6))


class AHNModel:
    def __init__(self, hf_model: nn.Module, memories: nn.ModuleList | None, config: RuntimeConfig,
                 model_id: str = "", tokenizer=None, ahn_info: dict | None = None):
        config.validate()
        self.hf = hf_model
        self.memories = memories
        self.config = config
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.ahn_info = ahn_info or {}
        self.decoders: dict = {}  # captured decode steps by the state buffers they address (decode.py)
        c = hf_model.config
        self.family = c.model_type
        self.n_layers = c.num_hidden_layers
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        self.vocab_size = c.vocab_size
        inner = hf_model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.lm_head = hf_model.lm_head
        mlp = self.layers[0].mlp
        self._swiglu = getattr(c, "hidden_act", None) == "silu" and all(
            hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        p = next(hf_model.parameters())
        self.device = p.device
        self.dtype = self.embed.weight.dtype
        self.last_prefill_graph = None  # (steady chunks, of them replayed from the CUDA graph) of the last prefill

    def with_config(self, config: RuntimeConfig) -> "AHNModel":
        """The same loaded weights under other inference settings (window, sinks, decode exclusion, chunk)."""
        return AHNModel(self.hf, self.memories, config, self.model_id, self.tokenizer, self.ahn_info)

    @property
    def variant(self) -> str | None:
        return None if self.memories is None else self.memories[0].variant

    # ---- states -------------------------------------------------------------------------------------------
    def state_spec(self, mode: str) -> StateSpec:
        from .errors import AHNError
        if mode not in MODES:
            raise AHNError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "ahn" and self.memories is None:
            raise AHNError("this model has no AHN weights: use mode 'window' or 'full', or load an AHN checkpoint")
        full = mode == "full"
        return StateSpec(mode=mode, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                         head_dim=self.head_dim, window=None if full else self.config.window,
                         sinks=0 if full else self.config.sinks,
                         gate_names=self.memories[0].gate_names if mode == "ahn" else (),
                         dtype=str(self.dtype).replace("torch.", ""), model_id=self.model_id)

    def new_state(self, mode: str = "ahn") -> SequenceState:
        return SequenceState(self.state_spec(mode), self.device)

    # ---- per-layer pieces ---------------------------------------------------------------------------------
    def _qkv(self, layer, xn, cos, sin, rope=apply_rope):
        """q, k (rotated by `rope`), v of xn [T, h]: [T, H, D], [T, Hkv, D], [T, Hkv, D]."""
        T = xn.shape[0]
        at = layer.self_attn
        q = at.q_proj(xn).view(T, self.n_heads, self.head_dim)
        k = at.k_proj(xn).view(T, self.n_kv_heads, self.head_dim)
        v = at.v_proj(xn).view(T, self.n_kv_heads, self.head_dim)
        if getattr(at, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
            q, k = at.q_norm(q), at.k_norm(k)
        q, k = rope(q, k, cos, sin)
        return q, k, v

    def _rope(self, x, start: int, n: int, positions: torch.Tensor | None = None):
        pos = torch.arange(start, start + n, device=x.device) if positions is None else positions
        cos, sin = self.rotary(x, pos[None])
        return cos[0], sin[0]

    def _finish_layer(self, layer, x, o):
        T = x.shape[0]
        x = x + layer.self_attn.o_proj(o.reshape(T, -1))
        return x + layer.mlp(rms(layer.post_attention_layernorm, x))

    def _logits(self, xn, which):
        """Logits of the final-normed hidden states xn [T, h] (`_tail` of the last layer): 'none', 'last', 'all'."""
        if which == "none":
            return None
        return self.lm_head(xn[-1:] if which == "last" else xn).float()

    def _memory(self, l, state, q, kw, vw, gw, xq, o, P=None):
        """Write kw/vw (un-expanded KV heads) with gates gw into layer l's memory, read with q [n, H, D] (their
        pre-normed hidden states xq [n, h]) and add the memory's output to o [n, H, D] in place."""
        P = P or prefill_pieces(self.device)
        mod = self.memories[l]
        qm, km, vm, g, beta = P.mem_in(mod, q, kw, vw, gw, self.n_heads // self.n_kv_heads)
        r, state.memory[l] = recurrent.run(qm, km, vm, g, beta, mod.scale, state.memory[l])
        P.mem_add(mod, o, r, xq)

    # ---- prefill chunk ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, state: SequenceState, ids: torch.Tensor, logits: str = "last",
                positions: torch.Tensor | None = None, recurring: bool = False):
        """Process ids [T] at positions state.pos.. ; returns logits [1 or T, V] float32 (or None).
        positions: those positions as a device tensor [T] (the prefill's CUDA graph keeps them in a static
        buffer); by default made here. recurring: a full chunk of a windowed mode (`_shapes_recur`), whose
        attention shapes come again (see `kernels.attention._sdpa_lse`: only those are worth cuDNN's per-shape
        plans)."""
        T = int(ids.shape[0])
        if T == 0:
            return None
        state.linearize()
        state.reserve(T)
        S, W = state.spec.sinks, state.window
        a, b = state.pos, state.pos + T
        n_sink, win_len, w0 = state.n_sink, state.win_len, state.w0
        new_win = int(min(W, max(0, b - S)))
        new_w0 = b - new_win
        mem = state.spec.has_memory
        j0, j1 = max(S, a - W), b - W  # tokens written into memory in this chunk (t = j + W reads)
        j0, j1 = (int(j0), int(j1)) if mem and j1 > j0 else (0, 0)
        P = prefill_pieces(self.device)
        x = self.embed(ids.to(self.device))
        cos, sin = self._rope(x, a, T, positions)
        xn = rms(self.layers[0].input_layernorm, x)
        for l, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, xn, cos, sin, rope=P.rope)
            K, V = state.k[l], state.v[l]  # [Hkv, cap, D]
            blocks = [KeyBlock(K[:, :n_sink].transpose(0, 1), V[:, :n_sink].transpose(0, 1), 0),
                      KeyBlock(K[:, S:S + win_len].transpose(0, 1), V[:, S:S + win_len].transpose(0, 1), w0),
                      KeyBlock(k, v, a)]
            o = window_attention(q, a, blocks, W, S, self.scale, recurring)
            gates = self.memories[l].gates(xn) if mem else {}
            if j1 > j0:
                mid = min(j1, max(a, j0))  # [j0, mid) come from the window buffer, [mid, j1) from this chunk
                old = slice(S + j0 - w0, S + mid - w0)
                new = slice(mid - a, j1 - a)
                kw = _join(K[:, old].transpose(0, 1), k[new])
                vw = _join(V[:, old].transpose(0, 1), v[new])
                gw = {g: _join(state.gates[g][l, old], gates[g][new]) for g in gates}
                rows = slice(j0 + int(W) - a, j1 + int(W) - a)
                self._memory(l, state, q[rows], kw, vw, gw, xn[rows], o[rows], P)
            x, xn = self._tail(l, x, o, P)
            self._store_chunk(state, l, k, v, gates, a, b, w0, win_len, new_w0)
        state.pos = b
        return self._logits(xn, logits)

    def _tail(self, l, x, o, P):
        """The rest of layer l after attention (o [T, H, D]): o_proj, residual + post-attention RMSNorm, MLP,
        residual + the next layer's input RMSNorm (the final norm after the last layer). Returns (x, its norm)."""
        layer = self.layers[l]
        y = layer.self_attn.o_proj(o.reshape(x.shape[0], -1))
        ln = layer.post_attention_layernorm
        x, xn = P.add_norm(x, y, ln.weight, norm_eps(ln))
        mlp = layer.mlp
        if self._swiglu:
            y = mlp.down_proj(P.silu_mul(mlp.gate_proj(xn), mlp.up_proj(xn)))
        else:
            y = mlp(xn)
        ln = self.layers[l + 1].input_layernorm if l + 1 < self.n_layers else self.norm
        return P.add_norm(x, y, ln.weight, norm_eps(ln))

    def _store_chunk(self, state, l, k, v, gates, a, b, w0, win_len, new_w0):
        S = state.spec.sinks
        K, V = state.k[l], state.v[l]
        bufs = [(K, k.transpose(0, 1), 1), (V, v.transpose(0, 1), 1)]
        bufs += [(state.gates[g][l], gates[g], 0) for g in gates]
        for buf, new, dim in bufs:
            def sl(lo, hi):
                return (slice(None), slice(lo, hi)) if dim == 1 else (slice(lo, hi),)
            if a < S:  # sink tokens in this chunk
                e = min(b, S)
                buf[sl(a, e)] = new[sl(0, e - a)]
            keep_lo = max(w0, new_w0)
            d = new_w0 - w0
            if d > 0 and a > keep_lo and win_len:  # shift surviving window tokens to the front
                cnt = a - keep_lo
                buf[sl(S, S + cnt)] = buf[sl(S + d, S + d + cnt)].clone()
            lo = max(a, S, new_w0)
            if b > lo:
                buf[sl(S + lo - new_w0, S + b - new_w0)] = new[sl(lo - a, b - a)]

    # ---- decode step --------------------------------------------------------------------------------------
    def _official_drop(self, state, t):
        """Position that the official decode removes from attention: index 128 of [sinks, t-W..t] (spec §4.4)."""
        S, W = state.spec.sinks, state.window
        official = list(range(min(S, t + 1))) + (list(range(int(max(S, t - W)), t + 1)) if t >= S else [])
        return official[128] if len(official) > 128 else None

    @torch.inference_mode()
    def step(self, state: SequenceState, token: int | torch.Tensor, logits: str = "last"):
        """Decode one token at position state.pos. Returns logits [1, V] float32."""
        S, W = state.spec.sinks, state.window
        t = state.pos
        official = self.config.decode_exclusion == "official128" and state.spec.window is not None
        state.reserve(1)
        if t < S:
            slot, evict = t, None
        elif state.win_len < W:
            slot, evict = S + state.win_len, None
        else:
            slot, evict = S + state.rot, t - int(W)
        mem = state.spec.has_memory and evict is not None
        n_after = state.n_slots + (0 if evict is not None else 1)
        if official:
            pos_before = state.positions().to(self.device)
            drop = self._official_drop(state, t)
            keep = torch.cat([pos_before, torch.tensor([t], device=self.device)]) != (-1 if drop is None else drop)
        if mem:  # the token leaving the window was cached: every layer's write first, as one batched update
            self._write_leaving(state, slot)
        ids = torch.as_tensor([int(token)], device=self.device)
        P = prefill_pieces(self.device)
        x = self.embed(ids)
        cos, sin = self._rope(x, t, 1)
        xn = rms(self.layers[0].input_layernorm, x)
        for l, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, xn, cos, sin, rope=P.rope)
            K, V = state.k[l], state.v[l]
            gates = self.memories[l].gates(xn) if state.spec.has_memory else {}
            if official:
                n = state.n_slots
                o = decode_attention(q, torch.cat([K[:, :n], k.transpose(0, 1)], 1),
                                     torch.cat([V[:, :n], v.transpose(0, 1)], 1), self.scale, keep)
            K[:, slot], V[:, slot] = k[0], v[0]
            for g in gates:
                state.gates[g][l, slot] = gates[g][0]
            if not official:
                o = decode_attention(q, K[:, :n_after], V[:, :n_after], self.scale)
            if mem:
                o = o + self.memories[l].read(q, xn, state.memory[l]).view(-1, self.n_heads, self.head_dim)
            x, xn = self._tail(l, x, o, P)
        if evict is not None:
            state.rot = (state.rot + 1) % int(W)
        state.pos = t + 1
        return self._logits(xn, logits)

    def _write_leaving(self, state: SequenceState, slot: int):
        """Write the cached token in window slot `slot` (about to be overwritten) into the memory of every layer.
        It depends only on that token's cached K, V and gates, so the L layers' writes run as one update over
        L x H states (a decode step then pays the recurrence's small ops once, not once per layer)."""
        G = self.n_heads // self.n_kv_heads
        kw = state.k[:, :, slot].repeat_interleave(G, dim=1)  # [L, H, D]
        vw = state.v[:, :, slot].repeat_interleave(G, dim=1)
        gw = {g: state.gates[g][:, slot] for g in state.gates}  # [L, H]
        if not state.memory.is_contiguous():
            state.memory = state.memory.contiguous()
        write_layers(type(self.memories[0]), stack_write_params(self.memories), kw, vw, gw, state.memory)

    def decoder(self, state: SequenceState, max_tokens: int, graph: bool | None = None):
        """A callable token -> next logits [V] for up to max_tokens decode steps: the fixed-shape step (a CUDA
        graph on CUDA) where it applies, else the eager `step`."""
        from .decode import EagerDecoder, StaticDecoder
        static = self.device.type == "cuda" if graph is None else True
        if static and (self.config.decode_exclusion == "consistent" or state.spec.window is None):
            return StaticDecoder.for_state(self, state, max_tokens, graph=graph)
        return EagerDecoder(self, state)

    # ---- first use ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def warm_up(self) -> bool:
        """Compile what the first document and the first answer would otherwise wait for: fla's memory kernels
        (Triton compilation and autotuning), the prefill's torch.compile'd pieces (`pieces.py`) and the decode
        step's (`decode.py`). On a fresh machine that costs tens of seconds once (measured: the first 45k-token
        prefill of a 3B model took 42.6 s, the next 1.4 s); afterwards the caches on disk make it a few seconds.
        It runs, through a copy of this model with a window of one chunk, a real prefill of random tokens (3
        chunks: the window fills, then tokens leave it and are written to memory, at the configured chunk
        length), then a short question (at most 64 tokens reach the memory: fla's fused-recurrent kernels, which
        the first follow-up question on an H200 otherwise waited 1.4-4.1 s for) and three decode steps (the
        first answer's second token otherwise waited 1.7-7.1 s for the step's compilation), and drops the state.
        Returns whether anything ran (only on CUDA)."""
        from dataclasses import replace
        if self.device.type != "cuda":
            return False
        C = max(65, int(self.config.chunk_size))  # > 64: fla's chunked kernels, as in a prefill
        small = self.with_config(replace(self.config, window=C, sinks=min(self.config.sinks, 16), chunk_size=C))
        g = torch.Generator(device=self.device).manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (small.config.sinks + 3 * C,), generator=g, device=self.device)
        state = small.new_state("ahn" if self.memories is not None else "window")
        small.prefill(state, ids, logits="none")
        question = torch.randint(0, self.vocab_size, (23,), generator=g, device=self.device)
        tok = int(small.prefill(state, question, max_new_tokens=4)[-1].argmax())
        step = small.decoder(state, 4)
        for _ in range(3):
            tok = int(step(tok).argmax())
        torch.cuda.synchronize(self.device)
        return True

    @staticmethod
    def _shapes_recur(state: SequenceState, T: int, C: int) -> bool:
        """Whether the attention shapes of a prefill chunk of T tokens come back: a full chunk of a windowed mode.
        Once the window is full every chunk sees S + W + C keys, and each of the few chunks that fill it sees the
        same keys in every document (k * C). Under full attention every chunk sees more keys than the one before,
        as many shapes as a document has chunks: not worth cuDNN's per-shape plans (`kernels.attention._sdpa_lse`;
        on an H200 they made a 128k-token prefill of SmolLM2 in 512-token chunks take 25 s)."""
        return T == C and math.isfinite(state.window)

    # ---- convenience --------------------------------------------------------------------------------------
    def _capacity(self, state: SequenceState, n_tokens: int, max_new_tokens: int) -> int:
        """Slots `state` needs for n_tokens more and an answer of max_new_tokens: on CUDA the static decoder's
        buffer (`decode.decode_capacity`), elsewhere the slots then in use."""
        need = int(min(state.spec.max_slots, state.n_slots + n_tokens))
        if max_new_tokens and self.device.type == "cuda":
            from .decode import decode_capacity
            return decode_capacity(state.spec, need, max_new_tokens)
        return int(min(state.spec.max_slots, need + max_new_tokens))

    def fork(self, state: SequenceState, n_tokens: int = 0, max_new_tokens: int = 0,
             check_memory: bool = True) -> SequenceState:
        """A copy of `state` (a document's) to go on with n_tokens more (a question) and an answer of up to
        max_new_tokens, allocated once at its final size: neither the prefill nor the decoder resizes it (a resize
        holds the state twice for a moment). On CUDA every answer's copy then is one allocation of the same size,
        freed when the answer ends, so the next answer's copy gets the same memory and reuses the captured decode
        step (`decode.StaticDecoder.for_state`); with a copy that the prefill resized, the allocator settled on
        the same addresses only from the fourth answer on (bench/question_ttft.py on an H200). Refuses up front
        (AHNMemoryError) when the copy and the prefill will not fit."""
        from .planning import AHNMemoryError, check_memory as check
        if check_memory:
            check(self, state, n_tokens, max_new_tokens, fresh=True)
        try:
            return state.clone(self._capacity(state, n_tokens, max_new_tokens))
        except torch.OutOfMemoryError as e:
            msg = str(e).splitlines()[0][:200]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise AHNMemoryError(f"out of memory copying the state ({msg})")

    def prefill(self, state: SequenceState, ids: torch.Tensor, chunk_size: int | None = None, logits: str = "last",
                progress=None, max_new_tokens: int = 0, check_memory: bool = True):
        """Chunked prefill. logits: 'last' -> [1, V]; 'all' -> [T, V]; progress(done, total) after each chunk.
        Refuses up front (AHNMemoryError, naming what fits instead) when the prompt plus max_new_tokens will
        not fit in the device's memory; an out-of-memory during the prefill frees the state's buffers (the
        state is then empty and must be dropped) and raises AHNMemoryError too."""
        from .planning import AHNMemoryError, check_memory as check
        ids = torch.as_tensor(ids).reshape(-1)
        C = chunk_size or self.config.chunk_size
        T = ids.shape[0]
        if check_memory:
            check(self, state, T, max_new_tokens, C)
        oom = None
        try:
            if max_new_tokens and self.device.type == "cuda":  # the prompt and the static decoder's buffer
                state.linearize()
                cap = self._capacity(state, T, max_new_tokens)
                if state.capacity < cap:
                    state.resize(cap)
            else:
                state.reserve(T, exact=True)  # one allocation for the whole prompt
            outs = []
            ids = ids.to(self.device)  # once: a copy per chunk from pageable memory would wait for the GPU
            graph = ChunkGraph(self, state, C) if ChunkGraph.enabled(self) else None
            for s in range(0, T, C):
                chunk = ids[s:s + C]
                which = "all" if logits == "all" else ("last" if s + C >= T and logits == "last" else "none")
                if graph is not None and graph.applies(chunk.shape[0], which):
                    graph.run(chunk)
                else:
                    if graph is not None:
                        graph.close()
                    out = self.forward(state, chunk, logits=which,
                                       recurring=self._shapes_recur(state, chunk.shape[0], C))
                    if out is not None:
                        outs.append(out)
                if progress is not None:
                    progress(min(T, s + C), T)
            self.last_prefill_graph = None if graph is None else (graph.runs, graph.replays)
            if graph is not None:
                graph.close()
        except torch.OutOfMemoryError as e:
            oom = (state.pos, str(e).splitlines()[0][:200])
        if oom is not None:  # outside the except block: the failed frames' tensors are freed by now
            outs = graph = None
            state.release()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise AHNMemoryError(f"out of memory during the prefill at token {oom[0]:,} of {T:,} ({oom[1]}); "
                                 "the sequence's buffers were freed")
        return torch.cat(outs) if outs else None
