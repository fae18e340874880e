"""``hf-turbo eval``: perplexity, top-1 agreement and KL vs the FP model on real English text, for TurboAttention
settings and the KIVI-style baseline (protocol: :mod:`hf_turbo.eval.perplexity`).

    hf-turbo eval --suite ci                                   # a small run (CI size), prints the table
    hf-turbo eval --suite full --name accuracy_smollm2 --plot  # eval/results/accuracy_smollm2.json + .png
    python -m hf_turbo.eval.cli --settings fp,turbo-4bit,kivi-4-g64 --text botchan --max-windows 2

Text: ``--text lee`` (default; Lee news corpus from the gensim wheel), ``botchan``, or a .txt/.jsonl path.
Calibrated settings (``*-calib``) use ``--calibration FILE`` or calibrate on ``--calibrate-on`` text (default
botchan, so calibration and evaluation text differ).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .perplexity import SETTINGS, SUITES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``parser`` (used by ``hf-turbo eval``)."""
    parser.add_argument("--model", default=None, help="'smollm2' (default, embedded GGUF), a .gguf, a dir or hub id")
    parser.add_argument("--text", default="lee", help="lee (default), botchan, wikitext2 (hub), or a .txt / .jsonl file")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None, help="a named list of settings")
    parser.add_argument("--settings", default=None,
                        help=f"comma-separated settings (overrides --suite); known: {', '.join(SETTINGS)}")
    parser.add_argument("--window", type=int, default=None, help="tokens per window W (default 1024; ci: 256)")
    parser.add_argument("--context", type=int, default=None,
                        help="unscored prefix P per window, one prefill call (default W/2)")
    parser.add_argument("--chunk", type=int, default=64,
                        help="tokens per forward call after the prefill (64 = block size; 1 = true decode)")
    parser.add_argument("--max-windows", type=int, default=None, help="limit the number of windows (ci: 1)")
    parser.add_argument("--chunk-check", action="store_true",
                        help="score the settings with chunk 64 and chunk 1 (token-by-token decode) and compare")
    parser.add_argument("--calibration", default=None, help="calibration JSON for the *-calib settings")
    parser.add_argument("--calibrate-on", default="botchan",
                        help="text to calibrate on when no --calibration is given (default botchan)")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--name", default=None,
                        help="write eval/results/<name>.json (+ .png with --plot) through write_result")
    parser.add_argument("--out-dir", default=None, help="results folder (default eval/results)")
    parser.add_argument("--plot", action="store_true", help="also draw perplexity vs bits per KV element")
    parser.add_argument("--replot", default=None, metavar="NAME",
                        help="only redraw eval/results/NAME.png from NAME.json")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 when OMP_NUM_THREADS is unset: small ops on a shared "
                             "2-core machine run many times faster single-threaded)")
    return parser


def _plan(args) -> dict[str, Any]:
    suite = args.suite or ("ci" if not args.settings else None)
    names = args.settings.split(",") if args.settings else SUITES[suite]
    small = suite == "ci" and not args.settings
    window = args.window or (256 if small else 1024)
    context = args.context if args.context is not None else window // 2
    max_windows = args.max_windows if args.max_windows is not None else (1 if small else None)
    return {"names": [n.strip() for n in names if n.strip()], "window": window, "context": context,
            "max_windows": max_windows, "suite": suite}


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)


def run(args: argparse.Namespace) -> int:
    """Execute ``hf-turbo eval``; returns the exit code."""
    from hf_turbo.models import load_model

    from .data import DataUnavailable, load_text
    from .perplexity import evaluate, get_settings, token_stream

    if getattr(args, "replot", None):
        print(f"wrote {replot(args.replot, Path(args.out_dir) if args.out_dir else None)}")
        return 0
    set_threads(args.threads)
    plan = _plan(args)
    try:
        settings = get_settings(plan["names"])
        text = load_text(args.text)
    except (ValueError, FileNotFoundError, DataUnavailable) as exc:
        print(f"hf-turbo eval: {exc}", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, attn_implementation="sdpa", device=args.device)
    priorities, calib_meta = None, None
    if any(s.turbo.get("priorities") == "calibrated" for s in settings):
        priorities, calib_meta = _calibration(model, tok, args)
    tokens = token_stream(tok, text)
    if args.chunk_check:
        return _chunk_check(model, tokens, settings, plan, priorities, args)
    rows = evaluate(model, tokens, settings, window=plan["window"], context=plan["context"], chunk=args.chunk,
                    max_windows=plan["max_windows"], priorities=priorities)
    _print_table(rows)
    if args.name:
        path = write_accuracy(rows, args, plan, calib_meta, model)
        print(f"wrote {path}")
        if args.plot:
            print(f"wrote {plot_accuracy(rows, path.with_suffix('.png'), title=_title(args, plan, rows))}")
    return 0


