"""Loading: a base causal LM (Hugging Face id, local directory or GGUF file) plus AHN weights in the official
formats (an AHN-only directory, or AHN keys inside a merged checkpoint), validated against spec §3 / §6."""
from __future__ import annotations

import glob
import json
import logging
import os
import re

import torch
from safetensors import safe_open
from torch import nn

from .errors import AHNError
from .memory import VARIANTS
from .model import FAMILIES, AHNModel, RuntimeConfig

AHN_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.ahn\.fn\.(.+)$")
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise AHNError(f"unsupported dtype {dtype!r} (use float32 or bfloat16)") from None


def _source(base: str) -> tuple[str, dict]:
    """(path or id for from_pretrained, extra kwargs). Raises AHNError for paths that do not exist."""
    if os.path.isfile(base):
        if base.endswith(".gguf"):
            return os.path.dirname(os.path.abspath(base)), {"gguf_file": os.path.basename(base)}
        raise AHNError(f"{base} is a file but not a .gguf model; give a model directory, a .gguf file or a Hub id")
    if os.path.isdir(base):
        if not os.path.isfile(os.path.join(base, "config.json")):
            ggufs = sorted(glob.glob(os.path.join(base, "*.gguf")))
            if len(ggufs) == 1:
                return base, {"gguf_file": os.path.basename(ggufs[0])}
            raise AHNError(f"{base} has no config.json: not a Hugging Face model directory")
        return base, {}
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not base.startswith((".", "/")):
        return base, {}  # Hugging Face Hub id
    raise AHNError(f"model not found: {base!r} is neither a local directory, a .gguf file nor a Hub id")


