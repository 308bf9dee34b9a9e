"""Generation loop (gpt-fast style): prefill, decode_one_token, decode_n_tokens, plus sampling and streaming text.

    params = SamplingParams.from_model(model)              # the model's generation_config, overridable
    for piece in stream_text(model, state, prompt_ids, params, stop=event):
        print(piece, end="")
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from .model import AHNModel
from .state import SequenceState


class Stopped(Exception):
    """Raised inside prefill when the caller asked to stop."""


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None

    @classmethod
    def from_model(cls, model: AHNModel, **overrides) -> "SamplingParams":
        gc = getattr(model.hf, "generation_config", None)
        p = cls()
        if gc is not None:
            do_sample = bool(getattr(gc, "do_sample", False))
            p = cls(temperature=float(gc.temperature or 1.0) if do_sample else 0.0,
                    top_p=float(gc.top_p or 1.0) if do_sample else 1.0,
                    top_k=int(gc.top_k or 0) if do_sample else 0,
                    repetition_penalty=float(gc.repetition_penalty or 1.0))
        return replace(p, **{k: v for k, v in overrides.items() if v is not None})


def eos_ids(model: AHNModel) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model.hf, "generation_config", None), model.hf.config, model.tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is None:
            continue
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    return {int(i) for i in ids}


def sample(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> int:
    """logits [V] float32; seen [V] bool (tokens in the context, for the repetition penalty)."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and seen is not None:
        pen = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if p.temperature <= 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if p.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        cut = (sp.cumsum(-1) - sp) > p.top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def prefill(model: AHNModel, state: SequenceState, ids: torch.Tensor, chunk_size: int | None = None,
            progress: Callable[[int, int], None] | None = None, stop: threading.Event | None = None,
            max_new_tokens: int = 0):
    """Feed a prompt; returns the last position's logits [V]. Raises Stopped if stop is set between chunks."""
    def cb(done, total):
        if progress is not None:
            progress(done, total)
        if stop is not None and stop.is_set() and done < total:
            raise Stopped()
    return model.prefill(state, ids, chunk_size=chunk_size, progress=cb, max_new_tokens=max_new_tokens)[-1]


def decode_one_token(model: AHNModel, state: SequenceState, token: int) -> torch.Tensor:
    return model.step(state, token)[-1]


def decode_tokens(model: AHNModel, state: SequenceState, logits: torch.Tensor, params: SamplingParams,
                  seen: torch.Tensor | None = None, stop: threading.Event | None = None) -> Iterator[int]:
    """Sample from logits, yield the token, feed it, repeat until EOS, max_new_tokens or stop.
    The EOS token is neither yielded nor fed; a stop takes effect before the next token is sampled."""
    eos = eos_ids(model)
    gen = torch.Generator(device=logits.device).manual_seed(params.seed) if params.seed is not None else None
    step = model.decoder(state, params.max_new_tokens)
    for _ in range(params.max_new_tokens):
        if stop is not None and stop.is_set():
            return
        tok = sample(logits, params, seen, gen)
        if tok in eos:
            return
        if seen is not None:
            seen[tok] = True
        yield tok
        if stop is not None and stop.is_set():
            return
        logits = step(tok)


def decode_n_tokens(model: AHNModel, state: SequenceState, logits: torch.Tensor, params: SamplingParams,
                    callback: Callable[[int], None] | None = None, **kw) -> list[int]:
    out = []
    for tok in decode_tokens(model, state, logits, params, **kw):
        out.append(tok)
        if callback is not None:
            callback(tok)
    return out


def generate(model: AHNModel, state: SequenceState, prompt_ids, params: SamplingParams,
             stop: threading.Event | None = None, chunk_size: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> Iterator[int]:
    """Yields generated token ids one at a time; the state ends holding prompt + generated tokens
    (except the last yielded one when stopped or at max_new_tokens, which is not fed)."""
    ids = torch.as_tensor(prompt_ids).reshape(-1)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(model.vocab_size, dtype=torch.bool, device=model.device)
        seen[ids.to(model.device)] = True
    logits = prefill(model, state, ids, chunk_size, progress, stop, params.max_new_tokens)
    yield from decode_tokens(model, state, logits, params, seen, stop)


class TextStream:
    """Incremental detokenisation: feed token ids, get the new text (holds back incomplete UTF-8)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        return new


def chat_ids(model: AHNModel, messages: list[dict], add_generation_prompt: bool = True) -> torch.Tensor:
    """Token ids of a conversation through the model's chat template (plain concatenation if it has none)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer")
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                      return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tok("\n\n".join(m["content"] for m in messages))["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def stream_text(model: AHNModel, state: SequenceState, prompt_ids, params: SamplingParams,
                stop: threading.Event | None = None, chunk_size: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> Iterator[str]:
    ts = TextStream(model.tokenizer)
    for tok in generate(model, state, prompt_ids, params, stop, chunk_size, progress):
        piece = ts.push(tok)
        if piece:
            yield piece
