"""Tests for app.services.documents on real files (PDFs printed by Chromium)."""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import pdf_factory as pf
from app.services.documents import (
    Document, DocumentError, EmptyDocument, FileTooLarge, MalformedDocument, Page,
    PasswordRequired, UnsupportedFile, load_document, prompt_for,
)

# Distinctive words, one set per page of the text PDF.
PAGE_WORDS = ["aardvark", "buffalo", "chinchilla", "dolphin", "echidna"]
LONG_PAGES = 100


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def chromium() -> str:
    path = pf.find_chromium()
    if path is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); "
                    "it is needed to generate the test PDFs")
    return path


@pytest.fixture(scope="session")
def pdf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pdfs")


@pytest.fixture(scope="session")
def text_pdf(chromium, pdf_dir) -> Path:
    pages = [pf.text_page(f"Page about the {w}.", f"The {w} paragraph has   extra spaces.",
                          pf.filler(i, 60))
             for i, w in enumerate(PAGE_WORDS)]
    return pf.print_pdf(pf.html_pages(pages), pdf_dir / "text.pdf", chromium)


@pytest.fixture(scope="session")
def labeled_pdf(text_pdf, pdf_dir) -> Path:
    """Labels i, ii, 1, 2, 3 and a (nested) outline."""
    return pf.rewrite(
        text_pdf, pdf_dir / "labeled.pdf",
        labels=[(0, 1, "/r", 1), (2, 4, "/D", 1)],
        outline=[("Preface", 0), ("Chapter One", 2), ("Section 1.1", 3, "Chapter One"),
                 ("Chapter Two", 4)],
    )


@pytest.fixture(scope="session")
def encrypted_pdf(text_pdf, pdf_dir) -> Path:
    return pf.rewrite(text_pdf, pdf_dir / "secret.pdf", encrypt=("s3cret", "owner", "AES-256"))


@pytest.fixture(scope="session")
def image_pdf(chromium, pdf_dir) -> Path:
    pages = [pf.image_page(), pf.image_page()]
    return pf.print_pdf(pf.html_pages(pages), pdf_dir / "scan.pdf", chromium)


@pytest.fixture(scope="session")
def mixed_pdf(chromium, pdf_dir) -> Path:
    pages = [pf.text_page("First page text about gazelles."), pf.image_page(),
             pf.text_page("Third page text about herons.")]
    return pf.print_pdf(pf.html_pages(pages), pdf_dir / "mixed.pdf", chromium)


@pytest.fixture(scope="session")
def long_pdf(chromium, pdf_dir) -> Path:
    return pf.print_pdf(pf.html_pages(pf.long_document_pages(LONG_PAGES)),
                        pdf_dir / "long.pdf", chromium)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- PDFs

def test_multipage_pdf_text_on_the_right_pages(text_pdf):
    doc = load_document(text_pdf)
    assert (doc.kind, doc.name, doc.n_pages) == ("pdf", "text.pdf", len(PAGE_WORDS))
    assert doc.sha256 == hashlib.sha256(text_pdf.read_bytes()).hexdigest()
    assert doc.warnings == [] and doc.pages_without_text == [] and doc.outline == []
    for i, (page, word) in enumerate(zip(doc.pages, PAGE_WORDS)):
        assert (page.number, page.label, page.has_text) == (i + 1, str(i + 1), True)
        assert f"Page about the {word}." in page.text
        others = set(PAGE_WORDS) - {word}
        assert not any(other in page.text for other in others)
        # cleanup: runs of spaces collapsed, no CR, no trailing spaces
        assert f"The {word} paragraph has extra spaces." in page.text
        assert "\r" not in page.text and "  " not in page.text
        assert all(line == line.rstrip() for line in page.text.splitlines())


def test_prompt_text_has_page_markers(text_pdf):
    prompt = load_document(text_pdf).prompt_text()
    for i, word in enumerate(PAGE_WORDS, 1):
        marker = f"[Page {i}]\n"
        assert prompt.count(marker) == 1
        assert prompt.index(marker) < prompt.index(f"Page about the {word}.")
    assert prompt.startswith("[Page 1]\n")


def test_page_labels_and_outline(labeled_pdf):
    doc = load_document(labeled_pdf)
    assert [p.label for p in doc.pages] == ["i", "ii", "1", "2", "3"]
    assert [p.number for p in doc.pages] == [1, 2, 3, 4, 5]
    assert doc.outline == [("Preface", 1), ("Chapter One", 3), ("Section 1.1", 4),
                           ("Chapter Two", 5)]
    prompt = doc.prompt_text()
    assert prompt.index("[Page ii]\n") < prompt.index("Page about the buffalo.")
    assert prompt.index("[Page 1]\n") < prompt.index("Page about the chinchilla.")
    assert "[Page 3]\nPage about the echidna." in prompt


