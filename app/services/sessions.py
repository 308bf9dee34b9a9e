"""Per-browser-tab state: documents, chat, processed-state keys, the current run's Stop switch, memory samples.

A `Session` lives in the tab's gr.State. The tab also keeps a random id in its sessionStorage (which survives a
reload but is not shared with other tabs); `SessionStore` keeps sessions by that id, in memory and as small JSON
files, so a reloaded tab gets its documents and chat back. API clients get a fresh unsaved session each.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.services.documents import Document

log = logging.getLogger(__name__)
TAB_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_SERIES = 4000


@dataclass
class ChatMessage:
    role: str  # "user" | "assistant"
    content: str
    meta: dict = field(default_factory=dict)  # assistant: mode, stats, stopped, error


@dataclass
class DocInfo:
    name: str
    sha256: str
    kind: str
    pages: int
    tokens: int
    pages_without_text: list[str]
    warnings: list[str]


@dataclass
class PendingFile:
    """An encrypted PDF waiting for its password."""
    path: str
    name: str
    message: str


class Run:
    """One request (processing, answer, comparison): its Stop switch and live state for the memory panel."""

    def __init__(self, kind: str):
        self.kind = kind
        self.stop = threading.Event()
        self.started = time.time()
        self.state = None  # the SequenceState being computed, if any
        self.mode: str | None = None
        self.phase = "waiting"


class Session:
    def __init__(self, session_id: str | None = None, persistent: bool = False):
        self.id = session_id or uuid.uuid4().hex
        self.persistent = persistent
        self.documents: list[Document] = []
        self.doc_info: dict[str, DocInfo] = {}
        self.pending: list[PendingFile] = []
        self.upload_errors: list[dict] = []
        self.messages: list[ChatMessage] = []
        self.mode: str | None = None
        self.prepared: dict[str, str] = {}  # mode -> state cache key of the processed document prefix
        self.prefix_tokens: int | None = None
        self.model_key: str | None = None  # the model that the token counts and processed states belong to
        self.lock = threading.Lock()  # one request per session at a time
        self.run: Run | None = None  # the request running now
        self.runs: list[Run] = []  # running and waiting requests of this session
        self.last_stats: dict | None = None
        self.last_state_view: tuple[str, object] | None = None  # (mode, state) shown when idle
        self.series: dict[str, list[tuple[int, int, int]]] = {}  # mode -> (tokens, state bytes, device used)
        self.compare: dict | None = None
        self.touched = time.time()

    def __deepcopy__(self, memo):  # gr.State deep-copies values: a session is one live object
        return self

    # ---- documents ----------------------------------------------------------------------------------------
    @property
    def doc_hashes(self) -> list[str]:
        return [d.sha256 for d in self.documents]

    def reset_prepared(self) -> None:
        self.prepared.clear()
        self.prefix_tokens = None

    # ---- runs ---------------------------------------------------------------------------------------------
    def stop(self) -> bool:
        """Stop the running request and any waiting ones. Returns whether there was any."""
        runs = list(self.runs)
        for run in runs:
            run.stop.set()
        return bool(runs)

    @property
    def busy(self) -> bool:
        return bool(self.runs)

    # ---- memory samples -----------------------------------------------------------------------------------
    def add_sample(self, mode: str, tokens: int, state_bytes: int, device_used: int) -> None:
        pts = self.series.setdefault(mode, [])
        if pts and pts[-1][0] == tokens:
            pts[-1] = (tokens, state_bytes, device_used)
        else:
            pts.append((tokens, state_bytes, device_used))
        if len(pts) > MAX_SERIES:
            del pts[1:len(pts) // 2:2]  # thin out the older half

    # ---- persistence --------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"id": self.id, "mode": self.mode, "model": self.model_key,
                "documents": [{"sha256": d.sha256, "name": d.name} for d in self.documents],
                "doc_info": {k: asdict(v) for k, v in self.doc_info.items()},
                "messages": [asdict(m) for m in self.messages],
                "compare": self.compare}


class SessionStore:
    """Sessions by tab id (memory + JSON files under root). `load_document(sha)` restores extracted text."""

    def __init__(self, root: str | Path, load_document=None, idle_seconds: float = 3600):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.load_document = load_document
        self.idle_seconds = idle_seconds
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self) -> Session:
        return Session()

    def for_tab(self, tab_id: str | None) -> Session:
        """The tab's session: live, restored from disk, or new. Invalid ids get a fresh unsaved session."""
        if not tab_id or not TAB_ID.match(tab_id):
            return Session()
        with self._lock:
            self._evict_idle()
            s = self._sessions.get(tab_id)
            if s is None:
                s = self._restore(tab_id) or Session(tab_id, persistent=True)
                self._sessions[tab_id] = s
            s.touched = time.time()
            return s

    def save(self, session: Session) -> None:
        if not session.persistent:
            return
        path = self.root / f"{session.id}.json"
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(session.to_json()))
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not save session %s: %s", session.id, e)

    def _restore(self, tab_id: str) -> Session | None:
        path = self.root / f"{tab_id}.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        s = Session(tab_id, persistent=True)
        s.mode = d.get("mode")
        s.model_key = d.get("model")
        s.messages = [ChatMessage(**m) for m in d.get("messages", [])]
        s.compare = d.get("compare")
        infos = d.get("doc_info", {})
        for entry in d.get("documents", []):
            doc = self.load_document(entry["sha256"]) if self.load_document else None
            if doc is None:
                s.upload_errors.append({"name": entry["name"], "kind": "missing",
                                        "error": f"'{entry['name']}' is no longer in the cache; upload it again."})
                continue
            doc.name = entry["name"]
            s.documents.append(doc)
            if entry["sha256"] in infos:
                s.doc_info[entry["sha256"]] = DocInfo(**infos[entry["sha256"]])
        return s

    def _evict_idle(self) -> None:
        now = time.time()
        for k, s in list(self._sessions.items()):
            if now - s.touched > self.idle_seconds and not s.runs:
                del self._sessions[k]
