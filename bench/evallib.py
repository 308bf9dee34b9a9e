"""Shared pieces of the long-context evaluation scripts (eval_nll, eval_needle, eval_qa).

Pure logic (metrics, truncation, needle placement, gap arithmetic) needs neither torch nor a model, so the tests
can check it quickly. Model-facing helpers take an AHNModel from ahn_runtime.
"""
from __future__ import annotations

import datetime
import gzip
import json
import os
import platform
import random
import re
import string
import sys
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("AHN_SHARED") or os.path.join(os.path.dirname(REPO), "shared")
HELDOUT = os.path.join(SHARED, "data", "corpus", "heldout.jsonl.gz")


# ---- held-out corpus ----------------------------------------------------------------------------------------
def load_docs(path: str = HELDOUT, lang: str | None = None, sources: list[str] | None = None) -> list[dict]:
    """Documents of the held-out split (gzip JSONL, field `text`). Refuses anything but the held-out split."""
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if d.get("split", "heldout") != "heldout":
                raise ValueError(f"{path}: document {d.get('id')} is from split {d.get('split')!r}, not heldout")
            if lang and d.get("lang") != lang:
                continue
            if sources and d.get("source") not in sources:
                continue
            docs.append(d)
    if not docs:
        raise ValueError(f"no held-out documents in {path} match lang={lang!r} sources={sources!r}")
    return docs


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text without special tokens (BOS etc.)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def doc_prefix_ids(tokenizer, text: str, n_tokens: int, chars_per_token: int = 8) -> list[int]:
    """The first n_tokens token ids of text (tokenises only a prefix of the characters; [] if too short)."""
    ids = encode(tokenizer, text[: n_tokens * chars_per_token])
    if len(ids) < n_tokens and len(text) > n_tokens * chars_per_token:
        ids = encode(tokenizer, text)
    return ids[:n_tokens] if len(ids) >= n_tokens else []


def pick_documents(docs: list[dict], tokenizer, n_tokens: int, n_docs: int, seed: int) -> list[tuple[str, list[int]]]:
    """n_docs (doc id, first n_tokens ids) from a seeded shuffle of docs, skipping those that are too short."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order:
        ids = doc_prefix_ids(tokenizer, docs[i]["text"], n_tokens)
        if ids:
            out.append((docs[i]["id"], ids))
        if len(out) == n_docs:
            break
    if len(out) < n_docs:
        print(f"warning: only {len(out)} held-out documents have >= {n_tokens} tokens", file=sys.stderr)
    return out


# ---- NLL aggregation ------------------------------------------------------------------------------------------
def gap_recovered(nll_window: float, nll_ahn: float, nll_full: float, eps: float = 1e-6) -> float | None:
    """Fraction of the window->full NLL gap that AHN recovers: (window - ahn) / (window - full).
    1 = as good as full attention, 0 = no better than the window alone, < 0 = worse than the window.
    None when the gap is (numerically) zero or an input is missing."""
    if None in (nll_window, nll_ahn, nll_full):
        return None
    gap = nll_window - nll_full
    if abs(gap) < eps:
        return None
    return (nll_window - nll_ahn) / gap


def bucket_edges(window: int, length: int, width: int | None = None) -> list[int]:
    """Bucket boundaries over positions [0, length): every `width` (default: W) tokens."""
    width = width or window
    edges = list(range(0, length, width)) + [length]
    return sorted(set(edges))


def bucket_means(nll_sum, count, edges: list[int]) -> list[dict]:
    """Mean NLL per bucket [lo, hi) from per-position sums and counts (sequences of equal length)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = sum(count[lo:hi])
        out.append({"lo": lo, "hi": hi, "n": int(n), "nll": float(sum(nll_sum[lo:hi]) / n) if n else None})
    return out


def mean_over(nll_sum, count, lo: int, hi: int) -> float | None:
    n = sum(count[lo:hi])
    return float(sum(nll_sum[lo:hi]) / n) if n else None


# ---- QA metrics (LongBench / LV-Eval) ------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """LongBench/SQuAD normalisation: lowercase, drop punctuation, drop articles (a, an, the), squash spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏．"


def normalize_zh_answer(s: str) -> str:
    """LongBench's Chinese normalisation: lowercase, drop ASCII + CJK punctuation and all whitespace."""
    drop = set(string.punctuation + ZH_PUNCT)
    return "".join(ch for ch in s.lower() if ch not in drop and not ch.isspace())


def zh_tokens(s: str) -> list[str]:
    """Word tokens for Chinese: jieba when installed (as LongBench), otherwise single characters."""
    try:
        import jieba  # noqa: PLC0415  optional
        toks = [normalize_zh_answer(t) for t in jieba.cut(s, cut_all=False)]
    except ImportError:
        toks = list(normalize_zh_answer(s))
    return [t for t in toks if t]


