"""The model menu: the presets of models/presets.json (plus the model the app was started with), what each needs on
this machine, and switching the loaded model from the page or the API.

One model is loaded at a time; a switch goes through the engine's queue (`EngineService.switch`), so it waits for
the running and queued requests and nothing runs on the model while it changes. Sessions keep their documents:
they are processed again for the new model when next needed (ChatService._sync_model).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

from .chat import Event, Finished, Status, run_job
from .engine_service import EngineService
from .errors import Cancelled, ServiceError
from .presets import ModelChoice, Presets, choose, preset_status
from .state_cache import StateCache

LAUNCHED = "launched"  # the menu entry of the model the app was started with, when it is no plain preset
_SAME = ("preset", "base", "ahn", "window", "sinks", "chunk_size", "quantization", "device", "dtype")


def same_model(a: ModelChoice, b: ModelChoice) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in _SAME)


class ModelService:
    def __init__(self, engine: EngineService, cache: StateCache, presets: Presets, launch_choice: ModelChoice,
                 models_dir: str | Path):
        self.engine = engine
        self.cache = cache
        self.presets = presets
        self.launch_choice = launch_choice
        self.launch_name, self.launch_variant = engine.info.name, engine.info.variant
        self.models_dir = Path(models_dir)
        self._lock = threading.Lock()  # one switch at a time (downloads included)
        plain = None
        if launch_choice.preset in presets.presets:
            try:
                plain = self.preset_choice(launch_choice.preset)
            except ServiceError:
                plain = None
        # started as a preset with its own settings: the preset's entry; otherwise an entry of its own
        self.show_launched = plain is None or not same_model(plain, launch_choice)
        self.loaded_id = LAUNCHED if self.show_launched else launch_choice.preset

    @property
    def cuda(self) -> bool:
        return self.launch_choice.device.startswith("cuda")

    def preset_choice(self, name: str) -> ModelChoice:
        """A preset as it loads here: the preset's settings on the app's device (and --dtype)."""
        return choose(preset=name, device=self.launch_choice.device, dtype=self.launch_choice.dtype,
                      presets=self.presets, cuda=self.cuda, hub=False)

    # ---- the menu -----------------------------------------------------------------------------------------
    def options(self) -> list[dict]:
        """Menu entries: id, label, loaded, available, status (short), reason (why not available), needs."""
        out = []
        if self.show_launched:
            c = self.launch_choice
            out.append({"id": LAUNCHED, "name": self.launch_name,
                        "description": f"The model the app was started with ({c.base_name}, window {c.window:,}, "
                                       f"{c.sinks} sinks).",
                        "base_name": c.base_name, "variant": self.launch_variant, "device": c.device,
                        "window": c.window, "sinks": c.sinks, "available": True, "status": "as started",
                        "reason": None, "needs": []})
        for p in self.presets.presets.values():
            out.append({"id": p.name, **preset_status(p, cuda=self.cuda, models_dir=self.models_dir)})
        for o in out:
            o["loaded"] = o["id"] == self.loaded_id
            o["label"] = (f"{o['name']} — " + ("loaded" if o["loaded"] else o["status"])
                          + (" (as started)" if o["id"] == LAUNCHED and not o["loaded"] else ""))
        return out

    def describe(self, changed: bool | None = None) -> dict:
        eng = self.engine
        out = {"loaded": self.loaded_id, "model": eng.info.to_json(), "modes": eng.modes(),
               "options": self.options()}
        if changed is not None:
            out["changed"] = changed
        return out

    def _choice(self, name: str) -> ModelChoice:
        if name == LAUNCHED and self.show_launched:
            return self.launch_choice
        self.presets.get(name)  # unknown: ServiceError with the list
        entry = next(o for o in self.options() if o["id"] == name)
        if not entry["available"]:
            raise ServiceError(f"{name} cannot be loaded here: {entry['reason']}. The app keeps using "
                               f"{self.engine.info.name}.")
        return self.preset_choice(name)

    # ---- switching ----------------------------------------------------------------------------------------
    def load(self, name: str) -> Iterator[Event]:
        """Load a menu entry (a preset name, or LAUNCHED) in place of the current model. Events: Status (what is
        happening: downloads, waiting for requests, loading), then Finished(describe()). A name that cannot be
        loaded here raises ServiceError at once; a failed load raises ServiceError from the iteration, and the
        previous model stays loaded."""
        name = (name or "").strip()
        if not name:
            raise ServiceError("Choose a model first.")
        choice = self._choice(name)
        stop = threading.Event()

        def work(emit):
            told = False
            while not self._lock.acquire(timeout=0.1):
                if stop.is_set():
                    raise Cancelled("Stopped before the model was loaded.")
                if not told:
                    told = True
                    emit(Status("Waiting for another model load to finish…", transient=True))
            try:
                if name == self.loaded_id:
                    emit(Status(f"{self.engine.info.name} is already loaded."))
                    emit(Finished(self.describe(changed=False)))
                    return
                emit(Status(f"Loading {name}…", transient=True))

                def on_wait(ahead):
                    emit(Status(f"Waiting for {ahead} request{'s' if ahead != 1 else ''} to finish before "
                                "switching the model…", transient=True))

                info = self.engine.switch(choice, self.models_dir, stop,
                                          log_fn=lambda msg: emit(Status(msg, transient=True)), on_wait=on_wait,
                                          before_load=self.cache.forget_memory)
                self.loaded_id = name
                emit(Status(f"Loaded {info.name} in {info.load_seconds:.1f} s ("
                            + (f"AHN {info.variant}" if info.variant else "no AHN weights") + "). Documents are "
                            "processed again for it at the next question."))
                emit(Finished(self.describe(changed=True)))
            finally:
                self._lock.release()

        return run_job(work, stop)

    def load_now(self, name: str) -> dict:
        """load() to the end: describe() of the loaded model (ServiceError if it could not be loaded)."""
        result = None
        for ev in self.load(name):
            if isinstance(ev, Finished):
                result = ev.result
        return result
