"""Gradio callbacks: translate component values to service calls and service events to component values.
No model code and no per-session data here: sessions arrive through gr.State, services are passed in."""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app import views
from app.services.chat import ChatService, Finished, Notice, Partial, Progress, Status
from app.services.errors import ServiceError
from app.services.memory_monitor import MemoryMonitor
from app.services.models import ModelService
from app.services.sessions import Session, SessionStore

log = logging.getLogger(__name__)
AHN_MISSING_INFO = "AHN mode needs AHN weights (see the note above)."
MODEL_STATUS_ID = "model-status-box"
MODE_ALIASES = {"ahn": "ahn", "full": "full", "full attention": "full", "full_attention": "full",
                "window": "window", "window only": "window", "window_only": "window", "sliding window": "window"}


def normalize_mode(mode: str | None, default: str) -> str:
    if not mode:
        return default
    m = MODE_ALIASES.get(str(mode).strip().lower())
    if m is None:
        raise ServiceError(f"Unknown mode {mode!r}: use 'ahn', 'full' or 'window'.")
    return m


def _files(files) -> list[tuple[str, str]]:
    if not files:
        return []
    if isinstance(files, (str, os.PathLike)) or isinstance(files, dict):
        files = [files]
    out = []
    for f in files:
        path = f.get("path") if isinstance(f, dict) else getattr(f, "name", None) if not isinstance(
            f, (str, os.PathLike)) else f
        if path:
            out.append((str(path), os.path.basename(str(path))))
    return out


@dataclass
class AppServices:
    chat: ChatService
    store: SessionStore
    monitor: MemoryMonitor
    models: ModelService
    export_dir: Path


