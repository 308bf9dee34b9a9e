"""Models for the app tests (real runtime, real weights; nothing of our engine is mocked).

- `smollm2_gguf()`: the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched by scripts/test.sh into AHN_TEST_MODELS).
- `tiny_ahn_model(dir)`: the oracle's tiny random Qwen2 base (the one the runtime is validated on) plus a small
  byte-level BPE tokenizer with a ChatML template, so the whole chat path runs in AHN mode in milliseconds.
  Its AHN weights are the oracle's published-format GatedDeltaNet checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ORACLE = Path(os.environ.get("AHN_ORACLE") or Path(__file__).resolve().parents[2] / "shared" / "oracle")
TEST_MODELS = Path(os.environ.get("AHN_TEST_MODELS", os.path.expanduser("~/.cache/ahn-test-models")))
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ("The archive holds the harbour records. Page one mentions the lantern and the meadow. "
          "Question answer documents page chapter section signal timber voyage willow ember granite orchard "
          "ribbon summit quarry. What is the capital of France? Paris is the capital. 0123456789 []()\n") * 20


def smollm2_gguf() -> Path | None:
    p = TEST_MODELS / SMOLLM2
    return p if p.is_file() else None


def oracle_dir(name: str) -> Path:
    return ORACLE / "models" / name


def tiny_ahn_model(dest: str | Path) -> tuple[Path, Path]:
    """(base dir with tokenizer, AHN dir). The base is the oracle's tiny random Qwen2 (vocab 1024)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    dest = Path(dest)
    base = dest / "tiny-base"
    if (base / "tokenizer.json").is_file():
        return base, oracle_dir("ahn_gdn")
    src = oracle_dir("base")
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"oracle models not found under {ORACLE}")
    base.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "model.safetensors", base / "model.safetensors")
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(base)
    eos = fast.convert_tokens_to_ids("<|im_end|>")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(bos_token_id=None, eos_token_id=eos, max_position_embeddings=4096)
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}))
    return base, oracle_dir("ahn_gdn")
