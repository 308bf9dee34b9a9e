"""Load PDFs and text files into page-numbered text for the chat prompt.

Text is extracted with pypdfium2 (fast); pypdf supplies page labels, the
outline, encryption handling, and is the fallback extractor.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pypdf
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_raw

__all__ = [
    "DEFAULT_MAX_BYTES", "Page", "Document", "prompt_for", "load_document",
    "DocumentError", "PasswordRequired", "MalformedDocument", "UnsupportedFile",
    "FileTooLarge", "EmptyDocument",
]

log = logging.getLogger(__name__)

MB = 1024 * 1024
DEFAULT_MAX_BYTES = 200 * MB
TEXT_SUFFIXES = (".txt", ".md", ".markdown")
# Bytes that are usual in text files (all but most C0 control bytes).
_TEXT_BYTES = bytes([7, 8, 9, 10, 12, 13, 27]) + bytes(range(32, 256))
PROGRESS_EVERY = 5  # pages between progress callbacks
MAX_LISTED_PAGES = 15  # page labels named in one warning

# PDFium must never be called from two threads at once, not even for
# different documents; this lock serialises every use of it in this module.
_PDFIUM_LOCK = threading.Lock()

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- errors

class DocumentError(Exception):
    """A document could not be loaded; str(error) is meant for the user."""


class PasswordRequired(DocumentError):
    """The PDF is encrypted and no password, or a wrong one, was given."""

    def __init__(self, message: str, *, wrong_password: bool = False):
        super().__init__(message)
        self.wrong_password = wrong_password


class MalformedDocument(DocumentError):
    """The file is damaged, truncated, or not really a PDF."""


class UnsupportedFile(DocumentError):
    """The file type is not supported."""


class FileTooLarge(DocumentError):
    """The file is over the size limit."""


class EmptyDocument(DocumentError):
    """The document has no text at all."""


# --------------------------------------------------------------------------- model

@dataclass
class Page:
    number: int  # 1-based position in the file
    label: str  # printed page label, e.g. "iv" or "12"
    text: str
    has_text: bool


@dataclass
class Document:
    name: str
    sha256: str  # of the file bytes
    kind: str  # "pdf" | "text"
    pages: list[Page]
    outline: list[tuple[str, int]] = field(default_factory=list)  # (title, page number)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_pages(self) -> int:
        return len(self.pages)

    @property
    def pages_without_text(self) -> list[str]:
        return [p.label for p in self.pages if not p.has_text]

    def prompt_text(self) -> str:
        """The text with a `[Page <label>]` line before each page."""
        labels = [p.label for p in self.pages]
        parts = []
        for page in self.pages:
            marker = f"[Page {page.label}]"
            if labels.count(page.label) > 1:  # ambiguous label: add the position
                marker = f"[Page {page.label}, PDF page {page.number}]"
            parts.append(f"{marker}\n{page.text if page.has_text else '(no text on this page)'}")
        return "\n\n".join(parts)


def prompt_for(documents: list[Document]) -> str:
    """Several documents' text, each under a header with its name and page count."""
    parts = []
    for doc in documents:
        count = f"{doc.n_pages} page" + ("" if doc.n_pages == 1 else "s")
        parts.append(f"===== Document: {doc.name} ({count}) =====\n\n{doc.prompt_text()}")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- loading

def load_document(
    path: str | Path,
    *,
    name: str | None = None,
    password: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: Progress | None = None,
) -> Document:
    """Load a PDF, .txt or .md file.

    Raises a DocumentError subclass with a user-facing message on failure.
    `progress(done_pages, total_pages)` is called during extraction; an
    exception raised by it (e.g. a cancellation) propagates unchanged.
    """
    path = Path(path)
    name = name or path.name
    try:
        return _load(path, name, password, max_bytes, progress)
    except DocumentError:
        raise
    except _CallbackError as exc:
        raise exc.original from None
    except Exception as exc:
        log.exception("unexpected error loading %s", name)
        raise MalformedDocument(
            f"'{name}' could not be read; the file may be damaged ({type(exc).__name__})."
        ) from exc


