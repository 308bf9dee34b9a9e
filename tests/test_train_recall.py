"""Recall sequences for distillation (ahn_runtime/train/recall.py): facts planted in real text far before the
questions, answers marked at the right loss positions, the rest of the text kept, phrasing disjoint from the needle
evaluation, and the trainer's use of them (weighted loss, answer KL logged, deterministic on resume)."""
from __future__ import annotations

import math
import os
import random
import re

import numpy as np
import pytest
import torch

from ahn_runtime.train import recall as R
from ahn_runtime.train.data import ByteTokenizer, HFTokenizer
from tests.test_train import BASE, GGUF, _cfg, _write_corpus

pytestmark = pytest.mark.skipif(not os.path.isdir(BASE), reason="oracle models not available")


def _text_stream(tt, n):
    rng = random.Random(5)
    words = ["The harbour was quiet.", "Ships came in at dawn,", "and the nets were mended.", "Rain fell\n",
             "Nobody spoke of it again!", "Why would they?"]
    ids = []
    while len(ids) < n:
        ids += R.encode(tt, " " + rng.choice(words))
    return np.asarray(ids[:n], dtype=np.uint32)


def _check_sequence(tt, seq, built, min_distance, decode):
    ids, mask = built
    L = len(seq)
    assert ids.shape == (L,) and mask.shape == (L,) and ids.dtype == np.int64
    text = decode(ids.tolist())
    answers = np.flatnonzero(mask)
    assert len(answers) > 0
    runs = np.split(answers, np.flatnonzero(np.diff(answers) > 1) + 1)  # one run of positions per answer
    values = [decode(ids[r + 1].tolist()).strip() for r in runs]  # the tokens those positions predict
    asked = re.findall(r"(?:Q: |\n|user\n)((?:What|Which)[^?]*\?)", text)
    assert len(asked) == len(values), (asked, values)
    # each answer is exactly a value (the marks sit on the value tokens), stated earlier in the text at least
    # min_distance tokens before the first question
    assert all(re.fullmatch(r"[A-Z]{2,3}-\d{3,4}|\d{3,8}", v) for v in values), values
    first_q = min(i for i in range(L) if decode(ids[i:i + 3].tolist()).lstrip().startswith(("Q:", "What", "Which")))
    for v in values:
        stated = decode(ids[:first_q - min_distance].tolist())
        assert re.search(rf"(is|the [a-z ]+) {re.escape(v)}\.", stated), (v, stated[-300:])
    return text


@pytest.mark.parametrize("chat_frac", [0.0, 1.0])
def test_recall_sequences_real_tokenizer(chat_frac):
    if not os.path.isfile(GGUF):
        pytest.skip("SmolLM2 test model not fetched")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    tt = HFTokenizer(tok, 49152)
    b = R.RecallBuilder(tt, 49152, max_facts=6, chat_frac=chat_frac)
    assert b.chat
    seq = _text_stream(tt, 4096)
    seen_chat = False
    for i in range(6):
        built = b.build(seq, random.Random(i), 1024)
        assert built is not None
        text = _check_sequence(tt, seq, built, 1024, tok.decode)
        seen_chat |= "<|im_start|>assistant" in text
    assert seen_chat == (chat_frac == 1.0)


def test_recall_byte_tokenizer_keeps_text_and_marks_answers():
    tt = ByteTokenizer(1024, None)
    b = R.RecallBuilder(tt, 1024, max_facts=3)
    assert not b.chat and b.chat_frac == 0.0
    seq = _text_stream(tt, 3000)
    for i in range(5):
        rng = random.Random(100 + i)
        built = b.build(seq, rng, 300)
        ids, mask = built
        text = bytes(ids.astype(np.uint8).tolist()).decode()
        _check_sequence(tt, seq, built, 300, lambda x: bytes(np.asarray(x, dtype=np.uint8).tolist()).decode())
        # cut out the statements and the question tail: exactly the prefix of the original text remains
        tail = text.index(R.PLAIN_INTRO)
        body = text[:tail]
        stmts = re.findall(r" (?:The|For the record|Note that|[A-Z][a-z.]+ [A-Za-z]+ was given|Dr\. [A-Za-z]+ was "
                           r"given|The [a-z ]+ in [A-Za-z]+ was given)[^.]*?(?:Dr\. [A-Za-z]+)?[^.]*?"
                           r"(?:\d{3,8}|[A-Z]{2,3}-\d+)\. ", body)
        assert 1 <= len(stmts) <= 3
        for s in stmts:
            body = body.replace(s, "", 1)
        assert body == bytes(seq[:len(body)].astype(np.uint8).tolist()).decode()
    # too short for min_distance: no recall sequence
    assert b.build(seq[:320], random.Random(0), 300) is None