def _chunk_check(model, tokens, settings, plan, priorities, args) -> int:
    """The same windows scored with ``chunk=64`` (the protocol) and ``chunk=1`` (true token-by-token decode)."""
    from .perplexity import evaluate
    from .results import write_result

    rows = []
    for chunk in (64, 1):
        for r in evaluate(model, tokens, settings, window=plan["window"], context=plan["context"], chunk=chunk,
                          max_windows=plan["max_windows"], priorities=priorities):
            rows.append({"chunk": chunk, **r})
    _print_table(rows)
    if args.name:
        notes = (
            "Check of the chunked perplexity protocol: the same scored tokens fed 64 per forward call (as in the "
            "accuracy tables) or one per call (a true teacher-forced decode through the cache). Close values mean "
            "the chunked numbers stand for decoding."
        )
        path = write_result(args.name, rows, title="Chunked (64) vs token-by-token (1) scoring through the cache",
                            columns=["chunk", "setting", "kv_bits", "ppl", "ppl_delta_pct", "top1_agree", "kl"],
                            notes=notes, extra={"protocol": {**plan, "text": args.text}},
                            out_dir=Path(args.out_dir) if args.out_dir else None)
        print(f"wrote {path}")
    return 0


def _calibration(model, tok, args):
    from hf_turbo.calibration import apply_calibration, calibrate, load_calibration

    if args.calibration:
        cal = load_calibration(args.calibration)
        apply_calibration(model, cal)  # validates the fingerprint
    else:
        cal = calibrate(model, tok, text_file=args.calibrate_on, num_samples=args.calib_samples,
                        seq_len=args.calib_seq_len, apply=False)
    return cal.priorities, {"source": cal.source, "metric": cal.metric, "reduce": cal.reduce, **cal.meta}


