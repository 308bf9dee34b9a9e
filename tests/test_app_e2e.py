"""End-to-end tests against a launched `python launch.py` (real SmolLM2-135M on CPU, window 256 + 4 sinks):
the scripting API through gradio_client, and a real browser (Debian's chromium driven by playwright)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytest.importorskip("gradio", reason="the app's packages are not installed: pip install -r requirements-dev.txt")
pytest.importorskip("gradio_client", reason="gradio_client is not installed: pip install -r requirements-dev.txt")

import pdf_factory as pf  # noqa: E402
from app_fixtures import APP_MODELS_DIR, ROOT, launch_app, make_documents, smollm2_gguf, stop_app

pytestmark = pytest.mark.slow
MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return make_documents(tmp_path_factory.mktemp("e2e-docs"), pf.find_chromium())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("SmolLM2 test model missing (scripts/test.sh fetches it into AHN_TEST_MODELS)")
    cache = tmp_path_factory.mktemp("e2e-cache")
    launched = launch_app(["--base", str(gguf), "--models-dir", str(APP_MODELS_DIR), "--cache-dir", str(cache),
                           "--window", "256", "--sinks", "4", "--chunk-size", "256",
                           "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-new-tokens", "12"])
    try:
        yield launched
    finally:
        stop_app(launched)


def client(app):
    from gradio_client import Client
    return Client(app.url, verbose=False)


def files(*paths):
    from gradio_client import handle_file
    return [handle_file(str(p)) for p in paths]


# ------------------------------------------------------------------------------------------------ launcher
def test_launcher_binds_localhost_without_share_link(app):
    out = app.output()
    assert "Running on local URL:  http://127.0.0.1:" in out
    assert "gradio.live" not in out and "public URL" not in out.lower()
    assert "AHN mode is unavailable" in out  # no AHN weights given: explained


def test_launcher_refuses_quantization_on_cpu():
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--quantization", "nf4", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr


# ------------------------------------------------------------------------------------------------ API
def test_api_named_endpoints(app):
    api = client(app).view_api(return_format="dict", print_info=False)
    named = api["named_endpoints"]
    assert {"/upload", "/ask", "/memory", "/stop", "/compare", "/info", "/load_model"} <= set(named)
    assert not any(k.startswith("/ui_") for k in named)  # UI events are not part of the API
    assert [p["parameter_name"] for p in named["/ask"]["parameters"]] == ["question", "mode", "max_new_tokens"]
    assert [p["parameter_name"] for p in named["/load_model"]["parameters"]] == ["preset"]


def test_api_model_menu_and_refused_loads_keep_the_model(app):
    """The model menu over the API; loads that cannot happen say why and leave the model as it is (no real
    switch here: the other tests share this app's model)."""
    from gradio_client.exceptions import AppError
    c = client(app)
    info = c.predict(api_name="/info")
    options = {o["id"]: o for o in info["options"]}
    assert info["loaded"] == "launched" and options["launched"]["loaded"]  # started with --base: its own entry
    assert {f"qwen2.5-{s}-ahn-{v}" for s in ("3b", "7b", "14b") for v in ("gdn", "dn", "mamba2")} <= set(options)
    assert "smollm2-135m-ahn" in options
    with pytest.raises(AppError, match="unknown preset 'nope'"):
        c.predict("nope", api_name="/load_model")
    if info["model"]["device"] == "cpu":
        assert options["qwen2.5-14b-ahn-gdn"]["status"] == "needs a CUDA GPU"
        with pytest.raises(AppError, match="needs a CUDA GPU"):
            c.predict("qwen2.5-14b-ahn-gdn", api_name="/load_model")
    same = c.predict("launched", api_name="/load_model")
    assert same["changed"] is False and same["model"] == info["model"]
    assert c.predict(api_name="/info")["model"] == info["model"]


def test_api_upload_ask_stream_memory(app, docs):
    c = client(app)
    paths = [docs["txt"]] + ([docs["pdf"]] if "pdf" in docs else [])
    summary = c.predict(files(*paths), api_name="/upload")
    names = {d["name"]: d for d in summary["documents"]}
    assert names["notes.txt"]["pages"] == 3 and names["notes.txt"]["tokens"] > 100
    if "pdf" in docs:
        assert names["facts.pdf"]["pages"] == 3 and names["facts.pdf"]["pages_without_text"] == []
    assert summary["modes"] == ["full", "window"] and "ahn" not in summary["budgets"]
    assert summary["budgets"]["full"]["tokens"] == 8192 and summary["budgets"]["full"]["fits"]
    assert summary["budgets"]["window"]["beyond_window"] > 0  # says what window mode drops
    before = c.predict(api_name="/memory")
    job = c.submit("Who was the lighthouse keeper of Harrow Point?", "window", 12, api_name="/ask")
    partials = [o for o in job]
    answer = job.result()
    assert answer and answer.strip()
    assert len(partials) >= 2 and all(answer.startswith(p[:len(p)]) for p in partials[:-1])  # streamed
    mem = c.predict(api_name="/memory")
    assert mem["tokens"]["processed"] > summary["prompt_tokens"] > 0
    assert mem["tokens"]["in_window"] <= 256 + 4 and mem["tokens"]["dropped"] > 0 and mem["mode"] == "window"
    assert mem["parts"]["weights"] > 100 * 2**20 and mem["device_used"] > 0 and mem["device_total"] > 0
    assert mem["last_generation"]["tokens_per_s"] and mem["series"]["window"]
    assert before["tokens"]["processed"] < mem["tokens"]["processed"]
    full = c.predict("And the harbour stew?", "full", 6, api_name="/ask")
    assert isinstance(full, str)
    mem = c.predict(api_name="/memory")
    assert mem["mode"] == "full" and mem["tokens"]["dropped"] == 0
    assert mem["tokens"]["in_window"] == mem["tokens"]["processed"]


def test_api_bad_files_and_errors_keep_the_app_working(app, docs):
    from gradio_client.exceptions import AppError
    c = client(app)
    bad = [docs["empty"], docs["malformed"], docs["fake_pdf"], docs["unsupported"]]
    bad += [docs[k] for k in ("encrypted", "image_only", "truncated") if k in docs]
    summary = c.predict(files(*bad), api_name="/upload")
    kinds = {e["name"]: e["kind"] for e in summary["errors"]}
    assert kinds["empty.txt"] == "empty" and kinds["broken.pdf"] == "malformed"
    assert kinds["program.exe"] == "unsupported"
    if "encrypted" in docs:
        assert kinds["locked.pdf"] == "password" and summary["needs_password"] == ["locked.pdf"]
        assert kinds["scan.pdf"] == "empty"
        wrong = c.predict([], "nope", api_name="/upload")
        assert any("wrong" in e["error"] for e in wrong["errors"])
        ok = c.predict([], "s3cret", api_name="/upload")
        assert [d["name"] for d in ok["documents"]] == ["locked.pdf"] and ok["needs_password"] == []
    with pytest.raises(ValueError, match="maximum file size"):  # over --max-upload-mb: refused at upload
        c.predict(files(docs["big"]), api_name="/upload")
    with pytest.raises(AppError, match="AHN mode is unavailable"):
        c.predict("Hi", "ahn", 4, api_name="/ask")
    with pytest.raises(AppError, match="Unknown mode"):
        c.predict("Hi", "turbo", 4, api_name="/ask")
    with pytest.raises(AppError, match="Type a question"):
        c.predict("  ", "window", 4, api_name="/ask")
    assert c.predict("Still there?", "window", 3, api_name="/ask") is not None


def test_api_sessions_are_separate_and_queued(app, docs):
    a, b = client(app), client(app)
    a.predict(files(docs["md"]), api_name="/upload")
    assert b.predict([], api_name="/upload")["documents"] == []  # b does not see a's documents
    jobs = [a.submit("What does the ticket cost?", "window", 10, api_name="/ask"),
            b.submit("Say hello.", "full", 10, api_name="/ask")]
    results = [j.result(timeout=180) for j in jobs]
    assert all(isinstance(r, str) for r in results)
    ma, mb = a.predict(api_name="/memory"), b.predict(api_name="/memory")
    assert ma["last_generation"]["mode"] == "window" and mb["last_generation"]["mode"] == "full"


def test_api_stop_halts_generation(app, docs):
    c = client(app)
    c.predict(files(docs["md"]), api_name="/upload")
    job = c.submit("Write a very long story about a museum, with many chapters.", "window", 400, api_name="/ask")
    t0 = time.time()
    while job.status().code.name not in ("PROCESSING", "ITERATING") or not job.outputs():
        assert time.time() - t0 < 120 and not job.done()
        time.sleep(0.1)
    assert c.predict(api_name="/stop") == {"stopped": True}
    t_stop = time.time()
    answer = job.result(timeout=60)
    assert time.time() - t_stop < 10
    mem = c.predict(api_name="/memory")
    assert mem["last_generation"]["stopped"] and mem["last_generation"]["tokens"] < 400
    assert answer
    assert c.predict(api_name="/stop") == {"stopped": False}  # nothing running any more


# ------------------------------------------------------------------------------------------------ browser
@pytest.fixture(scope="module")
def browser():
    chromium = pf.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def _bot_texts(page) -> list[str]:
    return page.eval_on_selector_all('#chat [data-testid="bot"]', "els => els.map(e => e.innerText)")


def _mem_tokens(page) -> int:
    return int(page.get_attribute("#memory", "data-tokens") or 0)


def test_browser_upload_ask_stream_memory_stop_reload(app, docs, browser):
    if "pdf" not in docs:
        pytest.skip("chromium could not print the test PDF")
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    external = []
    ctx.on("request", lambda r: external.append(r.url)
           if not r.url.startswith((app.url, "data:", "blob:")) else None)
    page = ctx.new_page()
    page.set_default_timeout(120_000)
    page.goto(app.url)
    page.wait_for_selector("#memory")
    # the memory panel refreshes about once a second while the page is open
    t1 = page.get_attribute("#memory", "data-updated")
    page.wait_for_function(f"document.querySelector('#memory').dataset.updated !== '{t1}'", timeout=10_000)
    tokens_before = _mem_tokens(page)

    page.set_input_files("#upload input[type=file]", str(docs["pdf"]))
    page.wait_for_function("document.querySelector('#documents-panel').innerText.includes('Total')")
    table = page.inner_text("#documents-panel")
    assert "facts.pdf" in table and "Full attention" in table and "Window only" in table

    page.fill("#question textarea", "Who was the lighthouse keeper of Harrow Point?")
    page.press("#question textarea", "Enter")
    seen, t0 = set(), time.time()
    while time.time() - t0 < 120:
        texts = _bot_texts(page)
        if texts:
            seen.add(texts[-1])
            if "tokens" in texts[-1] and "Window only" in texts[-1]:  # the stats line ends the answer
                break
        time.sleep(0.05)
    final = _bot_texts(page)[-1]
    assert "first token" in final and len(seen) >= 3, seen  # placeholder, partial text(s), final
    page.wait_for_function(f"Number(document.querySelector('#memory').dataset.tokens) > {tokens_before + 100}",
                           timeout=10_000)
    assert "Tokens processed" in page.inner_text("#memory") and page.locator("#mem-plot polyline").count() >= 1

    # Stop in the middle of a long answer
    page.get_by_text("Generation settings").click()
    page.fill("#max-new input[type=number]", "400")
    page.press("#max-new input[type=number]", "Enter")
    page.fill("#question textarea", "Write a very long story about the lighthouse, in many chapters.")
    page.press("#question textarea", "Enter")
    page.wait_for_function("""() => { const b = [...document.querySelectorAll('#chat [data-testid="bot"]')];
        return b.length >= 2 && b[b.length - 1].innerText.trim().length > 20; }""")
    page.wait_for_function("document.querySelector('#memory .live-dot') !== null", timeout=10_000)
    page.click("#stop")
    t_stop = time.time()
    page.wait_for_function("""() => { const b = [...document.querySelectorAll('#chat [data-testid="bot"]')];
        return b[b.length - 1].innerText.includes('stopped by you'); }""", timeout=30_000)
    assert time.time() - t_stop < 15
    n_bot = len(_bot_texts(page))

    # a reload keeps this tab's chat and documents; another tab has its own
    page.reload()
    page.wait_for_function(f"document.querySelectorAll('#chat [data-testid=\"bot\"]').length === {n_bot}")
    assert "facts.pdf" in page.inner_text("#documents-panel")
    other = ctx.new_page()
    other.goto(app.url)
    other.wait_for_selector("#memory")
    time.sleep(1.5)
    assert len(_bot_texts(other)) == 0 and "No documents" in other.inner_text("#documents-panel")
    assert external == [], f"the page contacted other hosts: {external[:5]}"
    ctx.close()