def test_recall_phrasing_is_disjoint_from_the_needle_evaluation():
    from bench import evallib
    assert not set(R.FIRST) & set(evallib.NAMES)
    assert not set(R.LAST) & set(evallib.NAMES)
    for t in R.STATEMENTS + R.QUESTIONS + R.ANSWERS + [R.CHAT_INTRO, R.PLAIN_INTRO] + R.ATTRS:
        assert "secret" not in t.lower() and "code" not in t.lower()
    rng = random.Random(0)
    facts = R.make_facts(rng, 200)
    assert len({(f.attr, f.ent) for f in facts}) == 200
    assert {len(f.val) for f in facts if f.val.isdigit()} == set(range(3, 9))


def test_trainer_recall_weighted_loss_logged_and_deterministic(tmp_path):
    from ahn_runtime.train.trainer import Trainer
    corpus = tmp_path / "train.jsonl.gz"
    _write_corpus(corpus, n_docs=12)
    kw = dict(seq_len=512, steps=3, budget_choices=(64, 128), recall_frac=1.0, recall_weight=5.0,
              recall_max_facts=2, base=BASE)
    t1 = Trainer(_cfg(tmp_path, corpus, **kw))
    ids0, mask0 = t1._recall(next(PackedAgain(t1)), 0, 128)
    assert mask0 is not None and mask0.sum() > 0
    t1.train()
    t1.close()
    recs = t1.history
    assert all("answer_kl" in r and math.isfinite(r["answer_kl"]) and math.isfinite(r["kl"]) for r in recs)
    # same seed, same step -> the same recall sequence
    t2 = Trainer(_cfg(tmp_path, corpus, out=str(tmp_path / "o2"), **kw))
    ids1, mask1 = t2._recall(next(PackedAgain(t2)), 0, 128)
    t2.close()
    assert torch.equal(ids0, ids1) and torch.equal(mask0, mask1)
    # weighting: the loss with answer_weight 5 exceeds the plain one by 4 x (answer KL sum) / n positions
    d = t2.distiller
    W, S = 100, 8
    with torch.no_grad():
        plain, n = d(ids0, W, S)
        weighted, _ = d(ids0, W, S, mask0, 5.0)
    k = int(mask0[W + S:].sum())
    assert k > 0
    expect = plain + 4.0 * d.last_stats["answer_kl"] * k / n
    assert abs(weighted.item() - expect.item()) < 1e-4 * expect.item()


class PackedAgain:
    """The first packed sequence of a trainer's data stream, without consuming the trainer's own iterator."""

    def __init__(self, tr):
        from ahn_runtime.train.data import PackedSequences
        self.ps = PackedSequences(tr.corpus, tr.cfg.seq_len, tr.cfg.seed)

    def __next__(self):
        return next(self.ps)


def test_recall_falls_back_to_plain_lines_when_the_chat_template_drops_the_text():
    if not os.path.isfile(GGUF):
        pytest.skip("SmolLM2 test model not fetched")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{% endfor %}"  # renders no content at all
    tt = HFTokenizer(tok, 49152)
    b = R.RecallBuilder(tt, 49152, max_facts=3, chat_frac=1.0)
    seq = _text_stream(tt, 2048)
    built = b.build(seq, random.Random(0), 512)
    assert built is not None and b.chat_frac == 0.0
    text = _check_sequence(tt, seq, built, 512, tok.decode)
    assert R.PLAIN_INTRO.strip() in text and "<user>" not in text
