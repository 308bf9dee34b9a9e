"""Pure logic of the evaluation harness in bench/ (metrics, truncation, needles, gap arithmetic) and smoke runs of
the scripts on the tiny oracle model."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.evallib import (HELDOUT, bucket_means, exact_match, gap_recovered, keyword_gated_f1, needle_answer_ok,
                           needle_text, normalize_answer, place_needle, qa_f1, qa_f1_zh, truncate_middle)
from runtime_helpers import ORACLE, SMOLLM2, gdn


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_normalisation_and_f1_em():
    assert normalize_answer("The Cat, a  dog!") == "cat dog"
    assert normalize_answer("An apple-pie.") == "applepie"
    assert qa_f1("the cat sat", "A cat sat down") == pytest.approx(0.8)  # p = 1, r = 2/3
    assert qa_f1("", "cat") == 0.0 and qa_f1("dog", "cat") == 0.0
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "eiffel tower") == 0.0
    assert qa_f1_zh("北京。", "北京") == pytest.approx(1.0)


def test_lveval_keyword_gate():
    # keywords "paris france": 1 of 2 recalled >= 20% -> plain F1 of [paris, capital] vs [paris]
    assert keyword_gated_f1("Paris is the capital", "Paris", "Paris France") == pytest.approx(2 * (1 / 3) / (4 / 3))
    assert keyword_gated_f1("It is a city", "Paris", "Paris") == 0.0
    # stop words never count as recalled keywords, although the ungated F1 would be > 0
    assert qa_f1("is", "is Paris") > 0
    assert keyword_gated_f1("is", "is Paris", "is Paris") == 0.0
    assert keyword_gated_f1("is", "is Paris", None) == pytest.approx(qa_f1("is", "is Paris"))


def test_qa_scoring_per_format():
    from bench.eval_qa import build_prompt, dataset_key, score_item
    lb = {"input": "Q?", "context": "C", "answers": ["August 9, 1787"], "dataset": "multifieldqa_en"}
    s = score_item("Anne was born August 9, 1787.", lb)
    assert s["metric"] == "qa_f1" and s["em"] == 0.0 and 0 < s["score"] < 100
    assert score_item("august 9 1787", lb) == {"metric": "qa_f1", "score": 100.0, "em": 100.0}
    lv = {"input": "Q?", "context": "C", "answers": ["the second year of Darius"], "answer_keywords": "Darius",
          "dataset": "hotpotwikiqa_mixup_16k", "language": "en"}
    assert dataset_key(lv) == "hotpotwikiqa_mixup"
    assert score_item("the second year of Cyrus", lv)["score"] == 0.0  # keyword missed: gated to 0
    assert score_item("second year of Darius", lv) == {"metric": "lveval_kw_f1", "score": 100.0, "em": 100.0}
    p = build_prompt({"input": "Who?", "context": "Text.", "dataset": "unknown-set"})
    assert p.startswith("Read the following text") and "Text." in p and p.endswith("Question: Who?\nAnswer:")


# ---- truncation and needles --------------------------------------------------------------------------------------
def test_truncate_middle():
    ids = list(range(10))
    assert truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert truncate_middle(ids, 5) == [0, 1, 7, 8, 9]
    assert truncate_middle(ids, 10) == ids and truncate_middle(ids, 0) == ids


class WordTokenizer:
    """Whitespace tokenizer stub (test helper): one id per word."""

    def __init__(self):
        self.vocab, self.words = {}, []

    def encode(self, text):
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def test_needle_at_exact_token_depth_whitespace():
    tok = WordTokenizer()
    hay = tok.encode(" ".join(f"w{i}{'.' if i % 10 == 9 else ''}" for i in range(500)))
    head, tail = tok.encode("system: read <doc>"), tok.encode("</doc> question? answer:")
    needle = tok.encode(needle_text("Alice", "123456"))
    for L in (40, 100, 300):
        for depth in (0.0, 0.25, 0.5, 1.0):
            ids, pos = place_needle(head, hay, needle, tail, L, depth)
            n = L - len(head) - len(needle) - len(tail)
            assert len(ids) == L and pos == len(head) + round(depth * n)
            assert ids[pos:pos + len(needle)] == needle and ids[:len(head)] == head and ids[-len(tail):] == tail
            assert ids[len(head):pos] + ids[pos + len(needle):L - len(tail)] == hay[:n]  # haystack trimmed in tokens
    # snapping: the needle starts right after a sentence end ("w..9."), still exactly L tokens
    ends = lambda i: tok.words[hay[i]].endswith(".")  # noqa: E731
    ids, pos = place_needle(head, hay, needle, tail, 300, 0.5, ends, snap=6)
    assert len(ids) == 300 and tok.words[ids[pos - 1]].endswith(".")
    assert abs(pos - len(head) - round(0.5 * (300 - len(head) - len(needle) - len(tail)))) <= 6
    with pytest.raises(ValueError):
        place_needle(head, hay, needle, tail, 10, 0.5)
    assert needle_answer_ok(" 123456.", "123456") and not needle_answer_ok(" 12345 6", "123456")
    assert not needle_answer_ok("unknown", "123456")


@pytest.mark.skipif(not os.path.isfile(SMOLLM2), reason=f"SmolLM2 GGUF not found at {SMOLLM2}")
def test_needle_at_exact_token_depth_smollm2():
    from transformers import AutoTokenizer

    from bench.eval_needle import frame_ids, sentence_end
    from bench.evallib import encode
    tok = AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2))
    head, tail = frame_ids(tok, "Bruno")
    assert tok.decode(tail).endswith("<|im_start|>assistant\nThe secret code for Bruno is")
    hay = encode(tok, "It was a fine day. The sea was calm, and the ship sailed on.\n" * 200)
    needle = encode(tok, needle_text("Bruno", "204861"))
    for L, depth in ((512, 0.1), (1000, 0.5), (2048, 0.9)):
        ids, pos = place_needle(head, hay, needle, tail, L, depth, sentence_end(tok, hay), 16)
        assert len(ids) == L and ids[pos:pos + len(needle)] == needle
        assert "The secret code for Bruno is 204861." in tok.decode(ids)
        assert tok.decode(ids[pos - 1:pos]).rstrip(" ").endswith((".", "\n"))


# ---- NLL arithmetic and smoke run --------------------------------------------------------------------------------
def test_gap_recovered_and_buckets():
    assert gap_recovered(3.0, 2.5, 2.0) == pytest.approx(0.5)
    assert gap_recovered(3.0, 2.0, 2.0) == pytest.approx(1.0) and gap_recovered(3.0, 3.0, 2.0) == 0.0
    assert gap_recovered(3.0, 3.5, 2.0) == pytest.approx(-0.5)
    assert gap_recovered(2.0, 1.9, 2.0) is None and gap_recovered(None, 1.0, 2.0) is None
    b = bucket_means(np.array([1.0, 3.0, 5.0, 7.0, 9.0]), np.array([1, 1, 1, 1, 1]), [0, 2, 5])
    assert [x["nll"] for x in b] == [2.0, 7.0] and [x["n"] for x in b] == [2, 3]


def test_parse_lengths():
    from bench.eval_nll import parse_lengths
    assert parse_lengths(None, 512, 16) == [1024, 2048, 4096, 8192]
    assert parse_lengths("8x,3000", 256, 16) == [2048, 3000]


needs_oracle = pytest.mark.skipif(not os.path.isdir(os.path.join(ORACLE, "models", "ahn_gdn")),
                                  reason=f"oracle models not found under {ORACLE}")


@needs_oracle
def test_chunked_nll_matches_one_shot_prefill():
    from bench.eval_nll import sequence_nll
    model = gdn(window=16, sinks=2)
    ids = torch.randint(0, model.vocab_size, (90,), generator=torch.Generator().manual_seed(3))
    per = {}
    for mode in ("full", "window", "ahn"):
        ref = F.cross_entropy(model.prefill(model.new_state(mode), ids[:-1], logits="all"), ids[1:], reduction="none")
        per[mode] = sequence_nll(model, mode, ids, chunk=32)
        np.testing.assert_allclose(per[mode], ref.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(per["window"][:18], per["full"][:18], rtol=1e-5, atol=1e-5)  # t < S + W: same keys
    assert np.abs(per["window"][18:] - per["full"][18:]).max() > 1e-3


@needs_oracle
def test_eval_nll_smoke_on_oracle(tmp_path):
    from bench.eval_nll import main
    out = tmp_path / "nll.json"
    main(["--base", os.path.join(ORACLE, "models", "base"), "--ahn", os.path.join(ORACLE, "models", "ahn_gdn"),
          "--synthetic", "--windows", "16,32", "--sinks", "2", "--max-mult", "8", "--docs", "2", "--chunk", "64",
          "--json", str(out), "--md", str(tmp_path / "nll.md")], model=gdn(window=32, sinks=2))
    res = json.loads(out.read_text())
    assert {"base", "ahn", "results", "meta", "documents", "timing_s"} <= set(res)
    r = res["results"]["16"]
    assert r["length"] == 128 and r["lengths"] == [32, 64, 128] and r["n_docs"] == 2
    for mode in ("full", "window", "ahn"):
        m = r["modes"][mode]
        assert {"nll_beyond_window", "nll_at_8W", "by_length", "buckets", "log_buckets"} <= set(m)
        assert np.isfinite(m["nll_beyond_window"]) and len(m["buckets"]) == 8
    g = r["gap_recovered"]
    assert set(g) == {"overall", "at_8W", "by_length", "buckets"}
    f, w, a = (r["modes"][k]["nll_beyond_window"] for k in ("full", "window", "ahn"))
    assert g["overall"] == pytest.approx((w - a) / (w - f))
    assert "gap recovered" in (tmp_path / "nll.md").read_text()


@needs_oracle
@pytest.mark.skipif(not os.path.isfile(HELDOUT), reason=f"held-out corpus not found at {HELDOUT}")
def test_eval_qa_and_needle_smoke_on_tiny_chat_model(tmp_path):
    """Both scripts end to end on the oracle base with the app tests' tiny BPE tokenizer + ChatML template."""
    from app_models import tiny_ahn_model

    from bench import eval_needle, eval_qa
    base, ahn = (str(p) for p in tiny_ahn_model(tmp_path))
    data = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "data")
    res = eval_qa.main(["--base", base, "--ahn", ahn, "--data", os.path.join(data, "sample_longbench.jsonl") + ","
                        + os.path.join(data, "sample_lveval.jsonl"), "--window", "32", "--sinks", "2",
                        "--max-length", "200", "--max-new-tokens", "3", "--modes", "ahn",
                        "--pred", str(tmp_path / "pred.jsonl"), "--json", str(tmp_path / "qa.json")])
    preds = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and {p["mode"] for p in preds} == {"ahn"}
    assert all(p["prompt_tokens"] <= 200 + 40 for p in preds)  # truncated prompt + chat frame
    assert res["scores"]["ahn"]["hotpotwikiqa_mixup"]["metric"] == "lveval_kw_f1"
    assert set(res["scores"]["ahn"]) == {"multifieldqa_en", "hotpotqa", "multifieldqa_en_mixup", "hotpotwikiqa_mixup"}
    plot = importlib.util.find_spec("matplotlib") is not None  # requirements-bench.txt, not the test requirements
    res = eval_needle.main(["--base", base, "--ahn", ahn, "--window", "32", "--sinks", "2", "--lengths", "288",
                            "--depths", "0.2,0.8", "--trials", "2", "--max-new-tokens", "2", "--modes", "full,ahn",
                            "--json", str(tmp_path / "needle.json")] + (["--plot", str(tmp_path / "n.png")] if plot else []))
    cells = res["cells"]["ahn"]["288"]["0.2"]
    assert len(cells) == 2 and all(0 < c["needle_pos"] < 288 for c in cells)
    assert set(res["accuracy"]) == {"full", "ahn"} and (not plot or (tmp_path / "n.png").stat().st_size > 0)
    ow = res["outside_window"]["ahn"]  # both depths put the needle more than W = 32 tokens back
    assert ow["trials"] == 4 and ow["correct"] == sum(c["ok"] for v in res["cells"]["ahn"]["288"].values() for c in v)


def test_needle_outside_window_accuracy():
    from bench.eval_needle import outside_window
    cell = lambda back, ok: {"tokens_back": back, "ok": ok}  # noqa: E731
    cells = {"window": {"1024": {"0.25": [cell(750, False), cell(760, True)], "0.75": [cell(290, True)]}},
             "ahn": {"1024": {"0.25": [cell(750, True), cell(760, True)], "0.75": [cell(290, False)]}}}
    got = outside_window(cells, 512)
    assert got == {"window": {"trials": 2, "correct": 1, "accuracy": 0.5},
                   "ahn": {"trials": 2, "correct": 2, "accuracy": 1.0}}
    assert outside_window(cells, 1000)["ahn"] == {"trials": 0, "correct": 0, "accuracy": None}