def test_encrypted_pdf_needs_password(encrypted_pdf):
    with pytest.raises(PasswordRequired) as err:
        load_document(encrypted_pdf)
    assert err.value.wrong_password is False
    assert "password" in str(err.value) and "secret.pdf" in str(err.value)


def test_encrypted_pdf_wrong_password(encrypted_pdf):
    with pytest.raises(PasswordRequired) as err:
        load_document(encrypted_pdf, password="nope")
    assert err.value.wrong_password is True
    assert "wrong" in str(err.value)


def test_encrypted_pdf_right_password(encrypted_pdf):
    doc = load_document(encrypted_pdf, password="s3cret")
    assert doc.n_pages == len(PAGE_WORDS)
    assert "Page about the dolphin." in doc.pages[3].text


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-256"])
def test_owner_password_only_opens_without_asking(text_pdf, tmp_path, algorithm):
    path = pf.rewrite(text_pdf, tmp_path / "owner.pdf", encrypt=("", "owner-only", algorithm),
                      labels=[(0, 4, "/A", 1)], outline=[("Start", 0)])
    doc = load_document(path)
    assert "Page about the aardvark." in doc.pages[0].text
    assert [p.label for p in doc.pages] == ["A", "B", "C", "D", "E"]
    assert doc.outline == [("Start", 1)]


def test_pdf_detected_by_magic_bytes_not_extension(text_pdf, tmp_path):
    path = write(tmp_path, "report.txt", text_pdf.read_bytes())
    doc = load_document(path, name="My report")
    assert (doc.kind, doc.name, doc.n_pages) == ("pdf", "My report", len(PAGE_WORDS))


