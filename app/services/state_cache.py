"""Processed document states, kept in memory (a few, LRU) and on disk, keyed by file hashes + model + mode +
window + sinks; plus the extracted text of each document (keyed by file hash), so a reopened or reloaded
document set needs no extraction and no prefill. In AHN and window modes a state is constant-size."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ahn_runtime import SequenceState

from app.services.documents import Document, Page

log = logging.getLogger(__name__)
GiB = 2**30


class StateCache:
    def __init__(self, root: str | Path, *, max_disk_bytes: int = 20 * GiB, max_memory_states: int = 4,
                 max_memory_bytes: int = 2 * GiB, max_saved_state_bytes: int = 4 * GiB):
        self.root = Path(root)
        self.states_dir = self.root / "states"
        self.docs_dir = self.root / "documents"
        for d in (self.states_dir, self.docs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.max_disk_bytes = max_disk_bytes
        self.max_memory_states = max_memory_states
        self.max_memory_bytes = max_memory_bytes
        self.max_saved_state_bytes = max_saved_state_bytes
        self._memory: OrderedDict[str, tuple[SequenceState, dict]] = OrderedDict()
        self._lock = threading.RLock()

    # ---- keys ---------------------------------------------------------------------------------------------
    @staticmethod
    def key(doc_hashes: list[str], fingerprint: str, mode: str, window: int, sinks: int) -> str:
        """Order matters: the documents are in the prompt in upload order."""
        raw = json.dumps({"docs": list(doc_hashes), "model": fingerprint, "mode": mode,
                          "window": None if mode == "full" else window, "sinks": None if mode == "full" else sinks})
        return f"{mode}-" + hashlib.sha256(raw.encode()).hexdigest()[:32]

    # ---- states -------------------------------------------------------------------------------------------
    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.states_dir / f"{key}.safetensors", self.states_dir / f"{key}.json"

    def get(self, key: str, model, mode: str) -> tuple[SequenceState, dict] | None:
        """The state (do not modify it: clone it) and its metadata, or None."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
            path, meta_path = self._paths(key)
            if not path.is_file() or not meta_path.is_file():
                return None
            try:
                meta = json.loads(meta_path.read_text())
                state = SequenceState.load(str(path), device=model.device, expect=model.state_spec(mode))
            except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
                log.warning("dropping unusable cached state %s: %s", key, e)
                path.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
                return None
            now = time.time()
            os.utime(path, (now, now))
            self._remember(key, state, meta)
            return state, meta

    def put(self, key: str, state: SequenceState, meta: dict) -> bool:
        """Keep the state (in memory and on disk). Returns whether it was saved on disk."""
        meta = dict(meta, saved=time.time(), pos=state.pos)
        with self._lock:
            self._remember(key, state, meta)
        if state.nbytes()["total"] > self.max_saved_state_bytes:
            return False
        path, meta_path = self._paths(key)
        tmp = path.with_name(path.name + f".tmp{threading.get_ident()}")
        try:
            state.save(str(tmp))
            os.replace(tmp, path)
            meta_path.write_text(json.dumps(meta))
        except OSError as e:
            log.warning("could not save state %s: %s", key, e)
            tmp.unlink(missing_ok=True)
            return False
        self._evict_disk()
        return True

    def forget_memory(self) -> None:
        with self._lock:
            self._memory.clear()

    def _remember(self, key: str, state: SequenceState, meta: dict) -> None:
        if state.nbytes()["total"] > self.max_memory_bytes:
            return
        self._memory[key] = (state, meta)
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_memory_states:
            self._memory.popitem(last=False)

    def _evict_disk(self) -> None:
        files = sorted(self.states_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.max_disk_bytes:
            p = files.pop(0)
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)

    # ---- extracted documents ------------------------------------------------------------------------------
    def save_document(self, doc: Document) -> None:
        path = self.docs_dir / f"{doc.sha256}.json.gz"
        if path.is_file():
            return
        tmp = path.with_name(path.name + f".tmp{threading.get_ident()}")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(doc), f)
        os.replace(tmp, path)

    def load_document(self, sha256: str) -> Document | None:
        path = self.docs_dir / f"{sha256}.json.gz"
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError, EOFError):
            return None
        d["pages"] = [Page(**p) for p in d["pages"]]
        d["outline"] = [tuple(x) for x in d["outline"]]
        return Document(**d)