class _CallbackError(Exception):
    """Carries an exception raised by the caller's progress callback."""

    def __init__(self, original: BaseException):
        super().__init__(repr(original))
        self.original = original


def _load(path: Path, name: str, password: str | None, max_bytes: int,
          progress: Progress | None) -> Document:
    data, sha256 = _read(path, name, max_bytes)
    suffix = path.suffix.lower()
    if not data:
        raise EmptyDocument(f"'{name}' is empty (0 bytes).")
    if b"%PDF-" in data[:1024]:
        return _load_pdf(data, name, sha256, password, progress)
    if suffix == ".pdf":
        raise MalformedDocument(
            f"'{name}' is not a valid PDF: it does not start with a PDF header. "
            "The file may be damaged or be another kind of file renamed to .pdf."
        )
    if suffix in TEXT_SUFFIXES:
        return _load_text(data, name, sha256, progress)
    shown = f"'{suffix}' files" if suffix else "files without an extension"
    raise UnsupportedFile(f"Cannot open '{name}': {shown} are not supported. "
                          "Use a PDF, .txt or .md file.")


def _read(path: Path, name: str, max_bytes: int) -> tuple[bytes, str]:
    """The file's bytes and their SHA-256, refusing files over max_bytes."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _too_large(name, size, max_bytes)
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:  # the file grew since stat()
            raise _too_large(name, path.stat().st_size, max_bytes)
    except FileNotFoundError:
        raise DocumentError(f"File not found: '{name}'.") from None
    except IsADirectoryError:
        raise UnsupportedFile(f"'{name}' is a folder, not a file.") from None
    except OSError as exc:
        raise DocumentError(f"Could not read '{name}': {exc.strerror or exc}.") from None
    return data, hashlib.sha256(data).hexdigest()


def _too_large(name: str, size: int, limit: int) -> FileTooLarge:
    return FileTooLarge(f"'{name}' is too large ({_mb(size)}); the limit is {_mb(limit)}.")


def _mb(n: int) -> str:
    value = n / MB
    return f"{value:.1f} MB" if value >= 0.1 else f"{value:.2g} MB"


# --------------------------------------------------------------------------- text files

def _load_text(data: bytes, name: str, sha256: str, progress: Progress | None) -> Document:
    text, warnings = _decode(data, name)
    chunks = text.split("\f")
    while len(chunks) > 1 and not chunks[-1].strip():  # trailing form feed
        chunks.pop()
    pages = [_page(i, str(i), chunk) for i, chunk in enumerate(chunks, 1)]
    _report(progress, len(pages), len(pages))
    if not any(p.has_text for p in pages):
        raise EmptyDocument(f"'{name}' contains no text.")
    return Document(name, sha256, "text", pages, [], warnings)


def _decode(data: bytes, name: str) -> tuple[str, list[str]]:
    """Decode text bytes: BOM-marked UTF-16, UTF-8, else Windows-1252/Latin-1."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), []
        except UnicodeDecodeError:
            pass
    sample = data[:8192]
    if len(sample.translate(None, _TEXT_BYTES)) > len(sample) // 20:  # >5% control bytes
        raise UnsupportedFile(f"'{name}' looks like a binary file, not text.")
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text, [f"'{name}' is not UTF-8; it was read as Windows-1252/Latin-1, "
                  "so a few characters may be wrong."]


# --------------------------------------------------------------------------- PDFs