def test_truncated_pdf_is_malformed(text_pdf, tmp_path):
    data = text_pdf.read_bytes()
    path = write(tmp_path, "cut.pdf", data[: len(data) // 2])
    with pytest.raises(MalformedDocument) as err:
        load_document(path)
    assert "cut.pdf" in str(err.value) and "damaged" in str(err.value)


def test_random_bytes_named_pdf_is_malformed(tmp_path):
    path = write(tmp_path, "random.pdf", os.urandom(4096))
    with pytest.raises(MalformedDocument) as err:
        load_document(path)
    assert "random.pdf" in str(err.value) and "not a valid PDF" in str(err.value)


def test_pdf_header_with_garbage_is_malformed(tmp_path):
    path = write(tmp_path, "fake.pdf", b"%PDF-1.7\n" + os.urandom(4096))
    with pytest.raises(MalformedDocument) as err:
        load_document(path)
    assert "fake.pdf" in str(err.value)


def test_empty_file(tmp_path):
    for name in ("empty.pdf", "empty.txt"):
        with pytest.raises(EmptyDocument) as err:
            load_document(write(tmp_path, name, b""))
        assert name in str(err.value) and "empty" in str(err.value)


def test_image_only_pdf_has_no_text_layer(image_pdf):
    with pytest.raises(EmptyDocument) as err:
        load_document(image_pdf)
    message = str(err.value)
    assert "scan.pdf" in message and "no text layer" in message and "OCR" in message


def test_blank_pdf_without_chromium_is_empty(tmp_path):
    with pytest.raises(EmptyDocument, match="no text layer"):
        load_document(pf.blank_pdf(tmp_path / "blank.pdf"))


def test_mixed_pdf_loads_with_warning(mixed_pdf):
    doc = load_document(mixed_pdf)
    assert doc.n_pages == 3
    assert [p.has_text for p in doc.pages] == [True, False, True]
    assert doc.pages_without_text == ["2"]
    assert len(doc.warnings) == 1 and "page 2 " in doc.warnings[0]
    assert "gazelles" in doc.pages[0].text and "herons" in doc.pages[2].text
    assert "[Page 2]\n(no text on this page)" in doc.prompt_text()


def test_progress_counts_increase_to_total(long_pdf):
    calls = []
    doc = load_document(long_pdf, progress=lambda done, total: calls.append((done, total)))
    assert doc.n_pages == LONG_PAGES
    assert calls[-1] == (LONG_PAGES, LONG_PAGES)
    assert all(total == LONG_PAGES for _, total in calls)
    done = [d for d, _ in calls]
    assert done == sorted(set(done))
    assert max(b - a for a, b in zip(done, done[1:])) <= 5  # at least every few pages


def test_progress_callback_exception_propagates(text_pdf):
    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled()

    with pytest.raises(Cancelled):
        load_document(text_pdf, progress=cancel)


def test_long_pdf_extraction_speed(long_pdf):
    load_document(long_pdf)  # warm up
    start = time.perf_counter()
    doc = load_document(long_pdf)
    rate = doc.n_pages / (time.perf_counter() - start)
    assert doc.n_pages == LONG_PAGES
    assert "pagetoken57" in doc.pages[56].text and "pagetoken58" not in doc.pages[56].text
    assert rate >= 20, f"{rate:.1f} pages/s"


def test_concurrent_loads_from_threads(long_pdf, text_pdf):
    with ThreadPoolExecutor(max_workers=4) as pool:
        docs = list(pool.map(load_document, [long_pdf, text_pdf] * 3))
    assert [d.n_pages for d in docs] == [LONG_PAGES, len(PAGE_WORDS)] * 3
    assert docs[0].prompt_text() == docs[4].prompt_text()


def test_too_large_pdf(text_pdf):
    size = text_pdf.stat().st_size
    with pytest.raises(FileTooLarge) as err:
        load_document(text_pdf, max_bytes=size - 1)
    assert "text.pdf" in str(err.value) and "MB" in str(err.value)


# --------------------------------------------------------------------------- text files

def test_utf8_text_file(tmp_path):
    text = "Grüße aus Köln — naïve café.\r\nSecond   line  \x00with NUL\r\n\r\n\r\n\r\nNew paragraph"
    doc = load_document(write(tmp_path, "notes.txt", text.encode("utf-8")))
    assert (doc.kind, doc.n_pages, doc.warnings, doc.outline) == ("text", 1, [], [])
    assert doc.pages == [Page(1, "1", "Grüße aus Köln — naïve café.\nSecond line with NUL"
                                      "\n\nNew paragraph", True)]
    assert doc.prompt_text().startswith("[Page 1]\nGrüße aus Köln")


def test_markdown_file_keeps_indentation(tmp_path):
    text = "# Título\n\n- item\n    - nested ünïcode\n\n```\ncode  block\n```\n"
    for name in ("readme.md", "readme.markdown"):
        doc = load_document(write(tmp_path, name, text.encode("utf-8")))
        assert doc.kind == "text"
        assert "    - nested ünïcode" in doc.pages[0].text
        assert doc.pages[0].text.startswith("# Título")


def test_latin1_text_file_decodes_with_warning(tmp_path):
    doc = load_document(write(tmp_path, "old.txt", "Café crème à la française".encode("latin-1")))
    assert doc.pages[0].text == "Café crème à la française"
    assert len(doc.warnings) == 1 and "UTF-8" in doc.warnings[0]


def test_form_feeds_split_text_into_pages(tmp_path):
    doc = load_document(write(tmp_path, "paged.txt", b"one\fTwo\f\fthree\f"))
    assert [(p.label, p.text, p.has_text) for p in doc.pages] == [
        ("1", "one", True), ("2", "Two", True), ("3", "", False), ("4", "three", True)]


def test_whitespace_only_text_file_is_empty(tmp_path):
    with pytest.raises(EmptyDocument):
        load_document(write(tmp_path, "blank.txt", b"  \n\n \t\n"))


def test_text_progress_ends_at_total(tmp_path):
    calls = []
    load_document(write(tmp_path, "a.txt", b"hello"), progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (1, 1)


def test_binary_file_named_txt_is_unsupported(tmp_path):
    with pytest.raises(UnsupportedFile, match="binary"):
        load_document(write(tmp_path, "data.txt", bytes(range(256)) * 4))


def test_unsupported_extension(tmp_path):
    with pytest.raises(UnsupportedFile) as err:
        load_document(write(tmp_path, "slides.docx", b"PK\x03\x04 not really"))
    assert "'.docx'" in str(err.value) and "PDF" in str(err.value)


def test_too_large_text_file_message(tmp_path):
    path = write(tmp_path, "big.txt", b"x" * (3 * 1024 * 1024))
    with pytest.raises(FileTooLarge) as err:
        load_document(path, max_bytes=2 * 1024 * 1024)
    assert str(err.value) == "'big.txt' is too large (3.0 MB); the limit is 2.0 MB."


def test_missing_file(tmp_path):
    with pytest.raises(DocumentError, match="not found"):
        load_document(tmp_path / "gone.pdf")


# --------------------------------------------------------------------------- prompts

def test_prompt_for_several_documents(tmp_path):
    a = load_document(write(tmp_path, "a.txt", b"alpha text"))
    b = Document("b.pdf", "0" * 64, "pdf", [Page(1, "i", "bravo", True), Page(2, "1", "x", True)])
    prompt = prompt_for([a, b])
    assert prompt.index("a.txt (1 page)") < prompt.index("alpha text")
    assert prompt.index("alpha text") < prompt.index("b.pdf (2 pages)") < prompt.index("bravo")
    assert "[Page i]\nbravo" in prompt


def test_duplicate_labels_are_disambiguated():
    doc = Document("d.pdf", "0" * 64, "pdf",
                   [Page(1, "1", "a", True), Page(2, "1", "b", True), Page(3, "2", "c", True)])
    assert doc.prompt_text() == ("[Page 1, PDF page 1]\na\n\n[Page 1, PDF page 2]\nb\n\n"
                                 "[Page 2]\nc")
