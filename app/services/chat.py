"""What a browser tab (or an API client) can do: add documents, ask, regenerate, compare, export.

Each operation is a generator of events (Progress, Status, Partial, Notice, Finished); the work itself runs in
a worker thread, so a Stop (or a client that goes away) never leaves the model locked.
"""
from __future__ import annotations

import json
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ahn_runtime.accounting import device_bytes

from .documents import (DEFAULT_MAX_BYTES, DocumentError, EmptyDocument, FileTooLarge, MalformedDocument,
                        PasswordRequired, UnsupportedFile, load_document, prompt_for)
from .engine_service import MODE_LABELS, EngineService
from .errors import BudgetExceeded, Busy, Cancelled, ServiceError
from .memory_monitor import MemoryMonitor
from .prompting import Turn
from .sessions import ChatMessage, DocInfo, PendingFile, Run, Session, SessionStore
from .state_cache import StateCache


# ------------------------------------------------------------------------------------------------ events
@dataclass
class Status:
    text: str
    side: str | None = None
    transient: bool = False  # e.g. "waiting for the model": replaced by what comes next


@dataclass
class Progress:
    stage: str  # "extract" | "tokens" | "prefill"
    done: int
    total: int
    unit: str
    label: str
    eta: float | None = None
    rate: float | None = None
    side: str | None = None
    chunk: int | None = None  # prefill: chunks done / total
    chunks: int | None = None


@dataclass
class Partial:
    text: str
    side: str | None = None


@dataclass
class Notice:
    level: str  # "info" | "warning"
    text: str
    toast: bool = True  # worth a pop-up (else shown in the status area only)


@dataclass
class Finished:
    result: dict


Event = Status | Progress | Partial | Notice | Finished
_END = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def run_job(work: Callable[[Callable[[Event], None]], None], stop: threading.Event) -> Iterator[Event]:
    """Run work(emit) in a thread and yield what it emits (consecutive Partial/Progress events of the same
    kind are coalesced to the latest). Exceptions are re-raised here. If the consumer stops iterating, the
    work is told to stop."""
    q: queue.Queue = queue.Queue()

    def target():
        try:
            work(q.put)
        except BaseException as e:  # noqa: BLE001
            q.put(_Raised(e))
        finally:
            q.put(_END)

    t = threading.Thread(target=target, daemon=True, name="ahn-job")
    t.start()
    done = False
    try:
        while not done:
            batch = [q.get()]
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            for i, ev in enumerate(batch):
                if ev is _END:
                    done = True
                    break
                if isinstance(ev, _Raised):
                    raise ev.exc
                nxt = batch[i + 1] if i + 1 < len(batch) else None
                if isinstance(ev, (Partial, Progress)) and type(nxt) is type(ev) and \
                        getattr(nxt, "side", None) == ev.side and getattr(nxt, "stage", None) == \
                        getattr(ev, "stage", None):
                    continue  # superseded
                yield ev
    finally:
        if not done:
            stop.set()


class _StateView:
    """A frozen summary of a state for the memory panel (so finished states can be freed)."""

    def __init__(self, state):
        self.spec, self.pos, self.n_slots, self.compressed = state.spec, state.pos, state.n_slots, state.compressed
        self._nbytes = state.nbytes()

    def nbytes(self) -> dict:
        return dict(self._nbytes)


_ERROR_KINDS = [(PasswordRequired, "password"), (FileTooLarge, "too_large"), (UnsupportedFile, "unsupported"),
                (EmptyDocument, "empty"), (MalformedDocument, "malformed")]
CITATION = re.compile(r"\[Page ([^\]\n]{1,20}?)(?:, PDF page \d+)?\]")


def error_kind(exc: DocumentError) -> str:
    for cls, kind in _ERROR_KINDS:
        if isinstance(exc, cls):
            return kind
    return "error"