def _load_pdf(data: bytes, name: str, sha256: str, password: str | None,
              progress: Progress | None) -> Document:
    warnings: list[str] = []
    reader = _open_pypdf(data, name, password, warnings)
    with _PDFIUM_LOCK:
        pdf = _open_pdfium(data, name, password, reader)
        if pdf is not None:
            try:
                texts = _pdfium_texts(pdf, reader, name, warnings, progress)
            finally:
                pdf.close()
    if pdf is None:
        if reader is None:
            raise MalformedDocument(
                f"'{name}' is damaged or not a valid PDF and cannot be opened.")
        warnings.append(f"'{name}' could not be read by the fast extractor; "
                        "the slower fallback was used.")
        texts = _pypdf_texts(reader, name, warnings, progress)

    labels = _labels(reader, len(texts), warnings)
    pages = [_page(i, label, text) for i, (label, text) in enumerate(zip(labels, texts), 1)]
    if not pages:
        raise EmptyDocument(f"'{name}' has no pages.")
    empty = [p.label for p in pages if not p.has_text]
    if len(empty) == len(pages):
        raise EmptyDocument(
            f"'{name}' has no text layer (it looks like a scanned or image-only PDF). "
            "OCR is not supported, so its text cannot be read.")
    if empty:
        listed = ", ".join(empty[:MAX_LISTED_PAGES])
        if len(empty) > MAX_LISTED_PAGES:
            listed += f" and {len(empty) - MAX_LISTED_PAGES} more"
        noun = "page" if len(empty) == 1 else "pages"
        warnings.append(f"No text found on {noun} {listed} of '{name}' (scanned or "
                        "image-only?). OCR is not supported, so that content is missing.")
    return Document(name, sha256, "pdf", pages, _outline(reader, len(pages), warnings),
                    warnings)


def _open_pypdf(data: bytes, name: str, password: str | None,
                warnings: list[str]) -> pypdf.PdfReader | None:
    """A decrypted pypdf reader, or None if pypdf cannot read the file."""
    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if not reader.is_encrypted:
            return reader
    except Exception as exc:  # pypdfium2 may still manage
        log.info("pypdf cannot open %s: %r", name, exc)
        return None
    # An empty user password (owner-password-only files) opens without asking.
    for candidate in ("", password):
        if candidate is None:
            continue
        try:
            if reader.decrypt(candidate) != pypdf.PasswordType.NOT_DECRYPTED:
                return reader
        except Exception as exc:  # e.g. an unsupported cipher: let PDFium decide
            log.info("pypdf cannot decrypt %s: %r", name, exc)
            warnings.append(f"Page labels and outline of '{name}' could not be decrypted.")
            return None
    raise _password_error(name, password)


def _password_error(name: str, password: str | None) -> PasswordRequired:
    if password:
        return PasswordRequired(f"The password for '{name}' is wrong. Please try again.",
                                wrong_password=True)
    return PasswordRequired(f"'{name}' is protected by a password. Please enter it.")


def _open_pdfium(data: bytes, name: str, password: str | None,
                 reader: pypdf.PdfReader | None) -> pdfium.PdfDocument | None:
    """A PDFium document, or None if PDFium cannot read the file."""
    candidates = [password, None] if password else [None]
    for candidate in candidates:
        try:
            return pdfium.PdfDocument(data, password=candidate)
        except pdfium.PdfiumError as exc:
            if getattr(exc, "err_code", None) != pdfium_raw.FPDF_ERR_PASSWORD:
                log.info("PDFium cannot open %s: %r", name, exc)
                return None
        except Exception as exc:
            log.info("PDFium cannot open %s: %r", name, exc)
            return None
    if reader is not None and reader.is_encrypted:
        return None  # pypdf accepted the password; let it extract
    raise _password_error(name, password)


def _pdfium_texts(pdf: pdfium.PdfDocument, reader: pypdf.PdfReader | None, name: str,
                  warnings: list[str], progress: Progress | None) -> list[str]:
    """Each page's text via PDFium; failing pages fall back to pypdf."""
    total = len(pdf)
    texts = []
    _report(progress, 0, total)
    for index in range(total):
        try:
            text = _pdfium_page_text(pdf, index)
        except Exception as exc:
            log.info("PDFium failed on page %d of %s: %r", index + 1, name, exc)
            text = _pypdf_page_text(reader, index, name, warnings)
        texts.append(text)
        _report(progress, index + 1, total)
    return texts


