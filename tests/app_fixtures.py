"""Shared helpers for the app tests: test documents (PDFs printed by Chromium, broken ones made by hand),
real engines (tiny AHN model, real SmolLM2), and a launched `python launch.py` subprocess."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pdf_factory as pf
from app_models import TEST_MODELS, smollm2_gguf, tiny_ahn_model

ROOT = Path(__file__).resolve().parents[1]
# converted SmolLM2 (safetensors) is kept between test runs next to the test models: converting takes ~30 s
APP_MODELS_DIR = Path(os.environ.get("AHN_APP_TEST_MODELS_DIR", TEST_MODELS / "app-models"))
FACTS = ["The lighthouse keeper of Harrow Point was named Edith Vale.",
         "The secret ingredient of the harbour stew is smoked paprika.",
         "The archive closes every Thursday at four o'clock."]


def make_documents(dest: Path, chromium: str | None) -> dict[str, Path]:
    """Test files: real PDFs (text, encrypted, image-only, mixed) when chromium is there, plus text files and
    broken files made by hand."""
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    txt = dest / "notes.txt"
    txt.write_text("\f".join(f"{fact} {pf.filler(i, 40)}" for i, fact in enumerate(FACTS)), encoding="utf-8")
    out["txt"] = txt
    md = dest / "readme.md"
    md.write_text("# Heading\n\nThe museum ticket costs 12 euros.\n", encoding="utf-8")
    out["md"] = md
    (dest / "empty.txt").write_bytes(b"")
    out["empty"] = dest / "empty.txt"
    (dest / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage without xref\n")
    out["malformed"] = dest / "broken.pdf"
    (dest / "fake.pdf").write_bytes(b"MZ\x90\x00 this is not a pdf at all" * 10)
    out["fake_pdf"] = dest / "fake.pdf"
    (dest / "program.exe").write_bytes(b"MZ\x90\x00\x03\x00" * 100)
    out["unsupported"] = dest / "program.exe"
    (dest / "big.txt").write_bytes(b"lorem ipsum dolor " * 80_000)  # ~1.4 MB
    out["big"] = dest / "big.txt"
    if chromium:
        pages = [pf.text_page(f"Page {i + 1} fact: {fact}", pf.filler(i, 60)) for i, fact in enumerate(FACTS)]
        out["pdf"] = pf.print_pdf(pf.html_pages(pages), dest / "facts.pdf", chromium)
        out["encrypted"] = pf.rewrite(out["pdf"], dest / "locked.pdf", encrypt=("s3cret", "owner", "AES-256"))
        out["image_only"] = pf.print_pdf(pf.html_pages([pf.image_page(), pf.image_page()]), dest / "scan.pdf",
                                         chromium)
        out["mixed"] = pf.print_pdf(pf.html_pages([pf.text_page(FACTS[0]), pf.image_page(),
                                                   pf.text_page(FACTS[1])]), dest / "mixed.pdf", chromium)
        data = out["pdf"].read_bytes()
        (dest / "truncated.pdf").write_bytes(data[: len(data) // 3])
        out["truncated"] = dest / "truncated.pdf"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LaunchedApp:
    proc: subprocess.Popen
    url: str = ""
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "\n".join(self.lines[-60:])


def launch_app(args: list[str], timeout: float = 300) -> LaunchedApp:
    """Start `python launch.py ARGS` on a free port; returns once it serves (raises with its output if not)."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--port", str(port), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    app = LaunchedApp(proc)
    ready = threading.Event()

    def reader():
        assert proc.stdout is not None
        for line in proc.stdout:
            app.lines.append(line.rstrip())
            m = re.search(r"Running on local URL:\s+(http://\S+)", line)
            if m:
                app.url = m.group(1).rstrip("/")
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    ready.wait(timeout)
    if not app.url:
        stop_app(app)
        raise RuntimeError("the app did not start:\n" + app.output())
    return app


def stop_app(app: LaunchedApp) -> None:
    if app.proc.poll() is None:
        try:
            os.killpg(app.proc.pid, signal.SIGTERM)
            app.proc.wait(15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(app.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            app.proc.wait(10)


def build_services(base, ahn, tmp: Path, *, window=32, sinks=4, chunk_size=128, max_upload_mb=1.0,
                   max_new_tokens=8):
    """Real services around a real model (no mocks)."""
    from app.server import Settings
    from app.server import build_services as build
    from app.services.presets import choose
    choice = choose(base=str(base), ahn=str(ahn) if ahn else "none", window=window, sinks=sinks,
                    chunk_size=chunk_size, device=os.environ.get("AHN_APP_TEST_DEVICE", "cpu"))
    settings = Settings(cache_dir=tmp / "cache", models_dir=APP_MODELS_DIR, max_upload_mb=max_upload_mb,
                        max_new_tokens=max_new_tokens)
    return build(choice, settings, lambda msg: None)


def build_preset_services(preset: str, presets_file: Path, tmp: Path, *, max_upload_mb=1.0, max_new_tokens=8):
    """Real services started with a preset of a presets file of our own (as `launch.py --preset NAME`)."""
    from app.server import Settings
    from app.server import build_services as build
    from app.services.presets import choose, load_presets
    choice = choose(preset=preset, presets=load_presets(presets_file),
                    device=os.environ.get("AHN_APP_TEST_DEVICE", "cpu"))
    settings = Settings(cache_dir=tmp / "cache", models_dir=APP_MODELS_DIR, max_upload_mb=max_upload_mb,
                        max_new_tokens=max_new_tokens, presets_file=presets_file)
    return build(choice, settings, lambda msg: None)


__all__ = ["FACTS", "LaunchedApp", "launch_app", "stop_app", "make_documents", "build_services",
           "build_preset_services", "free_port", "smollm2_gguf", "tiny_ahn_model", "APP_MODELS_DIR", "ROOT"]