def _print_table(rows) -> None:
    cols = ["setting", "kv_bits", "ppl", "ppl_delta_pct", "top1_agree", "kl", "tokens", "seconds"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


def _title(args, plan, rows) -> str:
    model = Path(str(args.model or "SmolLM2-135M-Instruct")).name
    return (f"{model} on {args.text}: perplexity vs KV bits ({rows[0]['tokens']} scored tokens, window "
            f"{plan['window']}, context {plan['context']})")


def _compute_note(model) -> str:
    """How the run computed: on CPU the PyTorch reference in FP32; on CUDA the model's dtype, turbo settings through
    the Triton kernels."""
    import torch

    p = next(model.parameters())
    if p.device.type == "cuda":
        return (f"Computed on {torch.cuda.get_device_name(p.device)} in {str(p.dtype).replace('torch.', '')}: the "
                "turbo settings run through the Triton kernels (FP SDPA and KIVI through PyTorch).")
    return "The CPU run computes in FP32 (the PyTorch reference path); the FP reference stands for an FP16 cache (16 bits)."


def write_accuracy(rows, args, plan, calib_meta, model) -> Path:
    """``eval/results/<name>.json`` through :func:`hf_turbo.eval.results.write_result`."""
    from .results import write_result

    notes = (
        f"Perplexity on {rows[0]['tokens']} tokens of `{args.text}` ({rows[0]['windows']} windows of "
        f"{plan['window']} tokens; the first {plan['context']} of each are an unscored prefill, the rest is fed in "
        f"chunks of {args.chunk} through the cache, so every scored token reads compressed KV blocks). "
        "ppl_delta_pct: vs the FP SDPA reference (ppl_delta_se_pct: its standard error over the windows, paired: "
        "every setting scores the same tokens); top1_agree / kl: next-token argmax agreement and KL(p_fp || p) "
        "per token. kv_bits: bits per K/V element of the compressed cache (codes + scales + zero points, measured "
        "from the pools; KIVI: nbits + 32/group). KIVI rows: eval/kivi.py, a fake-quantized reference of KIVI "
        "(K per channel, V per token, residual 128, prefill attention in full precision). "
        + _compute_note(model)
    )
    if calib_meta:
        notes += f" Calibrated priorities: gap x std of K on `{calib_meta.get('text')}` ({calib_meta.get('tokens')} tokens)."
    cols = ["label", "kv_bits", "ppl", "ppl_delta_pct", "ppl_delta_se_pct", "top1_agree", "kl"]
    title = (f"Accuracy on real text: {describe_model(model, args.model)}; {rows[0]['windows']} windows of "
             f"{plan['window']} tokens")
    return write_result(
        args.name, rows, title=title, columns=cols, notes=notes,
        extra={"protocol": {**plan, "chunk": args.chunk, "text": args.text}, "calibration": calib_meta},
        out_dir=Path(args.out_dir) if args.out_dir else None,
    )


def describe_model(model, name=None) -> str:
    from hf_turbo.calibration import model_fingerprint

    fp = model_fingerprint(model)
    name = Path(str(name)).name if name else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
    return (f"{name}, {fp['num_hidden_layers']} layers x {fp['num_key_value_heads']} KV heads, "
            f"head_dim {fp['head_dim']}")


CURVES = {  # settings joined by a line, in order of bits (the others are drawn as single points)
    "TurboAttention, calibrated 2/4-bit heads": ["turbo-4bit", "turbo-mixed1-calib", "turbo-mixed2-calib",
                                                  "turbo-2bit"],
    "TurboAttention, online 2/4-bit heads": ["turbo-4bit", "turbo-mixed1-online", "turbo-mixed2-online",
                                             "turbo-2bit"],
    "KIVI-style g64 (eval/kivi.py)": ["kivi-4-g64", "kivi-3-g64", "kivi-2-g64"],
    "KIVI-style g32 (eval/kivi.py)": ["kivi-4-g32", "kivi-2-g32"],
    "TurboQuantCache read by exact SDPA": ["cache4-sdpa", "cache-mixed1-calib-sdpa", "cache2-sdpa"],
}
_CURVE_STYLE = ["tab:blue", "tab:cyan", "tab:orange", "tab:red", "tab:purple"]


def _has_lower_neighbour(r, points) -> bool:
    """Whether another point at (nearly) the same bits sits lower: then r's label goes above it, not below."""
    return any(abs(o["kv_bits"] - r["kv_bits"]) < 0.05 and o["ppl"] < r["ppl"] for o in points if o is not r)


def plot_accuracy(rows, path: Path, *, title: str = "") -> Path:
    """Perplexity vs bits per KV element: TurboAttention cache settings and the KIVI-style baseline as curves, other
    settings as points, the FP reference and +1% / +3% as lines; points far above are clipped to the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["setting"]: r for r in rows}
    fp = by["fp"]["ppl"]
    top = min(fp * 1.5, max(fp * 1.05, 1.02 * max(r["ppl"] for r in rows)))  # zoom in when every row is close
    fig, ax = plt.subplots(figsize=(9.5, 5.8))
    ax.axhline(fp, color="gray", ls="--", lw=1, label=f"FP SDPA ({fp:.3g})")
    ax.axhline(fp * 1.01, color="gray", ls=":", lw=0.8, label="FP +1% / +3%")
    ax.axhline(fp * 1.03, color="gray", ls=":", lw=0.8)

    def y(r):
        return min(r["ppl"], top)

    drawn = set()
    for (label, names), color in zip(CURVES.items(), _CURVE_STYLE):
        pts = [by[n] for n in names if n in by]
        if len(pts) < 2:
            continue
        ax.plot([r["kv_bits"] for r in pts], [y(r) for r in pts], "o-", color=color, ms=5, lw=1.3, label=label)
        drawn.update(r["setting"] for r in pts)
    points = [r for r in rows if r["setting"] != "fp" and r["setting"] not in drawn]
    for r in points:
        marker = {"turbo": "s", "quanto": "v"}.get(r["kind"], "x")
        ax.scatter(r["kv_bits"], y(r), marker=marker, color="k", s=28, zorder=3)
        se = r.get("ppl_delta_se_pct")
        if se == se and se and r["ppl"] <= top:  # one standard error of the change, in perplexity units
            ax.errorbar(r["kv_bits"], r["ppl"], yerr=fp * se / 100, color="k", lw=0.8, capsize=2, zorder=2)
        ax.annotate(r["setting"].replace("turbo-", ""), (r["kv_bits"], y(r)), fontsize=6.5,
                    xytext=(5, 4 if _has_lower_neighbour(r, points) else -9), textcoords="offset points")
    for r in rows:
        if r["ppl"] > top:
            ax.annotate(f"{r['setting']}: {r['ppl']:.3g} (off scale)", (r["kv_bits"], top), fontsize=7,
                        xytext=(4, -10), textcoords="offset points", color="darkred")
    ax.set_ylim(fp * 0.98, top * 1.02)
    ax.set_xlabel("bits per KV element (compressed part: codes + scales + zero points)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def replot(name: str, out_dir: Path | None = None) -> Path:
    """Redraw ``<name>.png`` from ``<name>.json`` (no model run)."""
    import json

    from .results import RESULTS_DIR

    path = Path(out_dir or RESULTS_DIR) / f"{name}.json"
    rec = json.loads(path.read_text())
    p = rec.get("protocol", {})
    title = (f"SmolLM2-135M-Instruct on {p.get('text')}: perplexity vs KV bits ({rec['rows'][0]['tokens']} scored "
             f"tokens, window {p.get('window')}, context {p.get('context')})")
    return plot_accuracy(rec["rows"], path.with_suffix(".png"), title=title)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_turbo.eval.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