def load_base(base: str, dtype: torch.dtype, device: str, quantization: str = "none", double_quant: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src, kw = _source(base)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # merged AHN checkpoints carry keys transformers does not know
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise AHNError(f"could not load base model {base!r}: {str(e).splitlines()[0]}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.model_type not in FAMILIES:
        raise AHNError(f"unsupported model family {model.config.model_type!r} (supported: {', '.join(FAMILIES)})")
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
    except Exception:  # noqa: BLE001  a model without tokenizer files still runs on token ids
        tok = None
    if tok is not None and len(tok) < 2:  # transformers 5 builds an empty tokenizer for dirs without one
        tok = None
    model.eval().requires_grad_(False)
    if quantization != "none":  # from the CPU copy, one linear at a time: the device never holds bf16 weights
        from .quantize import quantize_model
        quantize_model(model, quantization, device, dtype, double_quant)
    model.to(device)
    return model, tok


def fetch_ahn(ahn: str) -> str:
    """A local directory for an AHN-only checkpoint given as a Hugging Face Hub id (config + safetensors only)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", ahn) or ahn.startswith((".", "/")) or os.path.exists(ahn):
        raise AHNError(f"AHN checkpoint not found: {ahn!r} is not a directory")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(ahn, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # noqa: BLE001  offline, unknown repo, no permission
        raise AHNError(f"could not fetch AHN checkpoint {ahn!r} from the Hugging Face Hub: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AHNError(f"cannot read {path}: {e}") from e


def _ahn_tensors(directory: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise AHNError(f"no .safetensors file in {directory}")
    out = {}
    for fn in files:
        with safe_open(fn, "pt") as f:
            for key in f.keys():
                if "ahn" in key.lower():
                    out[key] = f.get_tensor(key)
    return out


def check_ahn_config(cfg: dict, where: str) -> str:
    """The variant name, or AHNError for configs the official code cannot run either (spec §3.7)."""
    variant = cfg.get("_ahn_implementation")
    if variant not in VARIANTS:
        raise AHNError(f"{where}: unsupported or missing _ahn_implementation {variant!r} "
                       f"(supported: {', '.join(VARIANTS)})")
    layer_impl = cfg.get("_layer_implementation", "")
    if not str(layer_impl).endswith("MemDecoderLayer"):
        raise AHNError(f"{where}: _layer_implementation {layer_impl!r} is not an AHN layer")
    if cfg.get("use_q_proj"):
        raise AHNError(f"{where}: use_q_proj=true is not supported (broken in the official code, spec §3.7)")
    if cfg.get("use_ahn_router"):
        raise AHNError(f"{where}: use_ahn_router=true is not supported (broken in the official code, spec §3.7)")
    fa = str(cfg.get("fa_layer_ids") or "").strip()
    if fa and any(p.strip().isdigit() for p in fa.split(",")):
        raise AHNError(f"{where}: fa_layer_ids={fa!r} (full-attention layers without AHN) is not supported")
    return variant


def _dims(cfg: dict) -> dict:
    d = {k: cfg.get(k) for k in SHAPE_FIELDS}
    d["num_key_value_heads"] = d["num_key_value_heads"] or d["num_attention_heads"]
    d["head_dim"] = d["head_dim"] or (d["hidden_size"] // d["num_attention_heads"])
    return d


def build_memories(variant: str, base_cfg, tensors: dict[str, torch.Tensor], dtype, device, where: str):
    """Instantiate one memory module per layer and load the official-format tensors with full validation."""
    n_layers, h = base_cfg.num_hidden_layers, base_cfg.hidden_size
    H = base_cfg.num_attention_heads
    D = getattr(base_cfg, "head_dim", None) or h // H
    cls = VARIANTS[variant]
    mems = nn.ModuleList([cls(h, H, D) for _ in range(n_layers)])
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    stray = []
    for key, t in tensors.items():
        m = AHN_KEY.match(key)
        if not m or int(m.group(1)) >= n_layers:
            stray.append(key)
            continue
        per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
    problems = []
    for l, mod in enumerate(mems):
        expected = mod.expected_shapes()
        got = per_layer.get(l, {})
        for name, shape in expected.items():
            if name not in got:
                problems.append(f"missing model.layers.{l}.ahn.fn.{name}")
            elif tuple(got[name].shape) != shape:
                problems.append(f"model.layers.{l}.ahn.fn.{name} has shape {tuple(got[name].shape)}, "
                                f"expected {shape}")
        stray += [f"model.layers.{l}.ahn.fn.{n}" for n in got if n not in expected]
    if stray:
        problems.append("unexpected AHN tensors: " + ", ".join(sorted(stray)[:8]) + (" ..." if len(stray) > 8 else ""))
    if problems:
        raise AHNError(f"{where}: the AHN weights do not fit this base model ({variant}, {n_layers} layers, hidden "
                       f"{h}, {H} heads of {D}): " + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
    total = sum(t.numel() for t in tensors.values())
    expect = n_layers * cls.param_count(h, H, D)
    if total != expect:
        raise AHNError(f"{where}: {total} AHN parameters, expected {expect} for {variant} on this base")
    for l, mod in enumerate(mems):
        # the official merge stores bf16; round anything wider to bf16 the same way
        mod.load_state_dict({n: t.to(torch.bfloat16) for n, t in per_layer[l].items()})
    return mems.to(device=device, dtype=dtype).eval().requires_grad_(False), total


def load_model(base: str, ahn: str | None = None, config: RuntimeConfig | None = None, *,
               dtype=None, device: str | None = None, quantization: str | None = None,
               double_quant: bool = True) -> AHNModel:
    """Load base + AHN. ahn: an AHN-only checkpoint directory, or None/'none' to use the AHN keys of a merged
    checkpoint given as base (a plain base then loads without memory: modes 'window' and 'full' only).
    quantization: 'nf4' / 'fp4' (4-bit, double quantization by default) or 'int8' for the base model's decoder
    linears (bitsandbytes); None / 'none' keeps dtype. AHN weights stay in dtype."""
    config = config or RuntimeConfig()
    config.validate()
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AHNError("device 'cuda' requested but no CUDA GPU is available")
    dt = _resolve_dtype(dtype, device)
    from .quantize import QUANTIZATIONS, bnb
    quantization = quantization or "none"
    if quantization not in QUANTIZATIONS:
        raise AHNError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (got {quantization!r})")
    if quantization != "none":
        bnb()  # a clear error before anything is loaded
    ahn_dir = None if ahn in (None, "", "none", "None") else ahn
    if ahn_dir is not None and not os.path.isdir(ahn_dir):
        ahn_dir = fetch_ahn(ahn_dir)
    ahn_cfg = None
    if ahn_dir is not None:
        ahn_cfg = _read_json(os.path.join(ahn_dir, "config.json"))
        check_ahn_config(ahn_cfg, ahn_dir)
    model, tok = load_base(base, dt, device, quantization, double_quant)
    info = {"quantization": quantization}
    memories = None
    if ahn_dir is None and os.path.isdir(base):
        cfg = _read_json(os.path.join(base, "config.json")) if os.path.isfile(os.path.join(base, "config.json")) else {}
        if cfg.get("_ahn_implementation"):
            ahn_cfg, ahn_dir = cfg, base
            check_ahn_config(cfg, base)
    if ahn_cfg is not None:
        base_dims = _dims(model.config.to_dict() | {"head_dim": getattr(model.config, "head_dim", None)})
        ahn_dims = _dims(ahn_cfg)
        diff = [f"{k}: AHN {ahn_dims[k]} vs base {base_dims[k]}" for k in SHAPE_FIELDS if ahn_dims[k] != base_dims[k]]
        if diff:
            raise AHNError(f"AHN checkpoint {ahn_dir} was made for a different base model than {base} ("
                           + "; ".join(diff) + ")")
        variant = check_ahn_config(ahn_cfg, ahn_dir)
        memories, n = build_memories(variant, model.config, _ahn_tensors(ahn_dir), dt, device, ahn_dir)
        info |= {"variant": variant, "path": ahn_dir, "params": n,
                "config_sliding_window": ahn_cfg.get("sliding_window"),
                "config_sinks": ahn_cfg.get("num_attn_sinks", 0)}
    logging.getLogger(__name__).info("loaded %s (+%s)", base, info.get("variant", "no AHN"))
    return AHNModel(model, memories, config, model_id=os.path.basename(os.path.normpath(base)), tokenizer=tok,
                    ahn_info=info)