# ------------------------------------------------------------------------------------------------ service
class ChatService:
    def __init__(self, engine: EngineService, cache: StateCache, store: SessionStore, monitor: MemoryMonitor,
                 *, max_upload_bytes: int = DEFAULT_MAX_BYTES, default_max_new_tokens: int = 512):
        self.engine = engine
        self.cache = cache
        self.store = store
        self.monitor = monitor
        self.max_upload_bytes = max_upload_bytes
        self.default_max_new_tokens = default_max_new_tokens
        self._sync_lock = threading.Lock()

    # ---- helpers ------------------------------------------------------------------------------------------
    def default_mode(self) -> str:
        return "ahn" if "ahn" in self.engine.modes() else "window"

    def _begin(self, session: Session, kind: str) -> Run:
        run = Run(kind)
        session.runs.append(run)
        session.touched = time.time()
        return run

    def _job(self, session: Session, run: Run, work) -> Iterator[Event]:
        """Run work in a thread once this session's earlier requests are done (one at a time per session)."""
        def wrapped(emit):
            try:
                told = False
                while not session.lock.acquire(timeout=0.1):
                    if run.stop.is_set():
                        raise Cancelled("Stopped before it started.")
                    if not told and session.run is not None:
                        told = True
                        emit(Status(f"Waiting for this chat's current task ({session.run.kind}) to finish…",
                                    transient=True))
                try:
                    session.run = run
                    if run.stop.is_set():
                        raise Cancelled("Stopped before it started.")
                    work(emit)
                finally:
                    session.run = None
                    session.lock.release()
            finally:
                if run in session.runs:
                    session.runs.remove(run)
        return run_job(wrapped, run.stop)

    def documents_text(self, session: Session) -> str:
        return prompt_for(session.documents) if session.documents else ""

    def _sync_model(self, session: Session, cur=None) -> bool:
        """A session's token counts and processed states belong to the model that made them. After another model
        was loaded (or the app was restarted with another one), count the documents' tokens again and forget
        the processed states: the documents are processed again for the new model when next needed (at the next
        question, as for new documents). Returns whether anything was reset."""
        cur = cur or self.engine.current
        if session.model_key == cur.key:
            return False
        with self._sync_lock:
            if session.model_key == cur.key:
                return False
            for doc in session.documents:
                info = session.doc_info.get(doc.sha256)
                if info is not None:
                    info.tokens = len(cur.prompts.encode(doc.prompt_text()))
            changed = session.model_key is not None
            session.reset_prepared()
            session.last_state_view = None
            if changed:
                session.series.clear()  # memory against tokens of another model
            session.model_key = cur.key
            return changed

    # ---- summaries ----------------------------------------------------------------------------------------
    def summary(self, session: Session) -> dict:
        self._sync_model(session)
        docs = [vars(session.doc_info[d.sha256]) | {"name": d.name} for d in session.documents
                if d.sha256 in session.doc_info]
        total = sum(d["tokens"] for d in docs)
        budgets = {}
        for mode in self.engine.modes():
            b = self.engine.budget(mode)
            need = session.prefix_tokens or total
            fits = b.tokens is None or need < b.tokens
            entry = {"tokens": b.tokens, "limited_by": b.limited_by, "message": b.message, "fits": fits}
            if mode == "full" and not fits:
                entry["message"] = (f"Full attention cannot hold these documents: {need:,} tokens, budget "
                                    f"{b.tokens:,}. Use AHN mode" + ("" if "ahn" in budgets else
                                                                     " (not available) or window-only mode") + ".")
            if mode in ("ahn", "window") and need > self.engine.info.window + self.engine.info.sinks:
                gone = need - self.engine.info.window - self.engine.info.sinks
                entry["beyond_window"] = gone
                entry["message"] += (f" For these documents: {gone:,} tokens " +
                                     ("are compressed into memory." if mode == "ahn" else
                                      "are dropped — use AHN or full attention to keep them."))
            budgets[mode] = entry
        return {
            "documents": docs,
            "errors": list(session.upload_errors),
            "needs_password": [p.name for p in session.pending],
            "total_tokens": total,
            "prompt_tokens": session.prefix_tokens,
            "processed_modes": sorted(session.prepared),
            "modes": self.engine.modes(),
            "budgets": budgets,
        }

    # ---- documents ----------------------------------------------------------------------------------------
    def add_files(self, session: Session, files: list[tuple[str, str]], *, password: str | None = None,
                  mode: str | None = None) -> Iterator[Event]:
        """files: (path, display name). Loads each file (errors are reported per file, others continue),
        counts tokens, then processes the document set for `mode` (or the session's mode)."""
        run = self._begin(session, "processing documents")

        def work(emit):
            self._sync_model(session)
            session.upload_errors = []
            added = []
            for path, name in files:
                session.pending = [p for p in session.pending if p.path != path]

                def progress(done, total, name=name):
                    emit(Progress("extract", done, total, "pages", f"Extracting text from {name}"))
                    if run.stop.is_set():
                        raise Cancelled("Stopped while reading the documents.")

                emit(Progress("extract", 0, 1, "pages", f"Opening {name}"))
                try:
                    doc = load_document(path, name=name, password=password or None,
                                        max_bytes=self.max_upload_bytes, progress=progress)
                except DocumentError as e:
                    if isinstance(e, PasswordRequired):
                        session.pending.append(PendingFile(path, name, str(e)))
                    session.upload_errors.append({"name": name, "kind": error_kind(e), "error": str(e)})
                    emit(Notice("warning", str(e)))
                    continue
                if doc.sha256 in session.doc_hashes or doc.sha256 in [d.sha256 for d in added]:
                    emit(Notice("info", f"'{name}' is already in this chat."))
                    continue
                added.append(doc)
            for i, doc in enumerate(added):
                emit(Progress("tokens", i, len(added), "documents", f"Counting tokens of {doc.name}"))
                n = self.engine.count_tokens(doc.prompt_text())
                session.doc_info[doc.sha256] = DocInfo(doc.name, doc.sha256, doc.kind, doc.n_pages, n,
                                                       doc.pages_without_text, list(doc.warnings))
                for w in doc.warnings:
                    emit(Notice("warning", w))
                self.cache.save_document(doc)
            if added:
                emit(Progress("tokens", len(added), len(added), "documents", "Tokens counted"))
                session.documents.extend(added)
                session.reset_prepared()
                session.last_state_view = None
            self.store.save(session)
            target = mode or session.mode or self.default_mode()
            if session.documents and target not in session.prepared:
                try:
                    self._ensure_prepared(session, target, run, emit)
                except (BudgetExceeded, ServiceError) as e:
                    if isinstance(e, Cancelled):
                        raise
                    emit(Notice("warning", str(e)))
            emit(Finished(self.summary(session)))

        return self._job(session, run, work)

    def unlock(self, session: Session, password: str, mode: str | None = None) -> Iterator[Event]:
        if not session.pending:
            raise ServiceError("No document is waiting for a password.")
        if not password:
            raise ServiceError("Enter the password first.")
        files = [(p.path, p.name) for p in session.pending]
        return self.add_files(session, files, password=password, mode=mode)

    def remove_documents(self, session: Session) -> dict:
        if session.busy:
            raise Busy("This chat is busy. Press Stop first.")
        session.documents.clear()
        session.doc_info.clear()
        session.pending.clear()
        session.upload_errors.clear()
        session.reset_prepared()
        session.last_state_view = None
        self.store.save(session)
        return self.summary(session)

    def _prefix_tokens(self, session: Session) -> int:
        if session.prefix_tokens is None:
            session.prefix_tokens = len(self.engine.prompts.prefix_ids(self.documents_text(session)))
        return session.prefix_tokens

    def _ensure_prepared(self, session: Session, mode: str, run: Run, emit, side: str | None = None,
                         in_turn: bool = False):
        """The processed document prefix for mode: from memory/disk cache, or prefilled now."""
        eng = self.engine
        cur = eng.current  # one model throughout (another one may be loaded while this waits for its turn)
        eng.check_mode(mode, cur)
        self._sync_model(session, cur)
        info = cur.info
        key = self.cache.key(session.doc_hashes, cur.fingerprint, mode, info.window, info.sinks)
        hit = self.cache.get(key, cur.model, mode)
        if hit is not None:
            session.prepared[mode] = key
            session.prefix_tokens = hit[1]["tokens"]
            self.monitor.sample(session, mode, hit[0])
            if session.documents:
                emit(Status(f"Documents ready for {MODE_LABELS[mode]} (processed state loaded from cache).", side))
            return hit[0]
        ids = cur.prompts.prefix_ids(self.documents_text(session))
        session.prefix_tokens = len(ids)
        if mode == "full":
            b = eng.budget("full")
            if len(ids) >= b.tokens:
                raise BudgetExceeded(
                    f"Full attention cannot hold these documents: they need {len(ids):,} tokens and the budget "
                    f"is {b.tokens:,} ({b.limited_by} limit). Nothing was truncated: use AHN mode"
                    + ("" if "ahn" in eng.modes() else " (not available for this model) or window-only "
                       "mode") + ", or remove documents.")
        if in_turn:
            return self._prefill_prefix(session, mode, key, ids, run, emit, side)
        with eng.turn(run.stop, self._waiting(emit, side)):
            if eng.current is not cur:  # another model was loaded meanwhile: prepare for that one
                return self._ensure_prepared(session, mode, run, emit, side, in_turn=True)
            return self._prefill_prefix(session, mode, key, ids, run, emit, side)

    def _waiting(self, emit, side=None):
        def on_wait(ahead):
            loading = self.engine.loading
            emit(Status(f"Waiting for the model: {ahead} request{'s' if ahead != 1 else ''} ahead of you "
                        "(one runs at a time)." + (f" Loading {loading}…" if loading else ""), side, transient=True))
        return on_wait

    def _prefill_prefix(self, session, mode, key, ids, run, emit, side):
        state = self.engine.new_state(mode)
        run.state, run.mode, run.phase = state, mode, "processing documents"
        t0 = time.perf_counter()
        label = f"Processing documents for {MODE_LABELS[mode]}"
        size = self.engine.info.chunk_size
        chunks = -(-len(ids) // size)

        def progress(done, total):
            el = time.perf_counter() - t0
            rate = done / el if el > 0 else None
            eta = (total - done) / rate if rate else None
            emit(Progress("prefill", done, total, "tokens", label, eta, rate, side, -(-done // size), chunks))
            self.monitor.sample(session, mode, state)

        self.monitor.sample(session, mode, state)
        emit(Progress("prefill", 0, len(ids), "tokens", label, None, None, side, 0, chunks))
        try:
            self.engine.prefill(state, ids, run.stop, progress)
        finally:
            run.state = None
        seconds = time.perf_counter() - t0
        self.cache.put(key, state, {"tokens": len(ids), "mode": mode, "seconds": seconds,
                                    "documents": [d.name for d in session.documents]})
        session.prepared[mode] = key
        session.last_state_view = (mode, _StateView(state))
        emit(Status(f"Documents processed for {MODE_LABELS[mode]}: {len(ids):,} tokens in {seconds:.1f} s.", side))
        return state

    # ---- chat ---------------------------------------------------------------------------------------------
    def _turns(self, session: Session, question: str) -> list[Turn]:
        turns = [Turn(m.role, m.content) for m in session.messages if not m.meta.get("error")]
        # keep strict user/assistant alternation (a failed question has no answer)
        clean: list[Turn] = []
        for t in turns:
            if clean and clean[-1].role == t.role:
                clean[-1] = t
            else:
                clean.append(t)
        if clean and clean[-1].role == "user":
            clean.pop()
        return clean + [Turn("user", question)]

    def ask(self, session: Session, question: str, mode: str, *, max_new_tokens: int | None = None,
            temperature: float | None = None) -> Iterator[Event]:
        question = (question or "").strip()
        if not question:
            raise ServiceError("Type a question first.")
        self.engine.check_mode(mode)
        run = self._begin(session, "answering")
        session.mode = mode

        def work(emit):
            turns = self._turns(session, question)
            try:
                result = self._answer(session, turns, mode, run, emit, max_new_tokens, temperature)
            except ServiceError as e:
                session.messages.append(ChatMessage("user", question))
                session.messages.append(ChatMessage("assistant", str(e), {"error": True, "mode": mode}))
                self.store.save(session)
                raise
            session.messages.append(ChatMessage("user", question))
            session.messages.append(ChatMessage("assistant", result["text"], result["stats"]))
            session.last_stats = result["stats"]
            self.store.save(session)
            emit(Finished(result))

        return self._job(session, run, work)

    def regenerate(self, session: Session, mode: str, **kw) -> Iterator[Event]:
        if session.busy:
            raise Busy("This chat is busy. Press Stop first.")
        while session.messages and session.messages[-1].role == "assistant":
            session.messages.pop()
        if not session.messages:
            raise ServiceError("There is no question to answer again.")
        question = session.messages.pop().content
        return self.ask(session, question, mode, **kw)

    def clear_chat(self, session: Session) -> None:
        if session.busy:
            raise Busy("This chat is busy. Press Stop first.")
        session.messages.clear()
        session.compare = None
        self.store.save(session)

    def _plan(self, session, turns, mode, max_new) -> tuple[list[int], int, list[tuple[str, bool]]]:
        """What an answer needs from the loaded model: the question's tokens, the answer length (capped to full
        attention's budget) and notices (text, worth a pop-up). Raises BudgetExceeded when it cannot fit."""
        eng = self.engine
        eng.check_mode(mode)
        self._sync_model(session)
        suffix = eng.prompts.suffix_ids(self.documents_text(session), turns)
        notices: list[tuple[str, bool]] = []
        if mode == "full":
            b = eng.budget("full")
            prefix_n = self._prefix_tokens(session)
            room = b.tokens - prefix_n - len(suffix)
            if room < 1:
                raise BudgetExceeded(
                    f"Full attention cannot hold this: documents {prefix_n:,} + conversation {len(suffix):,} "
                    f"tokens, budget {b.tokens:,} ({b.limited_by} limit). Nothing was truncated: use AHN mode"
                    + ("" if "ahn" in eng.modes() else " (not available for this model) or window-only mode")
                    + ", remove documents or clear the chat.")
            if room < max_new:
                notices.append((f"The answer is limited to {room:,} tokens: full attention's budget is "
                                f"{b.tokens:,} tokens.", True))
                max_new = room
        if mode == "window":
            W, S = eng.info.window, eng.info.sinks
            prefix_n = self._prefix_tokens(session)
            if prefix_n + len(suffix) > W + S:
                dropped = prefix_n + len(suffix) - W - S
                notices.append((f"Window-only mode sees the last {W:,} tokens (+{S} sinks): {dropped:,} earlier "
                                "tokens of the documents and chat are not seen. Use AHN or full attention to keep "
                                "them.", False))
        return suffix, max_new, notices

    def _answer(self, session, turns, mode, run, emit, max_new_tokens, temperature, side=None) -> dict:
        eng = self.engine
        wanted = int(max_new_tokens or self.default_max_new_tokens)
        generation = eng.generation
        suffix, max_new, notices = self._plan(session, turns, mode, wanted)  # refusals need no turn
        with eng.turn(run.stop, self._waiting(emit, side)):
            if eng.generation != generation:  # another model was loaded while this waited: plan for that one
                suffix, max_new, notices = self._plan(session, turns, mode, wanted)
            for text, toast in notices:
                emit(Notice("warning", text, toast=toast))
            notices = [text for text, _ in notices]
            params = eng.sampling(max_new, temperature)
            t_begin = time.perf_counter()
            base = self._ensure_prepared(session, mode, run, emit, side, in_turn=True)
            t_docs = time.perf_counter() - t_begin
            if eng.model.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(eng.model.device)
            state = eng.fork(base, len(suffix), params.max_new_tokens)
            base = None
            self.monitor.sample(session, mode, state)
            run.state, run.mode, run.phase = state, mode, "reading the question"
            emit(Status("Reading the question...", side))
            t0 = time.perf_counter()
            peak_used = device_bytes(eng.model.device)["used"]
            peak_state = state.nbytes()["total"]
            text, n, t_first = "", 0, None
            try:
                logits = eng.prefill(state, suffix, run.stop, max_new_tokens=params.max_new_tokens)
                seen = None
                if params.repetition_penalty != 1.0:
                    seen = torch.zeros(eng.model.vocab_size, dtype=torch.bool, device=eng.model.device)
                    seen[torch.as_tensor(suffix, device=eng.model.device)] = True
                run.phase = "generating"
                ts = eng.text_stream()
                for tok in eng.decode(state, logits, params, run.stop, seen):
                    n += 1
                    if t_first is None:
                        t_first = time.perf_counter()
                    piece = ts.push(tok)
                    if piece:
                        text += piece
                        emit(Partial(text, side))
                    if n % 4 == 1:
                        self.monitor.sample(session, mode, state)
                        peak_used = max(peak_used, device_bytes(eng.model.device)["used"])
                        peak_state = max(peak_state, state.nbytes()["total"])
            except Cancelled:
                if n == 0:
                    raise
            finally:
                run.state = None
            t_end = time.perf_counter()
            self.monitor.sample(session, mode, state)
            session.last_state_view = (mode, _StateView(state))
            peak_state = max(peak_state, state.nbytes()["total"])
            if eng.model.device.type == "cuda":
                peak_used = torch.cuda.max_memory_allocated(eng.model.device)
            else:
                peak_used = max(peak_used, device_bytes(eng.model.device)["used"])
            state = None
        stopped = run.stop.is_set()
        stats = {
            "mode": mode,
            "ttft_s": round((t_first or t_end) - t0, 3),
            "tokens": n,
            "tokens_per_s": round((n - 1) / (t_end - t_first), 2) if n > 1 and t_end > t_first else None,
            "seconds": round(t_end - t0, 3),
            "document_seconds": round(t_docs, 3),
            "prompt_tokens": (session.prefix_tokens or 0) + len(suffix),
            "peak_memory_bytes": int(peak_used),
            "peak_state_bytes": int(peak_state),
            "stopped": stopped,
            "citations": sorted(set(CITATION.findall(text)), key=lambda s: (len(s), s)),
            "notices": notices,
        }
        return {"text": text, "stats": stats}

    # ---- compare ------------------------------------------------------------------------------------------
    def compare(self, session: Session, question: str, *, max_new_tokens: int | None = None,
                temperature: float | None = None, modes: tuple[str, str] = ("ahn", "full")) -> Iterator[Event]:
        """The same question (without chat history) in two modes, one after the other."""
        question = (question or "").strip()
        if not question:
            raise ServiceError("Type a question to compare first.")
        for m in modes:
            self.engine.check_mode(m)
        run = self._begin(session, "comparing")

        def work(emit):
            result = {"question": question, "sides": {}}
            for mode in modes:
                if run.stop.is_set():
                    result["sides"][mode] = {"error": "Stopped.", "text": ""}
                    continue
                try:
                    r = self._answer(session, [Turn("user", question)], mode, run, emit, max_new_tokens,
                                     temperature, side=mode)
                    result["sides"][mode] = r
                except ServiceError as e:
                    result["sides"][mode] = {"error": str(e), "text": ""}
                    emit(Status(str(e), mode))
                self.engine.free_memory()
            session.compare = result
            self.store.save(session)
            emit(Finished(result))

        return self._job(session, run, work)

    # ---- export -------------------------------------------------------------------------------------------
    def export(self, session: Session, fmt: str) -> tuple[str, str]:
        """(file name, content) of the chat as Markdown or JSON."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        info = self.engine.info
        if fmt == "json":
            doc = {"exported": stamp, "model": info.name, "variant": info.variant, "window": info.window,
                   "sinks": info.sinks,
                   "documents": [{"name": d.name, "sha256": d.sha256, "pages": d.n_pages} for d in session.documents],
                   "messages": [{"role": m.role, "content": m.content, **({"meta": m.meta} if m.meta else {})}
                                for m in session.messages]}
            return f"chat-{stamp}.json", json.dumps(doc, indent=2, ensure_ascii=False)
        lines = [f"# Chat exported {time.strftime('%Y-%m-%d %H:%M')}", "",
                 f"Model: {info.name}" + (f" (AHN {info.variant})" if info.variant else ""), ""]
        if session.documents:
            lines += ["Documents:", ""] + [f"- {d.name} ({d.n_pages} pages)" for d in session.documents] + [""]
        for m in session.messages:
            who = "You" if m.role == "user" else "Assistant"
            extra = ""
            if m.role == "assistant" and m.meta:
                if m.meta.get("error"):
                    extra = " (error)"
                elif m.meta.get("mode"):
                    extra = f" ({MODE_LABELS.get(m.meta['mode'], m.meta['mode'])}" + \
                            (", stopped" if m.meta.get("stopped") else "") + ")"
            lines += [f"## {who}{extra}", "", m.content, ""]
        return f"chat-{stamp}.md", "\n".join(lines)