def f1_tokens(pred: list[str], gold: list[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def qa_f1(pred: str, gold: str) -> float:
    """LongBench qa_f1_score: token F1 of the normalised strings."""
    return f1_tokens(normalize_answer(pred).split(), normalize_answer(gold).split())


def qa_f1_zh(pred: str, gold: str) -> float:
    return f1_tokens(zh_tokens(pred), zh_tokens(gold))


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


# LV-Eval's stop words: ignored when checking that the prediction recalls the answer keywords
LVEVAL_STOP_EN = set("and to of in her was with for it from is that his he by she they or at because be on are "
                     "their what as had were about being this who but have has when which does".split())
LVEVAL_STOP_ZH = set("的 和 是 等 在 年 可以 为 与 ‰ 了 或 一种 月 c 至 日 有 进行 于 不 中 × 根据 小 由 亩 也 要 指 法 会 元 "
                     "主要 以及 通过 首先 对 然后 号 以 所 后 丁 包括 无 将 用 能 形 方面 因素 位于 而 从 到 一定 用于 但 使用 "
                     "让 具有 并 亿元 万元 上 类 基于 才 来 地 片 其他 个 或者 变成 一 它 点 采用 时 人 却 名 该 并且 比 约 及 "
                     "最 原因 方式 已 包含 中国 大 能够 作用 相关 吗 之间 被 再 其 这些 这 说 这样 必须 如何 最后 这种 多 因此 "
                     "提供 需要 什么".split())


def keyword_gated_f1(pred: str, gold: str, keywords: str | None, zh: bool = False) -> float:
    """LV-Eval's F1 with answer-keyword recall: 0 if the prediction recalls fewer than 20% (en) / 40% (zh) of the
    answer-keyword tokens (stop words do not count as recalled); otherwise the plain token F1 against gold."""
    toks = zh_tokens if zh else (lambda s: normalize_answer(s).split())
    p, g = toks(pred), toks(gold)
    if keywords:
        kw = toks(keywords)
        stop = LVEVAL_STOP_ZH if zh else LVEVAL_STOP_EN
        common = Counter(p) & Counter(kw)
        hit = sum(n for w, n in common.items() if w not in stop)
        if not kw or hit / len(kw) < (0.4 if zh else 0.2):
            return 0.0
    return f1_tokens(p, g)


# ---- prompts: truncation and needles ----------------------------------------------------------------------------
def truncate_middle(ids: list[int], max_len: int) -> list[int]:
    """LongBench truncation: keep the first max_len//2 and the last max_len - max_len//2 tokens."""
    ids = list(ids)
    if max_len <= 0 or len(ids) <= max_len:
        return ids
    half = max_len // 2
    return ids[:half] + ids[len(ids) - (max_len - half):]


def needle_text(name: str, code: str) -> str:
    return f" The secret code for {name} is {code}. "


NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Kamala",
         "Lorenzo", "Mirela", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Stefan", "Tamsin", "Ulrich", "Vera",
         "Wendell", "Ximena", "Yusuf", "Zofia"]


def make_needle(rng: random.Random) -> tuple[str, str]:
    """(name, 6-digit code) drawn from rng."""
    return rng.choice(NAMES), f"{rng.randrange(100000, 1000000)}"


def place_needle(head: list[int], hay: list[int], needle: list[int], tail: list[int], length: int, depth: float,
                 boundary=None, snap: int = 0) -> tuple[list[int], int]:
    """Exactly `length` token ids: head + hay[:p] + needle + hay[p:n] + tail, with the needle starting at a
    fraction `depth` of the document part (hay + needle). n = length - len(head + needle + tail) haystack tokens
    are kept (trimmed in tokens, never characters). boundary(i) -> bool (token i ends a sentence/line) may move p
    by up to `snap` tokens to the nearest sentence end. Returns (ids, absolute position of the needle's first token)."""
    n = length - len(head) - len(needle) - len(tail)
    if n < 0:
        raise ValueError(f"length {length} is too short for the prompt frame and needle ({length - n} tokens)")
    if len(hay) < n:
        raise ValueError(f"haystack has {len(hay)} tokens, {n} needed")
    p = min(n, max(0, round(depth * n)))
    if boundary is not None:  # nearest sentence end within snap tokens (earlier one on ties)
        near = [q for q in range(max(0, p - snap), min(n, p + snap) + 1) if q == 0 or boundary(q - 1)]
        p = min(near, key=lambda q: (abs(q - p), q)) if near else p
    ids = head + hay[:p] + needle + hay[p:n] + tail
    assert len(ids) == length
    return ids, len(head) + p


def needle_answer_ok(generated: str, code: str) -> bool:
    """Exact match: the first number in the generated text is the code."""
    nums = re.findall(r"\d+", generated)
    return bool(nums) and nums[0] == code


# ---- run metadata and output --------------------------------------------------------------------------------------
def run_meta(args, started: float, finished: float) -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    return {"date": datetime.date.today().isoformat(), "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "machine": f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
                       + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
            "torch": torch.__version__, "seconds": round(finished - started, 1),
            "args": {k: v for k, v in vars(args).items()}}


def write_json(path: str | None, obj: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def write_text(path: str | None, text: str) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def fmt(x, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