class Handlers:
    def __init__(self, services: AppServices):
        self.s = services
        self.chat = services.chat
        self.engine = services.chat.engine

    # ---- helpers ------------------------------------------------------------------------------------------
    @property
    def default_mode(self) -> str:
        return self.chat.default_mode()

    def mode_choices(self, modes: list[str] | None = None) -> list[tuple[str, str]]:
        modes = self.engine.modes() if modes is None else modes
        return [(views.MODE_LABELS[m], m) for m in ("ahn", "full", "window") if m in modes]

    def model_choices(self) -> list[tuple[str, str]]:
        return [(o["label"], o["id"]) for o in self.s.models.options()]

    def model_view(self, mode: str | None = None) -> tuple:
        """What the page shows of the loaded model: header, mode choices, compare button, model menu, models
        table, and the loaded model's key (the tab's gr.State, so that a tab notices a switch made elsewhere)."""
        cur = self.engine.current  # one model for all of it, even if another one is being swapped in
        modes = self.engine.modes(cur)
        mode = mode if mode in modes else ("ahn" if "ahn" in modes else "window")
        options = self.s.models.options()
        return (views.header_html(cur.info.to_json(), modes),
                gr.update(choices=self.mode_choices(modes), value=mode,
                          info=None if "ahn" in modes else AHN_MISSING_INFO),
                gr.update(interactive="ahn" in modes),
                gr.update(choices=[(o["label"], o["id"]) for o in options], value=self.s.models.loaded_id),
                views.presets_md(options), cur.key)

    def _docs(self, session: Session, mode: str | None = None) -> str:
        if not session.documents and not session.upload_errors and not session.pending:
            return views.documents_html(None, mode)
        return views.documents_html(self.chat.summary(session), mode or session.mode)

    def _session(self, session: Session | None) -> Session:
        """The tab's session, set by `restore` at page load. None only for an event sent before that finished:
        refused, rather than run on a throwaway session that the tab (and a reload) would not keep."""
        if isinstance(session, Session):
            return session
        raise gr.Error("This page is still loading; try again in a moment.")

    def _api_session(self, session: Session | None) -> Session:
        """An API client's session (one per gradio_client connection)."""
        return session if isinstance(session, Session) else self.s.store.new()

    # ---- page load ----------------------------------------------------------------------------------------
    def restore(self, tab_id: str):
        """The tab's session (restored after a reload), everything shown from it and from the loaded model, and
        the memory panel's timer (started now, so that its refreshes always see the tab's session)."""
        session = self.s.store.for_tab(tab_id if isinstance(tab_id, str) else None)
        model_view = self.model_view(session.mode)  # the mode is the session's, if this model has it
        lines = []
        if session.messages or session.documents:
            lines.append(("ok", "Restored this tab's documents and chat."))
        for e in session.upload_errors:
            lines.append(("warning", e["error"]))
        return (session, views.chat_messages(session.messages), views.status_html(lines),
                self._docs(session, model_view[1]["value"]), gr.update(visible=bool(session.pending)),
                views.compare_html(session.compare), views.memory_html(self.s.monitor.snapshot(session)),
                *model_view, gr.update(active=True))

    # ---- documents ----------------------------------------------------------------------------------------
    def upload(self, files, mode, session):
        yield from self._process(session, mode, lambda s, m: self.chat.add_files(s, _files(files), mode=m),
                                 clear_files=True)

    def unlock(self, password, mode, session):
        yield from self._process(session, mode, lambda s, m: self.chat.unlock(s, password, mode=m),
                                 clear_files=False)

    def _process(self, session, mode, start, clear_files):
        """Outputs: status, documents, password row, password box, files."""
        session = self._session(session)
        lines: list[tuple[str, str]] = []
        keep = gr.update()
        files_out = gr.update(value=None) if clear_files else gr.update()
        try:
            mode = normalize_mode(mode, self.default_mode)
            events = start(session, mode)
        except ServiceError as e:
            gr.Warning(str(e))
            yield views.status_html([("warning", str(e))]), keep, keep, keep, keep
            return
        progress = ""
        try:
            for ev in events:
                if isinstance(ev, Progress):
                    progress = views.progress_html(ev)
                elif isinstance(ev, Status) and ev.transient:
                    progress = views.status_line("info", ev.text)
                elif isinstance(ev, Status):
                    lines.append(("info", ev.text))
                    progress = ""
                elif isinstance(ev, Notice):
                    lines.append((ev.level, ev.text))
                elif isinstance(ev, Finished):
                    progress = ""
                    n = len(ev.result["documents"])
                    if n:
                        lines.append(("ok", f"{n} document{'s' if n != 1 else ''} ready "
                                            f"({ev.result['total_tokens']:,} tokens)."))
                    if ev.result["needs_password"]:
                        gr.Warning("Password needed for: " + ", ".join(ev.result["needs_password"]))
                yield views.status_html(lines, progress), self._docs(session, mode), \
                    gr.update(visible=bool(session.pending)), keep, keep
        except ServiceError as e:
            lines.append(("warning", str(e)))
        except Exception as e:  # noqa: BLE001  keep the app alive, tell the user
            log.exception("document processing failed")
            lines.append(("error", f"Processing failed: {type(e).__name__}: {e}"))
        pw = gr.update(value="", label="Password for " + ", ".join(p.name for p in session.pending)) \
            if session.pending else (gr.update(value="") if not clear_files else keep)
        yield (views.status_html(lines), self._docs(session, mode), gr.update(visible=bool(session.pending)), pw,
               files_out)

    def clear_documents(self, session):
        session = self._session(session)
        try:
            self.chat.remove_documents(session)
            msg = ("ok", "Documents removed from this chat.")
        except ServiceError as e:
            msg = ("warning", str(e))
        return views.status_html([msg]), self._docs(session), gr.update(visible=bool(session.pending))

    def mode_changed(self, mode, session):
        session = self._session(session)
        mode = normalize_mode(mode, self.default_mode)
        session.mode = mode
        self.s.store.save(session)
        lines = []
        summary = self.chat.summary(session) if session.documents else None
        if summary and not summary["budgets"].get(mode, {}).get("fits", True):
            lines.append(("warning", summary["budgets"][mode]["message"]))
        elif summary and mode not in summary["processed_modes"]:
            lines.append(("info", f"The documents will be processed for {views.MODE_LABELS[mode]} at your next "
                                  "question (once; then cached)."))
        return views.status_html(lines), self._docs(session, mode)

    # ---- chat ---------------------------------------------------------------------------------------------
    def ask(self, question, mode, max_new_tokens, temperature, session):
        """Outputs: chatbot, question box, status."""
        session = self._session(session)
        question = (question or "").strip()
        try:
            mode = normalize_mode(mode, self.default_mode)
            events = self.chat.ask(session, question, mode, max_new_tokens=int(max_new_tokens or 0) or None,
                                   temperature=float(temperature) if temperature else 0.0)
        except ServiceError as e:
            gr.Warning(str(e))
            yield gr.update(), gr.update(), views.status_html([("warning", str(e))])
            return
        yield from self._stream(session, question, events)

    def regenerate(self, mode, max_new_tokens, temperature, session):
        session = self._session(session)
        users = [m for m in session.messages if m.role == "user"]
        question = users[-1].content if users else ""
        try:
            mode = normalize_mode(mode, self.default_mode)
            events = self.chat.regenerate(session, mode, max_new_tokens=int(max_new_tokens or 0) or None,
                                          temperature=float(temperature) if temperature else 0.0)
        except ServiceError as e:
            gr.Warning(str(e))
            yield gr.update(), gr.update(), views.status_html([("warning", str(e))])
            return
        yield from self._stream(session, question, events)

    def _stream(self, session, question, events):
        lines: list[tuple[str, str]] = []
        answer, note = "", "…"
        # the chat before this turn: the worker appends the turn to session.messages (and saves it) just before
        # it reports the end, so live updates drawn from session.messages could show the turn twice
        before = list(session.messages)
        yield views.chat_messages(before, question, "…"), "", views.status_html([])
        try:
            for ev in events:
                if isinstance(ev, Partial):
                    answer = ev.text
                elif isinstance(ev, Status):
                    note = f"*{ev.text}*"
                elif isinstance(ev, Progress):
                    note = (f"*{ev.label}: {ev.done:,} / {ev.total:,} tokens"
                            + (f", chunk {ev.chunk} of {ev.chunks}" if ev.chunks else "")
                            + (f", ETA {views.fmt_secs(ev.eta)}" if ev.eta is not None and ev.done < ev.total
                               else "") + "*")
                elif isinstance(ev, Notice):
                    lines.append((ev.level, ev.text))
                    if ev.toast:
                        gr.Warning(ev.text)
                elif isinstance(ev, Finished):
                    yield views.chat_messages(session.messages), gr.update(), views.status_html(lines)
                    return
                yield (views.chat_messages(before, question, answer or note), gr.update(),
                       views.status_html(lines))
        except ServiceError as e:
            lines.append(("warning", str(e)))
        except Exception as e:  # noqa: BLE001
            log.exception("answer failed")
            lines.append(("error", f"The answer failed: {type(e).__name__}: {e}"))
        yield views.chat_messages(session.messages), gr.update(), views.status_html(lines)

    def stop(self, session):
        session = self._session(session)
        stopped = session.stop()
        return views.status_html([("info", "Stopping…" if stopped else "Nothing to stop.")])

    def clear_chat(self, session):
        session = self._session(session)
        try:
            self.chat.clear_chat(session)
            return [], views.status_html([("ok", "Chat cleared.")]), ""
        except ServiceError as e:
            return gr.update(), views.status_html([("warning", str(e))]), gr.update()

    def compare(self, question, max_new_tokens, temperature, session):
        """Outputs: compare panel, status."""
        session = self._session(session)
        question = (question or "").strip()
        if not question:
            users = [m for m in session.messages if m.role == "user"]
            question = users[-1].content if users else ""
        try:
            events = self.chat.compare(session, question, max_new_tokens=int(max_new_tokens or 0) or None,
                                       temperature=float(temperature) if temperature else 0.0)
        except ServiceError as e:
            gr.Warning(str(e))
            yield gr.update(), views.status_html([("warning", str(e))])
            return
        live = {"ahn": "… waiting", "full": "… waiting (runs after AHN)"}
        partial = {"question": question, "sides": {}}
        lines: list[tuple[str, str]] = []
        yield views.compare_html(partial, live), views.status_html([])
        try:
            for ev in events:
                side = getattr(ev, "side", None)
                if isinstance(ev, Partial):
                    live[side] = ev.text
                elif isinstance(ev, Status) and side:
                    live[side] = "… " + ev.text
                elif isinstance(ev, Progress) and side:
                    live[side] = f"… {ev.label}: {ev.done:,}/{ev.total:,} tokens"
                elif isinstance(ev, Notice):
                    lines.append((ev.level, ev.text))
                elif isinstance(ev, Finished):
                    yield views.compare_html(ev.result), views.status_html(lines)
                    return
                yield views.compare_html(partial, live), views.status_html(lines)
        except ServiceError as e:
            lines.append(("warning", str(e)))
        except Exception as e:  # noqa: BLE001
            log.exception("compare failed")
            lines.append(("error", f"Compare failed: {type(e).__name__}: {e}"))
        yield views.compare_html(session.compare), views.status_html(lines)

    def export(self, fmt: str, session):
        session = self._session(session)
        name, content = self.chat.export(session, fmt)
        d = Path(tempfile.mkdtemp(prefix="chat-", dir=self.s.export_dir))
        path = d / name
        path.write_text(content, encoding="utf-8")
        return gr.update(value=str(path), visible=True)

    def export_markdown(self, session):
        return self.export("md", session)

    def export_json(self, session):
        return self.export("json", session)

    # ---- memory panel -------------------------------------------------------------------------------------
    def memory(self, session):
        return views.memory_html(self.s.monitor.snapshot(session if isinstance(session, Session) else None))

    def tick(self, session, shown_key, mode):
        """The memory panel, and the model shown when another tab (or an API client) loaded another one.
        Outputs: memory panel, header, mode, compare button, model menu, models table, shown model key."""
        if shown_key == self.engine.model_key:
            return (self.memory(session), *([gr.skip()] * 5), shown_key)
        return (self.memory(session), *self.model_view(mode))

    # ---- model menu ---------------------------------------------------------------------------------------
    def load_model(self, name, mode):
        """Load another model (a preset) for everyone. Outputs: model status, then what model_view updates."""
        keep = (gr.skip(),) * 6
        lines: list[tuple[str, str]] = []
        try:
            events = self.s.models.load(name)
        except ServiceError as e:
            gr.Warning(str(e))
            yield views.status_html([("warning", str(e))], box_id=MODEL_STATUS_ID), *keep
            return
        progress = ""
        try:
            for ev in events:
                if isinstance(ev, Status) and ev.transient:
                    progress = views.status_line("info", ev.text)
                elif isinstance(ev, Status):
                    lines.append(("ok" if ev.text.startswith("Loaded") else "info", ev.text))
                    progress = ""
                elif isinstance(ev, Finished):
                    yield views.status_html(lines, box_id=MODEL_STATUS_ID), *self.model_view(mode)
                    return
                yield views.status_html(lines, progress, box_id=MODEL_STATUS_ID), *keep
        except ServiceError as e:
            gr.Warning(str(e))
            lines.append(("error", str(e)))
        except Exception as e:  # noqa: BLE001
            log.exception("model load failed")
            lines.append(("error", f"Loading the model failed: {type(e).__name__}: {e}"))
        yield views.status_html(lines, box_id=MODEL_STATUS_ID), *self.model_view(mode)

    # ---- API (named endpoints) ----------------------------------------------------------------------------
    def api_upload(self, files, password, session):
        """Add files to this client's session; returns the document summary (JSON)."""
        session = self._api_session(session)
        messages = []
        try:
            events = (self.chat.unlock(session, password) if password and session.pending and not files else
                      self.chat.add_files(session, _files(files), password=password or None))
            result = None
            for ev in events:
                if isinstance(ev, (Notice, Status)):
                    messages.append(ev.text)
                elif isinstance(ev, Finished):
                    result = ev.result
        except ServiceError as e:
            raise gr.Error(str(e)) from None
        result = result or self.chat.summary(session)
        result["messages"] = messages
        return result

    def api_ask(self, question, mode, max_new_tokens, session):
        """Stream the answer text (partial answers, then the final one)."""
        session = self._api_session(session)
        try:
            mode = normalize_mode(mode, self.default_mode)
            events = self.chat.ask(session, question, mode, max_new_tokens=int(max_new_tokens or 0) or None)
            text = ""
            for ev in events:
                if isinstance(ev, Partial):
                    text = ev.text
                    yield text
                elif isinstance(ev, Finished):
                    text = ev.result["text"]
        except ServiceError as e:
            raise gr.Error(str(e)) from None
        yield text

    def api_memory(self, session):
        session = self._api_session(session)
        return self.s.monitor.snapshot(session)

    def api_stop(self, session):
        session = self._api_session(session)
        return {"stopped": session.stop()}

    def api_compare(self, question, max_new_tokens, session):
        session = self._api_session(session)
        try:
            result = None
            for ev in self.chat.compare(session, question, max_new_tokens=int(max_new_tokens or 0) or None):
                if isinstance(ev, Finished):
                    result = ev.result
        except ServiceError as e:
            raise gr.Error(str(e)) from None
        return result

    def api_info(self):
        return {"model": self.engine.info.to_json(), "modes": self.engine.modes(),
                "budgets": {m: vars(self.engine.budget(m)) for m in self.engine.modes()},
                "loaded": self.s.models.loaded_id, "options": self.s.models.options()}

    def api_load_model(self, preset):
        """Load a preset (or 'launched') in place of the current model; returns the loaded model, its modes and
        the menu (JSON). Errors (unknown preset, not loadable here, load failed) raise, and the previous model
        stays loaded."""
        try:
            return self.s.models.load_now(str(preset or ""))
        except ServiceError as e:
            raise gr.Error(str(e)) from None
