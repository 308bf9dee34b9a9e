"""Synthetic recall sequences for distillation: key-value facts planted in real training text, asked about at the
end of the sequence.

Plain self-distillation on running text gives the memory little reason to keep an exact fact: almost every next
token is predictable from the window. The official recipe distils on long-context QA for this reason. Here a
fraction of the packed training sequences is turned into QA: 1..`max_facts` facts ("The locker number of Amara
Okafor is 40213.") are inserted at sentence ends of the sequence's own text, at least `min_distance` tokens before
the questions (the trainer passes the step's budget S + W, so they are outside the window), and the sequence ends
with questions and answers, either as plain "Q: / A:" lines or as a multi-turn chat in the model's chat template. The teacher (full attention)
copies the answer from the text; the student can only find it in its memory. The answer tokens' loss positions
can be weighted up (`TrainConfig.recall_weight`).

The phrasing, names and keys here are disjoint from the needle test of `bench/eval_needle.py` ("The secret code
for {name} is {6 digits}" with its own list of first names), so that test measures recall of a fact format the
memory was not trained on; `tests/test_train_recall.py` checks this.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("ahn_runtime.train")

FIRST = ["Amara", "Benedikt", "Celeste", "Darius", "Elif", "Florian", "Gwen", "Hamza", "Isolde", "Jasper", "Keiko",
         "Leopold", "Marisol", "Nikolai", "Odette", "Pavel", "Rania", "Sebastian", "Thea", "Umberto", "Valentina",
         "Wilhelm", "Yara", "Zeno", "Anouk", "Bastian", "Colette", "Emeka", "Ilse", "Matteo", "Noor", "Sven"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Castillo", "Novak", "Haddad", "Brennan", "Kowalski", "Ferreira",
        "Adeyemi", "Sato", "Petrov", "Gallagher", "Rossi", "Nakamura", "Mendez", "Larsen", "Dubois", "Chen",
        "Abernathy", "Quist", "Varga", "Whitfield"]
PLACES = ["warehouse", "clinic", "library", "harbour office", "observatory", "bakery", "print shop", "depot",
          "laboratory", "town hall", "ferry terminal", "bookbindery"]
CITIES = ["Lisbon", "Tromso", "Valparaiso", "Kyoto", "Accra", "Ghent", "Tbilisi", "Halifax", "Cusco", "Perth",
          "Bergen", "Izmir", "Porto", "Lyon", "Dundee", "Graz"]
ATTRS = ["locker number", "employee number", "room number", "account number", "parcel number", "badge number",
         "invoice number", "membership number", "license plate", "reference number", "serial number",
         "phone extension", "order number", "booking reference", "permit number", "case number"]
STATEMENTS = ["The {attr} of {ent} is {val}.", "For the record, the {attr} assigned to {ent} is {val}.",
              "Note that {ent} has the {attr} {val}.", "{Ent} was given the {attr} {val}."]
QUESTIONS = ["What is the {attr} of {ent}?", "Which {attr} was assigned to {ent}?", "What {attr} does {ent} have?"]
ANSWERS = ["The {attr} of {ent} is {val}.", "{val}", "It is {val}."]
CHAT_INTRO = ("Here is a text. Read it carefully; questions about it follow.\n\n<text>\n" "\x00TEXT\x00" "\n</text>\n\n")
PLAIN_INTRO = "\n\nQuestions about the text above.\n"
SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclass
class Fact:
    attr: str
    ent: str
    val: str

    def fill(self, template: str) -> str:
        cap = self.ent[0].upper() + self.ent[1:]
        return template.format(attr=self.attr, ent=self.ent, Ent=cap, val=self.val)


def make_value(rng: random.Random, attr: str) -> str:
    if attr in ("license plate", "booking reference"):
        letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(rng.choice((2, 3))))
        return f"{letters}-{rng.randrange(100, 10000)}"
    n = rng.randint(3, 8)
    return str(rng.randrange(10 ** (n - 1), 10 ** n))


def make_entity(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        return f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    if r < 0.8:
        return f"Dr. {rng.choice(LAST)}"
    return f"the {rng.choice(PLACES)} in {rng.choice(CITIES)}"


def make_facts(rng: random.Random, n: int) -> list[Fact]:
    facts, keys = [], set()
    while len(facts) < n:
        attr, ent = rng.choice(ATTRS), make_entity(rng)
        if (attr, ent) not in keys:
            keys.add((attr, ent))
            facts.append(Fact(attr, ent, make_value(rng, attr)))
    return facts


# ----------------------------------------------------------------------------------------------------------
# tokenisation helpers (work with data.HFTokenizer and data.ByteTokenizer)

def encode(tt, text: str) -> list[int]:
    return [int(x) for x in tt.encode_batch([text])[0]]


def encode_marked(tt, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids of the concatenated pieces and, per token, whether it overlaps a marked piece. A fast HF tokenizer
    encodes the whole text at once (natural token boundaries, marks from its offsets); otherwise piece by piece."""
    tok = getattr(tt, "tok", None)
    if tok is not None and getattr(tok, "is_fast", False):
        text, spans, at = "", [], 0
        for s, marked in pieces:
            if marked:
                spans.append((at, at + len(s)))
            text += s
            at += len(s)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, marks = [], []
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            ids.append(int(i))
            marks.append(any(a < e and b > s for s, e in spans))
        return ids, marks
    ids, marks = [], []
    for s, marked in pieces:
        t = encode(tt, s)
        ids += t
        marks += [marked] * len(t)
    return ids, marks


