"""Training loop: sampling of (budget, sinks) per sequence (spec §4.2), AdamW + warmup/cosine schedule, gradient
accumulation and clipping, resumable checkpoints, a time limit, DDP through torch.distributed (torchrun), and the
export of an AHN-only checkpoint in the official format (spec §6.1)."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import random
import statistics
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .data import DEFAULT_CORPUS, Corpus, PackedSequences, make_tokenizer
from .forward import Distiller, decay_split, freeze_unused, init_memories, n_trainable

log = logging.getLogger("ahn_runtime.train")

BUDGET_CHOICES = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # spec §4.2, total lossless budget S + W
SINK_CHOICES = (0, 32, 64, 128, 512, 2048, 4096)
LAYER_IMPL = {"qwen2": "Qwen2MemDecoderLayer", "qwen3": "Qwen3MemDecoderLayer", "llama": "LlamaMemDecoderLayer"}
CKPT_PREFIX = "step-"


@dataclass
class TrainConfig:
    base: str
    out: str
    variant: str = "GatedDeltaNet"
    data: str = DEFAULT_CORPUS
    seq_len: int = 4096
    steps: int = 100
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    budget: int | None = None  # fixed total budget S + W; None = sampled from budget_choices
    budget_choices: tuple = BUDGET_CHOICES
    budget_min_divisor: int = 8  # budgets c with L / divisor < c < L (spec: 8)
    sinks: int | None = None  # fixed S; None = sampled from sink_choices
    sink_choices: tuple = SINK_CHOICES
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    attention: str = "auto"
    memory_kernel: str = "auto"
    grad_checkpointing: bool = True
    loss_chunk: int | None = None
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end / when stopped
    keep_checkpoints: int = 2
    resume: str | None = None  # None, "auto" (latest under out/checkpoints) or a checkpoint directory
    max_minutes: float | None = None
    cache_dir: str | None = None
    max_docs: int | None = None
    shard_docs: int = 32
    init_ahn: str | None = None
    recall_frac: float = 0.0  # fraction of sequences turned into recall QA (recall.py); 0 = plain text only
    recall_weight: float = 1.0  # loss factor of the answer positions of a recall sequence
    recall_max_facts: int = 8
    log_every: int = 1
    progress: bool = True
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# window / sink sampling (spec §4.2)

def budget_candidates(seq_len: int, choices=BUDGET_CHOICES, min_exclusive: int = 0, divisor: int = 8) -> list[int]:
    """Budgets c with L/divisor < c < L (strict; the spec's divisor is 8), and c > min_exclusive (a fixed sink
    count)."""
    return [int(c) for c in choices if seq_len / divisor < c < seq_len and c > min_exclusive]


def sink_candidates(budget: int, choices=SINK_CHOICES) -> list[int]:
    return [int(s) for s in choices if s <= budget / 2]


def sample_geometry(rng: random.Random, seq_len: int, budget: int | None = None, sinks: int | None = None,
                    budget_choices=BUDGET_CHOICES, sink_choices=SINK_CHOICES, divisor: int = 8) -> tuple[int, int]:
    """(budget B_w = S + W, sinks S) for one training sequence: B_w uniform over the choices with
    L/divisor < c < L (spec: divisor 8), S uniform over the sink choices with S <= B_w / 2; fixed values are used
    as given."""
    if budget is None:
        cands = budget_candidates(seq_len, budget_choices, -1 if sinks is None else sinks, divisor)
        if not cands:
            raise ValueError(f"no training budget among {list(budget_choices)} satisfies L/{divisor} < c < L for "
                             f"L = {seq_len}" + ("" if sinks is None else f" and c > sinks = {sinks}"))
        budget = rng.choice(cands)
    if sinks is None:
        sc = sink_candidates(budget, sink_choices)
        if not sc:
            raise ValueError(f"no sink count among {list(sink_choices)} is <= budget/2 = {budget / 2}")
        sinks = rng.choice(sc)
    if not 0 <= sinks < budget < seq_len:
        raise ValueError(f"need 0 <= sinks < budget < seq_len (got sinks={sinks}, budget={budget}, L={seq_len})")
    return int(budget), int(sinks)


def geometry_rng(seed: int, step: int, micro: int, rank: int) -> random.Random:
    return random.Random(f"ahn-geometry-{seed}-{step}-{micro}-{rank}")


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """HF `get_cosine_schedule_with_warmup` with warmup = ceil(ratio * total): linear 0 -> 1, cosine 1 -> 0."""
    warm = math.ceil(total_steps * warmup_ratio)

    def f(step):
        if step < warm:
            return step / max(1, warm)
        progress = (step - warm) / max(1, total_steps - warm)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


# ----------------------------------------------------------------------------------------------------------
# export (spec §6.1)

def ahn_state(memories) -> dict[str, torch.Tensor]:
    return {f"model.layers.{l}.ahn.fn.{n}": t for l, m in enumerate(memories) for n, t in m.state_dict().items()}


def ahn_config(hf_config, variant: str, cfg: TrainConfig | None = None) -> dict:
    full = hf_config.to_dict()
    d = hf_config.to_diff_dict()  # what save_pretrained writes
    for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings",
              "max_position_embeddings", "architectures"):
        if k not in d and full.get(k) is not None:
            d[k] = full[k]
    if not d.get("architectures"):
        d["architectures"] = [type_name for type_name in (getattr(hf_config, "architectures", None) or [])] or \
            [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}.get(
                full.get("model_type"), "")]
    d["torch_dtype"] = "bfloat16"  # the dtype of the AHN tensors in model.safetensors (as the official configs)
    if "dtype" in d:
        d["dtype"] = "bfloat16"
    q = d.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "gguf":  # GGUF weights are loaded dequantised
        d.pop("quantization_config")
    family = d.get("model_type")
    if family not in LAYER_IMPL:
        raise ValueError(f"unsupported model family {family!r}")
    fixed_budget = cfg.budget if cfg is not None else None
    fixed_sinks = cfg.sinks if cfg is not None else None
    d.update({
        "_ahn_implementation": variant,
        "_layer_implementation": LAYER_IMPL[family],
        "sliding_window": int(fixed_budget) if fixed_budget else 256,  # training seed value (official: 256)
        "sliding_window_type": "fixed" if fixed_budget else "random",
        "ahn_position": "random" if fixed_sinks is None else ("prefix" if fixed_sinks == 0 else "fixed"),
        "fa_layer_ids": "",
        "use_q_proj": False,
        "use_ahn_router": False,
        "save_ahn_only": True,
        "loss_type": ["kl"],
    })
    return d


def export_ahn(memories, hf_config, variant: str, out_dir: str, cfg: TrainConfig | None = None,
               training_info: dict | None = None) -> str:
    """Write config.json + model.safetensors (only `model.layers.{l}.ahn.fn.*`, bf16) + training_args.json."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in ahn_state(memories).items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(ahn_config(hf_config, variant, cfg), f, indent=2, sort_keys=True, default=str)
    args = {"config": _jsonable(dataclasses.asdict(cfg)) if cfg is not None else {}, **(training_info or {})}
    with open(os.path.join(out_dir, "training_args.json"), "w") as f:
        json.dump(args, f, indent=2, default=str)
    return out_dir


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


