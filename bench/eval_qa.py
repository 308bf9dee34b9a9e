"""Question answering over local JSONL files in the LongBench or LV-Eval format, with their metrics. A script.

Item fields: input (question), context, answers (list), dataset, language, _id; LongBench adds length and
all_classes, LV-Eval adds answer_keywords and confusing_facts (optional fields may be missing). An item with
answer_keywords is scored the LV-Eval way. Per item: prompt template of its dataset (default: a generic one),
LongBench truncation in the middle of the prompt tokens (first half + last half, --max-length; --no-truncate to keep
everything), the model's chat template, greedy decoding. Scores are x100 like both benchmarks.

    python bench/eval_qa.py --base ~/.cache/ahn-test-models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data bench/data/sample_longbench.jsonl,bench/data/sample_lveval.jsonl --window 512 --sinks 4 \
        --modes full,window --pred out/qa_pred.jsonl --json out/qa_scores.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ahn_runtime import RuntimeConfig, load_model  # noqa: E402
from ahn_runtime.generate import SamplingParams, chat_ids, generate  # noqa: E402
from bench.evallib import (encode, exact_match, keyword_gated_f1, md_table, qa_f1, qa_f1_zh,  # noqa: E402
                           run_meta, truncate_middle, write_json, write_text)

_ONLY = "Only give me the answer and do not output any other words."
_LV_ONE = ("Please answer the following question based on the given passages. Questions and answers are only relevant "
           "to one passage. Only give me the answer and do not output any other explanation and evidence.\n\nArticle: "
           "{context}\n\nPlease answer the following question based on the above passages. Questions and answers are "
           "only relevant to one passage. Only give me the answer and do not output any other explanation and "
           "evidence.\n\nQuestion: {input}\nAnswer:")
_LB_PASSAGES = (f"Answer the question based on the given passages. {_ONLY}\n\nThe following are given passages.\n"
                f"{{context}}\n\nAnswer the question based on the given passages. {_ONLY}\n\nQuestion: {{input}}\nAnswer:")
# LongBench (QA tasks) and LV-Eval prompt templates, keyed by dataset name (LV-Eval's _16k.._256k suffix removed)
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question as concisely as you can, using a single phrase if possible. Do not provide any explanation."
                   "\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using "
                   "a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
              "single phrase or sentence if possible. If the question cannot be answered based on the information in "
              "the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
              "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based "
              "on the above article as concisely as you can, using a single phrase or sentence if possible. If the "
              "question cannot be answered based on the information in the article, write \"unanswerable\". If the "
              "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
              "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                       "based on the above text, only give me the answer and do not output any other words.\n\n"
                       "Question: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
                       "\n\n问题：{input}\n回答：",
    "hotpotqa": _LB_PASSAGES, "2wikimqa": _LB_PASSAGES, "musique": _LB_PASSAGES,
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
                "words. The following are some examples.\n\n{context}\n\n{input}",
    "hotpotwikiqa_mixup": "Answer the question based on the given passages. Questions and answers are only relevant to "
                          "some passages. Only give me the answer and do not output any other explanation and evidence."
                          "\n\nArticle: {context}\n\nPlease answer the following question based on the above passages. "
                          "Questions and answers are only relevant to some passages. Only give me the answer and do not "
                          "output any other explanation and evidence.\n\nQuestion: {input}\nAnswer:",
    "loogle_SD_mixup": _LV_ONE, "loogle_CR_mixup": _LV_ONE, "loogle_MIR_mixup": _LV_ONE,
    "multifieldqa_en_mixup": _LV_ONE,
    "factrecall_en": "Please answer the following questions based on the given article.\n\nArticle: {context}\n\n"
                     "Please answer the following questions based on the above article.\n\nQuestion: {input}\nAnswer:",
}
DEFAULT_PROMPT = ("Read the following text and answer the question briefly.\n\n{context}\n\nNow, answer the question "
                  f"based on the text above. {_ONLY}\n\nQuestion: {{input}}\nAnswer:")
DEFAULT_PROMPT_ZH = "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答："
MAX_NEW = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
           "2wikimqa": 32, "musique": 32, "triviaqa": 32, "factrecall_en": 16}  # LV-Eval: 64 otherwise
FIRST_LINE = {"triviaqa", "samsum", "trec", "lsht"}  # LongBench keeps only the first line of these predictions


def dataset_key(item: dict) -> str:
    return re.sub(r"_\d+k$", "", str(item.get("dataset") or ""))


def is_lveval(item: dict) -> bool:
    return "answer_keywords" in item or "confusing_facts" in item


def is_zh(item: dict) -> bool:
    return str(item.get("language", "en")).lower().startswith("zh")


def build_prompt(item: dict, template: str | None = None) -> str:
    t = template or PROMPTS.get(dataset_key(item)) or (DEFAULT_PROMPT_ZH if is_zh(item) else DEFAULT_PROMPT)
    return t.format(context=item.get("context", ""), input=item.get("input", ""))


def score_item(pred: str, item: dict) -> dict:
    """Best score over the reference answers: the dataset's metric (F1, LV-Eval gated F1) and exact match."""
    answers = item.get("answers") or []
    answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
    if dataset_key(item) in FIRST_LINE:
        pred = pred.lstrip("\n").split("\n")[0]
    zh = is_zh(item)
    if is_lveval(item) and not dataset_key(item).startswith("factrecall"):
        name = "lveval_kw_f1_zh" if zh else "lveval_kw_f1"
        kw = item.get("answer_keywords")
        kw = ", ".join(kw) if isinstance(kw, list) else kw

        def metric(p, g):
            return keyword_gated_f1(p, g, kw, zh)
    else:
        name, metric = ("qa_f1_zh", qa_f1_zh) if zh else ("qa_f1", qa_f1)
    return {"metric": name, "score": 100 * max((metric(pred, a) for a in answers), default=0.0),
            "em": 100 * max((exact_match(pred, a) for a in answers), default=0.0)}


