"""Training data: a gzip JSONL corpus (one document per line, field `text`) tokenised with the base model's
tokenizer and packed into fixed-length sequences with a separator token after every document.

Tokenised shards are cached on disk (default ~/.cache/ahn-longdoc/data), keyed by the corpus file (path, size,
mtime) and the tokenizer's fingerprint, so a second run starts without tokenising. Shards are tokenised lazily
(in a background thread, one shard ahead), so a run starts after one shard, not the whole corpus.

Order: per epoch, a seeded permutation of the shards and, inside each shard, of its documents; the token
stream of an epoch is cut into consecutive sequences of `seq_len` tokens (the incomplete tail is dropped).
Sequence g of the stream goes to rank g % world. The position (epoch, sequences consumed) is the resumable
state.

The trainer reads the training split only; the held-out split is for evaluation (`Corpus(..., split=
"heldout")`), and the trainer refuses documents whose `split` field says otherwise.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

DEFAULT_CORPUS = os.environ.get("AHN_CORPUS") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "corpus"))
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "ahn-longdoc", "data")
SEPARATOR_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")


# ----------------------------------------------------------------------------------------------------------
# tokenizers

class TextTokenizer:
    """Adapter: encode a batch of texts to uint32 arrays; `sep_id` ends every document; `fingerprint` keys the
    cache."""
    sep_id: int
    fingerprint: str

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        raise NotImplementedError


class HFTokenizer(TextTokenizer):
    def __init__(self, tok, vocab_size: int | None = None):
        self.tok = tok
        self.sep_id = self._separator(tok)
        try:
            spec = tok.backend_tokenizer.to_str()
        except Exception:  # noqa: BLE001  slow tokenizers
            spec = json.dumps(sorted(tok.get_vocab().items()))
        self.fingerprint = "hf-" + hashlib.sha1(f"{spec}|sep={self.sep_id}".encode()).hexdigest()[:20]
        if vocab_size is not None and self.sep_id >= vocab_size:
            raise ValueError(f"separator id {self.sep_id} outside the model vocabulary ({vocab_size})")

    @staticmethod
    def _separator(tok) -> int:
        """The pretraining document separator: <|endoftext|> (Qwen, SmolLM2) or </s> if the vocabulary has it,
        else the EOS, else the BOS token."""
        vocab = tok.get_vocab()
        for t in SEPARATOR_CANDIDATES:
            if t in vocab:
                return int(vocab[t])
        for i in (tok.eos_token_id, tok.bos_token_id):
            if i is not None:
                return int(i)
        raise ValueError("the tokenizer has no <|endoftext|>, EOS or BOS token to separate documents")

    def encode_batch(self, texts):
        out = self.tok(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.uint32) for x in out]


class ByteTokenizer(TextTokenizer):
    """Fallback for models without a tokenizer (test models): UTF-8 bytes as ids 0..255; separator = the
    config's EOS id when it fits the vocabulary, else 256."""

    def __init__(self, vocab_size: int, eos_id: int | None = None):
        if vocab_size < 257:
            raise ValueError("byte-level fallback tokenizer needs a vocabulary of at least 257 ids")
        self.sep_id = int(eos_id) if isinstance(eos_id, int) and 256 <= eos_id < vocab_size else 256
        self.fingerprint = f"bytes-v1-sep{self.sep_id}"

    def encode_batch(self, texts):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]


def make_tokenizer(tok, hf_config) -> TextTokenizer:
    """The base model's tokenizer, or the byte-level fallback when it has none. (transformers 5 builds an
    empty one-token tokenizer for a model directory without tokenizer files: that counts as none.)"""
    if tok is not None and len(tok) >= min(256, hf_config.vocab_size):
        return HFTokenizer(tok, hf_config.vocab_size)
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return ByteTokenizer(hf_config.vocab_size, eos)


# ----------------------------------------------------------------------------------------------------------
# corpus + shard cache

def corpus_file(path: str, split: str) -> str:
    if os.path.isdir(path):
        f = os.path.join(path, f"{split}.jsonl.gz")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"no {split}.jsonl.gz in {path}")
        return f
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus not found: {path}")
    return path


def _open(path):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


