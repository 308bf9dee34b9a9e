"""Wiring the services together and starting the Gradio server (used by launch.py and the tests)."""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# no usage statistics, ever (must be set before gradio is imported)
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from app.services.chat import ChatService  # noqa: E402
from app.services.documents import MB  # noqa: E402
from app.services.engine_service import EngineService  # noqa: E402
from app.services.memory_monitor import MemoryMonitor  # noqa: E402
from app.services.models import ModelService  # noqa: E402
from app.services.presets import PRESETS_FILE, ModelChoice, load_presets  # noqa: E402
from app.services.sessions import SessionStore  # noqa: E402
from app.services.state_cache import StateCache  # noqa: E402

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = Path(os.path.expanduser("~/.cache/ahn-longdoc"))


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int | None = None
    share: bool = False
    max_upload_mb: float = 200
    cache_dir: Path = DEFAULT_CACHE_DIR
    models_dir: Path | None = None
    max_new_tokens: int = 512
    inbrowser: bool = False
    presets_file: Path = PRESETS_FILE  # the models offered in the page's model menu

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir) if self.models_dir else Path(self.cache_dir) / "models"


def build_services(choice: ModelChoice, settings: Settings, log_fn: Callable[[str], None] = print):
    from app.handlers import AppServices
    cache_dir = Path(settings.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    engine = EngineService.load(choice, settings.models_path, log_fn)
    cache = StateCache(cache_dir)
    store = SessionStore(cache_dir / "sessions", cache.load_document)
    monitor = MemoryMonitor(engine)
    chat = ChatService(engine, cache, store, monitor, max_upload_bytes=int(settings.max_upload_mb * MB),
                       default_max_new_tokens=settings.max_new_tokens)
    export_dir = Path(tempfile.gettempdir()) / "ahn-longdoc-exports"
    export_dir.mkdir(parents=True, exist_ok=True)
    models = ModelService(engine, cache, load_presets(settings.presets_file), choice, settings.models_path)
    return AppServices(chat=chat, store=store, monitor=monitor, models=models, export_dir=export_dir)


def make_demo(services):
    from app.handlers import Handlers
    from app.ui import build_ui
    return build_ui(Handlers(services))


def launch(demo, settings: Settings, *, block: bool = True):
    from app import views
    from app.ui import theme
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share,
        inbrowser=settings.inbrowser, max_file_size=int(settings.max_upload_mb * MB),
        prevent_thread_lock=not block, show_error=True, theme=theme(), css=views.CSS,
        footer_links=["api"], favicon_path=None, ssr_mode=False, mcp_server=False,
    )