def _pdfium_page_text(pdf: pdfium.PdfDocument, index: int) -> str:
    page = pdf[index]
    try:
        textpage = page.get_textpage()
        try:
            return textpage.get_text_bounded()
        finally:
            textpage.close()
    finally:
        page.close()


def _pypdf_texts(reader: pypdf.PdfReader, name: str, warnings: list[str],
                 progress: Progress | None) -> list[str]:
    """Each page's text via pypdf (the slow fallback)."""
    try:
        total = len(reader.pages)
    except Exception as exc:
        raise MalformedDocument(f"'{name}' is damaged and its pages cannot be read.") from exc
    texts = []
    _report(progress, 0, total)
    for index in range(total):
        texts.append(_pypdf_page_text(reader, index, name, warnings))
        _report(progress, index + 1, total)
    return texts


def _pypdf_page_text(reader: pypdf.PdfReader | None, index: int, name: str,
                     warnings: list[str]) -> str:
    try:
        if reader is not None:
            return reader.pages[index].extract_text() or ""
    except Exception as exc:
        log.info("pypdf failed on page %d of %s: %r", index + 1, name, exc)
    warnings.append(f"Page {index + 1} of '{name}' is damaged and could not be read.")
    return ""


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress and (done % PROGRESS_EVERY == 0 or done == total):
        try:
            progress(done, total)
        except Exception as exc:
            raise _CallbackError(exc)


def _labels(reader: pypdf.PdfReader | None, n_pages: int, warnings: list[str]) -> list[str]:
    """Printed page labels, or "1", "2", ... when there are none or they are unusable."""
    numbers = [str(i) for i in range(1, n_pages + 1)]
    if reader is None:
        return numbers
    try:
        labels = [str(label).strip() for label in reader.page_labels]
    except Exception as exc:
        log.info("unreadable page labels: %r", exc)
        warnings.append("The printed page labels could not be read; page numbers are used.")
        return numbers
    if len(labels) != n_pages:
        return numbers
    return [label or number for label, number in zip(labels, numbers)]


def _outline(reader: pypdf.PdfReader | None, n_pages: int,
             warnings: list[str]) -> list[tuple[str, int]]:
    """Flattened bookmarks as (title, 1-based page number), in document order."""
    if reader is None:
        return []
    entries: list[tuple[str, int]] = []

    def walk(items) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item)
                continue
            index = reader.get_destination_page_number(item)
            title = _clean(str(item.title or "")).replace("\n", " ")
            if title and index is not None and 0 <= index < n_pages:
                entries.append((title, index + 1))

    try:
        walk(reader.outline)
    except Exception as exc:
        log.info("unreadable outline: %r", exc)
        warnings.append("The document's bookmarks (outline) could not be read.")
    return entries


# --------------------------------------------------------------------------- cleanup

_SOFT_HYPHEN_AT_EOL = re.compile(r"[\u00ad\ufffe\x02][ \t]*\n")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u00ad\ufffe\ufeff]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t\u00a0]{2,}|(?<=\S)[\t\u00a0]")
_TRAILING_SPACES = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def _clean(text: str) -> str:
    """Normalise line breaks and spaces, drop control characters, keep paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SOFT_HYPHEN_AT_EOL.sub("", text)  # words split by a soft hyphen
    text = _CONTROL.sub("", text)
    text = _INNER_SPACES.sub(" ", text)  # leading indentation is kept
    text = _TRAILING_SPACES.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def _page(number: int, label: str, raw_text: str) -> Page:
    text = _clean(raw_text)
    return Page(number=number, label=label, text=text, has_text=bool(text.strip()))
