"""Measure PDF text extraction speed (pages/s): fast path vs. pypdf fallback.

Usage: python bench/pdf_extract.py [--pages 240] [--pdf FILE] [--json OUT] [--repeat 3]

Without --pdf, a long text PDF is printed with headless Chromium (see
tests/pdf_factory.py). Prints one JSON object; --json also writes it to a file.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pypdf  # noqa: E402
import pypdfium2  # noqa: E402

import pdf_factory  # noqa: E402
from app.services import documents  # noqa: E402


def best_rate(fn, n_pages: int, repeat: int) -> float:
    """Best pages/s over `repeat` runs of fn()."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(n_pages / best, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=240, help="pages of the generated PDF")
    parser.add_argument("--pdf", type=Path, help="measure this PDF instead of generating one")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path (best is kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pdf-bench-") as tmp:
        pdf = args.pdf
        if pdf is None:
            pdf = Path(tmp) / "long.pdf"
            start = time.perf_counter()
            pdf_factory.print_pdf(
                pdf_factory.html_pages(pdf_factory.long_document_pages(args.pages)), pdf)
            print(f"generated {pdf.name} in {time.perf_counter() - start:.1f}s",
                  file=sys.stderr)
        data = pdf.read_bytes()
        doc = documents.load_document(pdf)
        n = doc.n_pages

        def fast_path():  # the whole service: pypdf metadata + PDFium text + cleanup
            documents.load_document(pdf)

        def pypdf_path():  # the service's fallback extractor
            reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
            documents._pypdf_texts(reader, pdf.name, [], None)

        result = {
            "file": str(args.pdf or f"generated ({args.pages} pages)"),
            "pages": n,
            "bytes": len(data),
            "chars": sum(len(p.text) for p in doc.pages),
            "fast_path_pages_per_s": best_rate(fast_path, n, args.repeat),
            "pypdf_path_pages_per_s": best_rate(pypdf_path, n, max(1, args.repeat - 2)),
            "versions": {"python": platform.python_version(), "pypdf": pypdf.__version__,
                         "pypdfium2": str(pypdfium2.PYPDFIUM_INFO)},
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
