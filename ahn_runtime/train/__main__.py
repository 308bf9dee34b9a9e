"""AHN self-distillation trainer.

    python -m ahn_runtime.train --base MODEL --variant GatedDeltaNet --seq-len 4096 --steps N --out DIR [options]
    torchrun --nproc_per_node G -m ahn_runtime.train ...      (DDP, one process per GPU)

MODEL: anything the runtime loads (Hugging Face directory or id, .gguf file). The base stays frozen; teacher =
full attention, student = sinks + sliding window + AHN; loss = KL(teacher || student) on positions t >= S + W.
Output in DIR: config.json + model.safetensors (AHN-only, official format) + training_args.json, checkpoints
under DIR/checkpoints/ (resume with --resume), and train_log.jsonl.
"""
from __future__ import annotations

import argparse
import logging
import sys


def _ints(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in s.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("empty list")
    return vals


def parser() -> argparse.ArgumentParser:
    from .data import DEFAULT_CACHE, DEFAULT_CORPUS
    from .trainer import BUDGET_CHOICES, SINK_CHOICES
    p = argparse.ArgumentParser(prog="python -m ahn_runtime.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--base", required=True, help="base model: HF directory or id, or .gguf file (frozen)")
    g.add_argument("--variant", default="GatedDeltaNet", choices=["GatedDeltaNet", "DeltaNet", "Mamba2"])
    g.add_argument("--init-ahn", default=None, help="start from this AHN-only checkpoint instead of the "
                   "official training-start initialisation")
    g.add_argument("--out", required=True, help="output directory (final AHN checkpoint, checkpoints/, logs)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=DEFAULT_CORPUS, help="corpus directory (its train.jsonl.gz is used) or a "
                   f"JSONL(.gz) file of training documents (default {DEFAULT_CORPUS})")
    g.add_argument("--seq-len", type=int, default=4096, help="packed sequence length L")
    g.add_argument("--cache-dir", default=None, help=f"tokenised-shard cache (default {DEFAULT_CACHE})")
    g.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    g.add_argument("--recall-frac", type=float, default=0.0, metavar="P",
                   help="turn this fraction of the sequences into recall QA: facts planted in the text, asked at the "
                        "end (ahn_runtime/train/recall.py; default 0: plain text only)")
    g.add_argument("--recall-weight", type=float, default=1.0,
                   help="loss factor of the answer tokens of recall sequences (default 1)")
    g.add_argument("--recall-max-facts", type=int, default=8, help="facts per recall sequence: 1..N (default 8)")
    g = p.add_argument_group("window / sinks (spec §4.2; budget = sinks + window)")
    g.add_argument("--budget", type=int, default=None, help="fixed total lossless budget S+W (default: sampled)")
    g.add_argument("--budget-choices", type=_ints, default=BUDGET_CHOICES,
                   help="budgets to sample from, restricted to L/D < c < L (default %(default)s)")
    g.add_argument("--budget-min-divisor", type=int, default=8, metavar="D",
                   help="D of the restriction L/D < budget (spec §4.2: 8; larger values allow windows much shorter "
                        "than the sequence)")
    g.add_argument("--sinks", type=int, default=None, help="fixed sink count S (default: sampled)")
    g.add_argument("--sink-choices", type=_ints, default=SINK_CHOICES,
                   help="sink counts to sample from, restricted to <= budget/2 (default %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=_steps, default=100,
                   help="optimizer steps, or 'auto' with --max-minutes: as many as fit in that time (measured)")
    g.add_argument("--grad-accum", type=int, default=1, help="sequences per optimizer step and process")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="base/compute dtype (default: bfloat16 on cuda, float32 on cpu); AHN masters are float32")
    g.add_argument("--attention", default="auto", choices=["auto", "dense", "blocked", "flex"],
                   help="student attention: auto = flex on cuda, dense (<= 4096 tokens) or blocked on cpu")
    g.add_argument("--memory-kernel", default="auto", choices=["auto", "module", "torch"],
                   help="memory recurrence: module = the runtime's (fla on cuda), torch = chunk-parallel PyTorch; "
                   "auto = module unless fla cannot differentiate it here (gated kernels on Hopper + Triton < 3.7.1)")
    g.add_argument("--no-grad-checkpointing", action="store_true", help="keep activations instead of recomputing")
    g.add_argument("--loss-chunk", type=int, default=None, help="positions per KL chunk (default 2^26 / vocab)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the latest checkpoint in --out (or from the given checkpoint directory)")
    g.add_argument("--max-minutes", type=float, default=None, help="stop cleanly (checkpoint + export) in time")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--no-progress", action="store_true")
    return p


def _steps(text: str) -> int:
    if text == "auto":
        return 0
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("--steps must be >= 1 or 'auto'")
    return n


def config_from_args(a) -> "TrainConfig":  # noqa: F821
    from .trainer import TrainConfig
    return TrainConfig(base=a.base, out=a.out, variant=a.variant, data=a.data, seq_len=a.seq_len, steps=a.steps,
                       grad_accum=a.grad_accum, lr=a.lr, weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio,
                       max_grad_norm=a.max_grad_norm, budget=a.budget, budget_choices=tuple(a.budget_choices),
                       budget_min_divisor=a.budget_min_divisor,
                       sinks=a.sinks, sink_choices=tuple(a.sink_choices), seed=a.seed, device=a.device,
                       dtype=a.dtype, attention=a.attention, memory_kernel=a.memory_kernel,
                       grad_checkpointing=not a.no_grad_checkpointing,
                       loss_chunk=a.loss_chunk, save_every=a.save_every, keep_checkpoints=a.keep_checkpoints,
                       resume=a.resume, max_minutes=a.max_minutes, cache_dir=a.cache_dir, max_docs=a.max_docs,
                       init_ahn=a.init_ahn, log_every=a.log_every, progress=not a.no_progress,
                       recall_frac=a.recall_frac, recall_weight=a.recall_weight, recall_max_facts=a.recall_max_facts)


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from ..errors import AHNError
    from .trainer import run
    try:
        summary = run(config_from_args(a))
    except (AHNError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"AHN checkpoint written to {summary['export']} after {summary['steps']} steps"
          + (" (stopped by --max-minutes)" if summary["stopped_early"] else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