def boundary_ids(tt, vocab_size: int) -> np.ndarray:
    """Boolean [vocab]: the token's text ends a sentence or a line (facts are inserted after such tokens)."""
    out = np.zeros(vocab_size, dtype=bool)
    tok = getattr(tt, "tok", None)
    if tok is None:  # byte-level: '.', '!', '?', '\n'
        for c in SENTENCE_ENDS:
            out[ord(c)] = True
        return out
    texts = tok.batch_decode([[i] for i in range(min(vocab_size, len(tok)))])
    for i, s in enumerate(texts):
        out[i] = s.rstrip(" ").endswith(SENTENCE_ENDS)
    return out


# ----------------------------------------------------------------------------------------------------------
# the builder

class RecallBuilder:
    """build(seq, rng, min_distance) -> (ids int64 [L], answer_mask bool [L]) or None. answer_mask[t] is True
    where the logits at position t predict an answer token (the loss positions to weight). None when the sequence
    is too short for the facts, questions and `min_distance`."""

    def __init__(self, tt, vocab_size: int, max_facts: int = 8, chat_frac: float = 0.5, snap: int = 64):
        self.tt, self.max_facts, self.snap = tt, int(max_facts), int(snap)
        tok = getattr(tt, "tok", None)
        self.chat = tok is not None and bool(getattr(tok, "chat_template", None))
        self.chat_frac = chat_frac if self.chat else 0.0
        self.boundary = boundary_ids(tt, vocab_size)

    # frame: tokens before the text and the question/answer tail (with its answer marks)
    def _frame(self, rng, facts: list[Fact], chat: bool):
        order = facts[:]
        rng.shuffle(order)
        qa = [(f.fill(rng.choice(QUESTIONS)), f, rng.choice(ANSWERS)) for f in order]
        if not chat:
            pieces = [(PLAIN_INTRO, False)]
            for q, f, a in qa:
                pre, post = a.split("{val}")
                pieces += [(f"Q: {q}\nA: " + f.fill(pre), False), (f.val, True), (f.fill(post) + "\n", False)]
            return [], *encode_marked(self.tt, pieces)
        tok = self.tt.tok
        msgs = []
        for i, (q, f, a) in enumerate(qa):
            msgs.append({"role": "user", "content": (CHAT_INTRO + q) if i == 0 else q})
            msgs.append({"role": "assistant", "content": f.fill(a)})
        text = tok.apply_chat_template(msgs, tokenize=False)
        head, tail = text.split("\x00TEXT\x00")
        pieces, at = [], 0
        for _, f, a in qa:  # mark each answer's value, in order, inside the rendered tail
            i = tail.index(f.fill(a), at)
            j = i + f.fill(a).index(f.val)  # every answer template contains the value
            pieces += [(tail[at:j], False), (f.val, True)]
            at = j + len(f.val)
        pieces.append((tail[at:], False))
        tail_ids, marks = encode_marked(self.tt, pieces)
        return encode(self.tt, head), tail_ids, marks

    def build(self, seq, rng: random.Random, min_distance: int):
        """min_distance: tokens from every fact to the end of the text (the trainer passes the step's S + W)."""
        far = int(min_distance)
        seq = np.asarray(seq)
        L = len(seq)
        chat = rng.random() < self.chat_frac
        for n in range(rng.randint(1, self.max_facts), 0, -1):  # fewer facts if the frame does not fit
            facts = make_facts(rng, n)
            try:
                head, tail, marks = self._frame(rng, facts, chat)
            except (ValueError, KeyError, TypeError) as e:  # a chat template that renders the turns differently
                if not chat:
                    raise
                log.warning("chat template unusable for recall QA (%s); using plain Q/A lines", e)
                self.chat_frac, chat = 0.0, False
                head, tail, marks = self._frame(rng, facts, chat)
            stmts = [encode(self.tt, " " + f.fill(rng.choice(STATEMENTS)) + " ") for f in facts]
            hay = L - len(head) - len(tail) - sum(len(s) for s in stmts)
            if hay - far >= 16 * n:
                break
        else:
            return None
        body = seq[:hay]
        cuts = []
        for _ in stmts:  # a random point of the text far enough from the end, moved to the next sentence end
            p = rng.randrange(0, hay - far)
            ends = np.flatnonzero(self.boundary[body[p:min(p + self.snap, hay - far)]])
            cuts.append(p + 1 + int(ends[0]) if len(ends) else p)
        cuts.sort()
        parts, prev = [np.asarray(head, dtype=np.int64)], 0
        for c, s in zip(cuts, stmts):
            parts += [body[prev:c].astype(np.int64), np.asarray(s, dtype=np.int64)]
            prev = c
        parts += [body[prev:].astype(np.int64), np.asarray(tail, dtype=np.int64)]
        ids = np.concatenate(parts)
        assert len(ids) == L, (len(ids), L)
        mask = np.zeros(L, dtype=bool)
        ans = np.flatnonzero(marks) + (L - len(tail))
        mask[ans - 1] = True  # the logits at t predict token t + 1
        return ids, mask


__all__ = ["Fact", "RecallBuilder", "boundary_ids", "encode_marked", "make_facts"]