# ----------------------------------------------------------------------------------------------------------
# distributed

def _dist_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class _Progress:
    def __init__(self, total, initial, enabled):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step, total, info: dict):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(info, refresh=False)
            self.bar.update(1)
        else:
            print(f"step {step}/{total} " + " ".join(f"{k}={v}" for k, v in info.items()), file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------
# trainer

class Trainer:
    def __init__(self, cfg: TrainConfig, base=None):
        """base: optionally an already loaded (hf_model, tokenizer) pair (tests)."""
        self.t_start = time.time()
        self.cfg = cfg
        self._check_config()
        self._setup_distributed()
        from ..loading import _resolve_dtype, build_memories, load_base, _ahn_tensors, _read_json, check_ahn_config
        self.dtype = _resolve_dtype(cfg.dtype, self.device.type)
        if base is None:
            hf, tok = load_base(cfg.base, self.dtype, str(self.device))
        else:
            hf, tok = base
        if any(p.requires_grad for p in hf.parameters()):
            raise AssertionError("the base model is not frozen")
        self.hf, self.tok = hf, tok
        torch.manual_seed(cfg.seed)
        if cfg.init_ahn:
            acfg = _read_json(os.path.join(cfg.init_ahn, "config.json"))
            variant = check_ahn_config(acfg, cfg.init_ahn)
            if variant != cfg.variant:
                raise ValueError(f"--init-ahn {cfg.init_ahn} is a {variant} checkpoint, not {cfg.variant}")
            mems, _ = build_memories(variant, hf.config, _ahn_tensors(cfg.init_ahn), torch.float32, str(self.device),
                                     cfg.init_ahn)
            mems.requires_grad_(True)
            freeze_unused(mems)
        else:
            mems = init_memories(cfg.variant, hf.config, cfg.seed, self.device)
        mems.train()
        self.memories = mems
        self.distiller = Distiller(hf, mems, attention=cfg.attention, grad_checkpointing=cfg.grad_checkpointing,
                                   loss_chunk=cfg.loss_chunk, memory_kernel=cfg.memory_kernel)
        self.model = self.distiller
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.distiller, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        decay, no_decay = decay_split(mems)
        base_ids = {id(p) for p in hf.parameters()}
        if any(id(p) in base_ids for p in decay + no_decay):
            raise AssertionError("a base-model parameter would be optimised")
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        self._set_steps(cfg.steps)
        self.text_tokenizer = make_tokenizer(tok, hf.config)
        self.corpus = Corpus(cfg.data, self.text_tokenizer, split="train", cache_dir=cfg.cache_dir,
                             shard_docs=cfg.shard_docs, max_docs=cfg.max_docs)
        self.data = PackedSequences(self.corpus, cfg.seq_len, cfg.seed, self.rank, self.world)
        self.recall = None
        if cfg.recall_frac > 0:
            from .recall import RecallBuilder
            self.recall = RecallBuilder(self.text_tokenizer, hf.config.vocab_size, max_facts=cfg.recall_max_facts)
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []
        if cfg.resume:
            path = self.find_checkpoint(cfg.resume)
            if path is not None:
                self.load_checkpoint(path)
            elif cfg.resume != "auto":
                raise FileNotFoundError(f"no checkpoint at {cfg.resume}")
            elif self.is_main:
                log.info("--resume: no checkpoint under %s, starting fresh", self.ckpt_root)

    # ---- setup --------------------------------------------------------------------------------------------
    def _check_config(self):
        c = self.cfg
        from ..memory import VARIANTS
        if c.variant not in VARIANTS:
            raise ValueError(f"unknown variant {c.variant!r} (choose from {', '.join(VARIANTS)})")
        if c.steps < 0 or c.grad_accum < 1 or c.seq_len < 2:
            raise ValueError("steps must be >= 1 (or 0: auto), grad_accum >= 1 and seq_len >= 2")
        if not 0 <= c.recall_frac <= 1 or c.recall_weight <= 0 or c.recall_max_facts < 1:
            raise ValueError("need 0 <= recall_frac <= 1, recall_weight > 0 and recall_max_facts >= 1")
        if c.steps == 0 and not c.max_minutes:
            raise ValueError("--steps auto needs --max-minutes (the step count is set to fill that time)")
        # fail early if no (budget, sinks) is possible for this sequence length
        sample_geometry(random.Random(0), c.seq_len, c.budget, c.sinks, c.budget_choices, c.sink_choices,
                        c.budget_min_divisor)

    def _setup_distributed(self):
        import torch.distributed as dist
        cfg = self.cfg
        want = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.distributed = _dist_env()
        self._owns_pg = False
        if self.distributed:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
                self._owns_pg = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            if want.startswith("cuda"):
                torch.cuda.set_device(local)
                self.device = torch.device("cuda", local)
            else:
                self.device = torch.device(want)
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device(want)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but no CUDA GPU is available")
        self.is_main = self.rank == 0

    @property
    def ckpt_root(self):
        return os.path.join(self.cfg.out, "checkpoints")

    # ---- checkpoints --------------------------------------------------------------------------------------
    def find_checkpoint(self, spec: str) -> str | None:
        if spec != "auto":
            return spec if os.path.isfile(os.path.join(spec, "trainer_state.pt")) else None
        cands = sorted(glob.glob(os.path.join(self.ckpt_root, CKPT_PREFIX + "*", "trainer_state.pt")))
        return os.path.dirname(cands[-1]) if cands else None

    def save_checkpoint(self) -> str | None:
        path = os.path.join(self.ckpt_root, f"{CKPT_PREFIX}{self.step:07d}")
        if self.is_main:
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            save_file({k: v.detach().float().cpu().contiguous() for k, v in ahn_state(self.memories).items()},
                      os.path.join(tmp, "ahn.safetensors"))
            state = {
                "step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "data": self.data.state_dict(), "config": dataclasses.asdict(self.cfg),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                "world": self.world, "history": self.history[-1000:],
            }
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            old = sorted(glob.glob(os.path.join(self.ckpt_root, CKPT_PREFIX + "*[0-9]")))
            for p in old[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(p, ignore_errors=True)
        self._barrier()
        return path

    def load_checkpoint(self, path: str):
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        old = state["config"]
        for k in ("variant", "seq_len", "seed"):
            if old.get(k) != getattr(self.cfg, k):
                raise ValueError(f"checkpoint {path} was trained with {k}={old.get(k)!r}, not {getattr(self.cfg, k)!r}")
        if state.get("world", 1) != self.world:
            log.warning("resuming a run of world size %s with world size %s: data order changes",
                        state.get("world"), self.world)
        tensors = load_file(os.path.join(path, "ahn.safetensors"))
        want = ahn_state(self.memories)
        if set(tensors) != set(want):
            raise ValueError(f"checkpoint {path} does not match this model's AHN parameters")
        with torch.no_grad():
            for k, t in want.items():
                t.copy_(tensors[k].to(t.device, t.dtype))
        if self.cfg.steps == 0 and old.get("steps"):  # --steps auto: the resolved count of the interrupted run
            self._set_steps(int(old["steps"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.history = list(state.get("history", []))
        rng = state.get("rng") or {}
        if rng.get("python") is not None:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                with contextlib.suppress(Exception):
                    torch.cuda.set_rng_state_all(rng["cuda"])
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def export(self, out_dir: str | None = None) -> str:
        out_dir = out_dir or self.cfg.out
        if self.is_main:
            info = {"base": self.cfg.base, "variant": self.cfg.variant, "steps_done": self.step,
                    "tokens_seen": self.tokens, "train_seconds": round(self.train_seconds, 1),
                    "world_size": self.world, "device": str(self.device), "dtype": str(self.dtype),
                    "trainable_params": n_trainable(self.memories),
                    "separator_token_id": self.text_tokenizer.sep_id,
                    "tokenizer": self.text_tokenizer.fingerprint, "data": self.data.state_dict(),
                    "last_loss": self.history[-1]["loss"] if self.history else None,
                    "note": "window/sinks: inference W = budget - sinks (spec §4.2); sliding_window in config.json "
                            "is the training seed, not an inference setting"}
            export_ahn(self.memories, self.hf.config, self.cfg.variant, out_dir, self.cfg, info)
        self._barrier()
        return out_dir

    # ---- loop ---------------------------------------------------------------------------------------------
    def _barrier(self):
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def _mean(self, x: float) -> float:
        if not self.distributed:
            return x
        import torch.distributed as dist
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def _any(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def train_step(self) -> dict:
        """One optimizer step (grad_accum micro-batches on every rank). Returns the log record."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, geo, kls, answer_kls = 0.0, [], [], []
        for micro in range(cfg.grad_accum):
            ids = next(self.data)
            budget, sinks = sample_geometry(geometry_rng(cfg.seed, self.step, micro, self.rank), cfg.seq_len,
                                            cfg.budget, cfg.sinks, cfg.budget_choices, cfg.sink_choices,
                                            cfg.budget_min_divisor)
            ids, mask = self._recall(ids, micro, budget)
            sync = (not self.distributed) or micro == cfg.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                loss, _ = self.model(ids, budget - sinks, sinks, mask, cfg.recall_weight)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            stats = self.distiller.last_stats
            kls.append(float(stats["kl"]))
            if "answer_kl" in stats:
                answer_kls.append(float(stats["answer_kl"]))
            geo.append((budget, sinks))
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens += cfg.seq_len * cfg.grad_accum * self.world
        rec = {"step": self.step, "loss": self._mean(loss_sum), "kl": sum(kls) / len(kls), "grad_norm": float(gnorm),
               "lr": lr, "geometry": geo}
        if answer_kls:  # this rank's recall sequences: mean KL at the answer positions
            rec["answer_kl"] = sum(answer_kls) / len(answer_kls)
        return rec

    def _recall(self, ids: torch.Tensor, micro: int, budget: int):
        """(ids, answer mask or None): with probability recall_frac (seeded by step, micro-batch and rank, so a
        resumed run builds the same sequences) the packed sequence becomes a recall QA sequence whose facts are at
        least `budget` (S + W) tokens before the questions."""
        if self.recall is None:
            return ids, None
        rng = random.Random(f"ahn-recall-{self.cfg.seed}-{self.step}-{micro}-{self.rank}")
        if rng.random() >= self.cfg.recall_frac:
            return ids, None
        built = self.recall.build(ids.numpy(), rng, budget)
        if built is None:
            return ids, None
        return torch.from_numpy(built[0]), torch.from_numpy(built[1])

    def _set_steps(self, steps: int):
        """The total step count and the warm-up + cosine schedule over it (0 = auto, resolved before training)."""
        self.cfg.steps = int(steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           cosine_with_warmup(max(1, steps), self.cfg.warmup_ratio))

    def _auto_steps(self, limit: float) -> int:
        """--steps auto: time forward + backward of one sequence at the largest budget that can be sampled (random
        tokens: no data consumed, no update; the first pass also compiles / autotunes and is not counted), then
        the number of optimizer steps that fills what is left of --max-minutes, so the schedule ends in time."""
        cfg = self.cfg
        budgets = [cfg.budget] if cfg.budget else budget_candidates(cfg.seq_len, cfg.budget_choices,
                                                                     -1 if cfg.sinks is None else cfg.sinks,
                                                                     cfg.budget_min_divisor)
        B = max(budgets)
        S = cfg.sinks if cfg.sinks is not None else min(sink_candidates(B, cfg.sink_choices))
        ids = torch.randint(0, self.hf.config.vocab_size, (cfg.seq_len,),
                            generator=torch.Generator().manual_seed(cfg.seed))
        times = []
        for _ in range(3):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t = time.time()
            loss, _ = self.model(ids, B - S, S)
            loss.backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.time() - t)
        self.optimizer.zero_grad(set_to_none=True)
        per_seq = statistics.mean(times[1:])
        per_step = per_seq * cfg.grad_accum * 1.05  # 5 % for data loading and the optimizer
        left = limit - (time.time() - self.t_start) - max(10.0, 0.02 * limit)  # + final checkpoint and export
        steps = max(1, int(left // per_step))
        if self.distributed:
            import torch.distributed as dist
            t = torch.tensor([steps], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            steps = int(t.item())
        cfg.extra["auto_steps"] = {"seconds_per_sequence": round(per_seq, 4),
                                   "first_pass_seconds": round(times[0], 2), "budget": B, "sinks": S,
                                   "seconds_left": round(left, 1), "steps": steps}
        if self.is_main:
            log.info("--steps auto: %.3f s per sequence (budget %d), %.0f s left -> %d steps", per_seq, B, left,
                     steps)
        return steps

    def train(self) -> dict:
        cfg = self.cfg
        limit = None if cfg.max_minutes is None else cfg.max_minutes * 60.0
        if cfg.steps == 0:
            self._set_steps(self._auto_steps(limit))
        bar = _Progress(cfg.steps, self.step, self.is_main and cfg.progress)
        log_path = os.path.join(cfg.out, "train_log.jsonl")
        if self.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            log.info("training %s AHN (%d trainable parameters) on %s, %s, world %d, seq_len %d, steps %d, "
                     "memory kernel: %s", cfg.variant, n_trainable(self.memories), self.device, self.dtype, self.world,
                     cfg.seq_len, cfg.steps, self.distiller.memory_kernel_name())
        stopped_early = False
        step_times = []
        try:
            while self.step < cfg.steps:
                t0 = time.time()
                rec = self.train_step()
                dt = time.time() - t0
                step_times.append(dt)
                self.train_seconds += dt
                tok_s = cfg.seq_len * cfg.grad_accum * self.world / dt
                rec.update({"seconds": round(dt, 3), "tokens_per_s": round(tok_s, 1),
                            "elapsed": round(time.time() - self.t_start, 1)})
                self.history.append(rec)
                if self.is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if self.step % max(1, cfg.log_every) == 0 or self.step == cfg.steps:
                        b, s = rec["geometry"][-1]
                        info = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{tok_s:.0f}", "W+S": f"{b - s}+{s}",
                                "lr": f"{rec['lr']:.2e}"}
                        if "answer_kl" in rec:
                            info["answer KL"] = f"{rec['answer_kl']:.3f}"
                        bar.update(self.step, cfg.steps, info)
                    elif bar.bar is not None:
                        bar.bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if limit is not None and self.step < cfg.steps:
                    avg = sum(step_times[-5:]) / len(step_times[-5:])
                    if self._any(time.time() - self.t_start + avg > limit):
                        stopped_early = True
                        if self.is_main:
                            log.warning("time limit of %.1f min reached after step %d: saving and stopping",
                                        cfg.max_minutes, self.step)
                        break
        finally:
            bar.close()
        ckpt = self.save_checkpoint()
        out = self.export()
        summary = {"steps": self.step, "stopped_early": stopped_early, "checkpoint": ckpt, "export": out,
                   "last_loss": self.history[-1]["loss"] if self.history else None,
                   "seconds_per_step": (sum(step_times) / len(step_times)) if step_times else None}
        if self.is_main:
            log.info("done: %s", summary)
        return summary

    def close(self):
        self.corpus.close()
        if self.distributed and self._owns_pg:
            import torch.distributed as dist
            dist.destroy_process_group()


def run(cfg: TrainConfig, base=None) -> dict:
    tr = Trainer(cfg, base)
    try:
        return tr.train()
    finally:
        tr.close()


__all__ = ["BUDGET_CHOICES", "SINK_CHOICES", "TrainConfig", "Trainer", "ahn_config", "budget_candidates",
           "cosine_with_warmup", "export_ahn", "run", "sample_geometry", "sink_candidates"]