def read_items(paths: list[str], limit: int | None) -> list[dict]:
    items = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            items += [json.loads(line) for line in f if line.strip()]
    for i, it in enumerate(items):
        it.setdefault("_id", f"item-{i}")
        it.setdefault("dataset", os.path.splitext(os.path.basename(paths[0]))[0])
    return items[:limit] if limit else items


def prompt_ids(model, item: dict, max_length: int, truncate: bool, chat: bool, template: str | None) -> torch.Tensor:
    """LongBench order: truncate the raw prompt's tokens in the middle, decode, then apply the chat template."""
    tok = model.tokenizer
    prompt = build_prompt(item, template)
    ids = encode(tok, prompt)
    if truncate and len(ids) > max_length:
        kept = truncate_middle(ids, max_length)
        half = max_length // 2
        prompt = tok.decode(kept[:half], skip_special_tokens=True) + tok.decode(kept[half:], skip_special_tokens=True)
    if chat:
        return chat_ids(model, [{"role": "user", "content": prompt}])
    return torch.tensor(encode(tok, prompt))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--ahn", default=None)
    ap.add_argument("--data", required=True, help="comma list of JSONL files (LongBench / LV-Eval format)")
    ap.add_argument("--modes", default="full,window,ahn")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=3500, help="prompt tokens kept by middle truncation")
    ap.add_argument("--no-truncate", action="store_true")
    ap.add_argument("--no-chat", action="store_true", help="raw prompt, no chat template")
    ap.add_argument("--template", default=None, help="prompt template with {context} and {input} for all items")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: per dataset (LongBench/LV-Eval)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pred", default=None, help="predictions JSONL")
    ap.add_argument("--json", default=None, help="scores JSON")
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    modes = [m for m in args.modes.split(",") if m]
    pending = {}
    if "ahn" in modes and not args.ahn:
        modes.remove("ahn")
        pending["ahn"] = "pending trained weights (--ahn DIR)"
    if not modes:
        raise SystemExit("nothing to run: give --modes (and --ahn DIR for the ahn mode)")
    model = load_model(args.base, args.ahn, RuntimeConfig(window=args.window, sinks=args.sinks, chunk_size=args.chunk),
                       dtype=args.dtype, device=args.device)
    if model.tokenizer is None:
        raise SystemExit("QA needs a model with a tokenizer")
    items = read_items(args.data.split(","), args.limit)
    preds, scores = [], {m: {} for m in modes}
    for it in items:
        ids = prompt_ids(model, it, args.max_length, not args.no_truncate, not args.no_chat, args.template)
        n_new = args.max_new_tokens or MAX_NEW.get(dataset_key(it), 64)
        for m in modes:
            t = time.time()
            out = list(generate(model, model.new_state(m), ids, SamplingParams(temperature=0.0, max_new_tokens=n_new),
                                chunk_size=args.chunk))
            pred = model.tokenizer.decode(out, skip_special_tokens=True).strip()
            s = score_item(pred, it)
            preds.append({"_id": it["_id"], "dataset": it.get("dataset"), "mode": m, "pred": pred,
                          "answers": it.get("answers"), "prompt_tokens": int(ids.numel()), **s,
                          "seconds": round(time.time() - t, 2)})
            scores[m].setdefault(dataset_key(it), []).append(s)
            print(f"{it['_id']} {m}: {s['metric']}={s['score']:.1f} em={s['em']:.0f} pred={pred!r}", file=sys.stderr)
    table = {m: {ds: {"metric": v[0]["metric"], "n": len(v), "score": sum(x["score"] for x in v) / len(v),
                      "em": sum(x["em"] for x in v) / len(v)} for ds, v in per.items()} for m, per in scores.items()}
    res = {"base": args.base, "ahn": args.ahn, "window": args.window, "sinks": args.sinks, "data": args.data,
           "scores": table, "pending": pending, "meta": run_meta(args, t0, time.time())}
    if args.pred:
        write_text(args.pred, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    write_json(args.json, res)
    rows = [[m, ds, v["metric"], v["n"], f"{v['score']:.1f}", f"{v['em']:.1f}"] for m, per in table.items()
            for ds, v in per.items()] + [[m, "all", "", "", why, ""] for m, why in pending.items()]
    md = md_table(["mode", "dataset", "metric", "n", "score", "EM"], rows)
    write_text(args.md, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
