"""Make real PDFs for tests and benchmarks: HTML printed by headless Chromium,
then post-processed with pypdf (page labels, outline, encryption)."""

from __future__ import annotations

import base64
import html
import io
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pypdf
from pypdf.constants import PageLabelStyle

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def html_pages(pages: list[str]) -> str:
    """An HTML document with one printed page per entry (entries are HTML)."""
    body = "\n".join(
        f'<div style="page-break-after: always">{page}</div>' for page in pages[:-1]
    )
    if pages:
        body += f"\n<div>{pages[-1]}</div>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<style>body{font-family:'DejaVu Serif',serif;font-size:12pt}</style>"
        f"</head><body>{body}</body></html>"
    )


def text_page(*paragraphs: str) -> str:
    """HTML for one page made of plain-text paragraphs."""
    return "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)


def print_pdf(html_text: str, out: Path, chromium: str | None = None) -> Path:
    """Print `html_text` to the PDF file `out` with headless Chromium."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="pdf-factory-") as tmp:
        src = Path(tmp) / "in.html"
        src.write_text(html_text, encoding="utf-8")
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            f"--user-data-dir={Path(tmp) / 'profile'}", "--no-pdf-header-footer",
            f"--print-to-pdf={out}", src.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def png_data_uri(width: int = 240, height: int = 160) -> str:
    """A gray-gradient PNG (like a scanned page) as a data: URI, made with zlib."""
    rows = b"".join(
        b"\x00" + bytes((x + y) % 256 for x in range(width)) for y in range(height)
    )

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_page() -> str:
    """HTML for a page holding only an image (no text layer)."""
    return f'<img src="{png_data_uri()}" style="width:15cm">'


def rewrite(src: Path, out: Path, *, labels=(), outline=(), encrypt=None) -> Path:
    """Copy a PDF adding page labels, outline entries and/or encryption.

    labels: (first_index, last_index, style, start) tuples, e.g. (0, 2, "/r", 1).
    outline: (title, page_index[, parent_title]) tuples. encrypt: (user_pw, owner_pw, algorithm).
    """
    writer = pypdf.PdfWriter(clone_from=str(src))
    for first, last, style, start in labels:
        writer.set_page_label(first, last, style=PageLabelStyle(style), start=start)
    items = {}
    for title, index, *parent in outline:
        parent_item = items[parent[0]] if parent else None
        items[title] = writer.add_outline_item(
            title=title, page_number=index, parent=parent_item)
    if encrypt:
        user, owner, algorithm = encrypt
        writer.encrypt(user, owner, algorithm=algorithm)
    buf = io.BytesIO()
    writer.write(buf)
    Path(out).write_bytes(buf.getvalue())
    return Path(out)


def blank_pdf(out: Path, n_pages: int = 2) -> Path:
    """A PDF of empty pages (no text), made with pypdf alone."""
    writer = pypdf.PdfWriter()
    for _ in range(n_pages):
        writer.add_blank_page(width=595, height=842)
    with open(out, "wb") as fh:
        writer.write(fh)
    return Path(out)


WORDS = ("archive", "harbour", "lantern", "meadow", "quarry", "signal", "timber",
         "voyage", "willow", "ember", "granite", "orchard", "ribbon", "summit")


def filler(seed: int, n_words: int) -> str:
    """Deterministic prose-like filler text."""
    words = [WORDS[(seed * 7 + i * 3 + i // 5) % len(WORDS)] for i in range(n_words)]
    sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return " ".join(sentences)


def long_document_pages(n_pages: int, words_per_page: int = 350) -> list[str]:
    """HTML pages of a long document mixing fonts, styles and a table;
    page i carries the token `pagetoken{i}` and no other page's token."""
    pages = []
    for i in range(1, n_pages + 1):
        rows = "".join(f"<tr><td>{WORDS[(i + r) % len(WORDS)]}</td><td>{i * r}</td>"
                       f"<td><i>{filler(i + r, 4)}</i></td></tr>" for r in range(1, 5))
        pages.append(
            f"<h2 style='font-family:sans-serif'>Chapter section {i}: pagetoken{i}</h2>"
            f"<p>{filler(i, words_per_page // 2)} <b>{filler(i + 2, 10)}</b></p>"
            f"<p style='font-family:monospace'>{filler(i + 3, 20)}</p>"
            f"<table border='1'>{rows}</table>"
            f"<p style='font-style:italic'>{filler(i + 1, words_per_page // 2)}</p>"
        )
    return pages