class Corpus:
    """Documents of one split, tokenised per shard of `shard_docs` consecutive documents (file order)."""

    def __init__(self, path: str, tokenizer: TextTokenizer, split: str = "train", cache_dir: str | None = None,
                 shard_docs: int = 32, max_docs: int | None = None):
        self.file = os.path.realpath(corpus_file(path, split))
        self.split = split
        self.tokenizer = tokenizer
        self.shard_docs = int(shard_docs)
        self.max_docs = max_docs
        st = os.stat(self.file)
        key = f"{self.file}|{st.st_size}|{st.st_mtime_ns}|{split}|{shard_docs}|{max_docs}"
        self.dir = os.path.join(cache_dir or DEFAULT_CACHE, hashlib.sha1(key.encode()).hexdigest()[:16],
                                tokenizer.fingerprint)
        os.makedirs(self.dir, exist_ok=True)
        self._texts = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ahn-tokenize")
        self._futures: dict[int, object] = {}
        self.n_docs = self._count()
        if self.n_docs == 0:
            raise ValueError(f"{self.file}: no documents")
        self.n_shards = (self.n_docs + self.shard_docs - 1) // self.shard_docs

    def _read_texts(self):
        if self._texts is None:
            texts = []
            with _open(self.file) as f:
                for line in f:
                    if not line.strip():
                        continue
                    d = json.loads(line)
                    if self.split == "train" and d.get("split", "train") != "train":
                        raise ValueError(f"{self.file}: document {d.get('id')!r} belongs to split {d.get('split')!r};"
                                         " the trainer only reads the training split")
                    texts.append(d["text"])
                    if self.max_docs is not None and len(texts) >= self.max_docs:
                        break
            self._texts = texts
        return self._texts

    def _count(self) -> int:
        idx = os.path.join(self.dir, "index.json")
        if os.path.isfile(idx):
            with open(idx) as f:
                return int(json.load(f)["n_docs"])
        n = len(self._read_texts())
        _atomic_write(idx, json.dumps({"n_docs": n, "file": self.file, "split": self.split}).encode())
        return n

    def _shard_path(self, k):
        return os.path.join(self.dir, f"shard-{k:05d}.npz")

    def _build(self, k):
        path = self._shard_path(k)
        if os.path.isfile(path):
            try:
                with np.load(path) as z:
                    return z["tokens"], z["lens"]
            except Exception:  # noqa: BLE001  a damaged cache file: rebuild it
                pass
        with self._lock:
            texts = self._read_texts()[k * self.shard_docs:(k + 1) * self.shard_docs]
        arrs = self.tokenizer.encode_batch(texts)
        lens = np.asarray([len(a) for a in arrs], dtype=np.int64)
        tokens = np.concatenate(arrs) if arrs else np.zeros(0, np.uint32)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp.npz"
        np.savez(tmp, tokens=tokens, lens=lens)
        os.replace(tmp, path)
        return tokens, lens

    def prefetch(self, k):
        if 0 <= k < self.n_shards and k not in self._futures:
            self._futures[k] = self._pool.submit(self._build, k)

    def shard(self, k) -> list[np.ndarray]:
        """Token arrays of the documents of shard k (cached on disk, built on first use)."""
        self.prefetch(k)
        tokens, lens = self._futures.pop(k).result()
        return np.split(tokens, np.cumsum(lens)[:-1]) if len(lens) else []

    def cached_shards(self) -> int:
        return sum(os.path.isfile(self._shard_path(k)) for k in range(self.n_shards))

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


def _atomic_write(path, data: bytes):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# packing

class PackedSequences:
    """Endless iterator of int64 token tensors [seq_len] for one rank; `state_dict()` / `load_state_dict()`
    give the resumable position (epoch, sequences of the epoch consumed by all ranks together)."""

    def __init__(self, corpus: Corpus, seq_len: int, seed: int = 0, rank: int = 0, world: int = 1):
        if seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        self.corpus, self.seq_len, self.seed, self.rank, self.world = corpus, int(seq_len), int(seed), rank, world
        self.epoch = 0
        self.consumed = 0  # sequences of this epoch handed out (all ranks)
        self._gen = None

    def state_dict(self):
        return {"epoch": self.epoch, "consumed": self.consumed, "seq_len": self.seq_len, "seed": self.seed}

    def load_state_dict(self, d):
        if int(d["seq_len"]) != self.seq_len or int(d["seed"]) != self.seed:
            raise ValueError(f"data state is for seq_len={d['seq_len']}, seed={d['seed']}, "
                             f"not seq_len={self.seq_len}, seed={self.seed}")
        self.epoch, self.consumed = int(d["epoch"]), int(d["consumed"])
        self._gen = None

    def _order(self, epoch):
        rng = random.Random(f"ahn-data-{self.seed}-{epoch}")
        shards = list(range(self.corpus.n_shards))
        rng.shuffle(shards)
        return shards, rng

    def _epoch_sequences(self, epoch, skip):
        """Yield the sequences of an epoch's stream after the first `skip` ones (numpy arrays)."""
        L = self.seq_len
        sep = np.asarray([self.corpus.tokenizer.sep_id], dtype=np.uint32)
        shards, rng = self._order(epoch)
        to_skip = skip * L  # tokens of the stream to skip
        carry = np.zeros(0, dtype=np.uint32)
        for i, k in enumerate(shards):
            docs = self.corpus.shard(k)
            if i + 1 < len(shards):
                self.corpus.prefetch(shards[i + 1])
            perm = list(range(len(docs)))
            rng.shuffle(perm)
            for d in perm:
                n = len(docs[d]) + 1
                if to_skip >= n:
                    to_skip -= n
                    continue
                stream = np.concatenate([carry, docs[d], sep])[to_skip:] if to_skip else \
                    np.concatenate([carry, docs[d], sep])
                to_skip = 0
                full = len(stream) // L
                for j in range(full):
                    yield stream[j * L:(j + 1) * L]
                carry = stream[full * L:]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        """This rank's next sequence. Every call consumes one round of `world` sequences (one per rank)."""
        while True:
            if self._gen is None:
                self._gen = self._epoch_sequences(self.epoch, self.consumed)
            batch = []
            for _ in range(self.world):
                try:
                    batch.append(next(self._gen))
                except StopIteration:
                    break
            if len(batch) < self.world:  # end of the epoch (an incomplete round is dropped)
                if self.consumed == 0:
                    raise ValueError(f"the corpus has fewer than {self.world} x {self.seq_len} tokens: "
                                     "cannot pack one round of sequences")
                self.epoch, self.consumed, self._gen = self.epoch + 1, 0, None
                continue
            self.consumed += self.world
            return torch.from_numpy(batch[self.rank].astype(np.int64))


__all__ = ["ByteTokenizer", "Corpus", "DEFAULT_CACHE", "DEFAULT_CORPUS", "HFTokenizer", "PackedSequences",
           "TextTokenizer", "corpus_file", "make_tokenizer"]
