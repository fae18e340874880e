"""Which KV heads should go to INT2? The paper's §5.6 ablation on real text: calibrated gap x std priorities vs
online (per request) vs random vs gap only vs std only (plus K+V scoring, the inverted ranking, and an
error-calibrated "oracle"), by attention-output error and by perplexity.

    python -m hf_turbo.calibration.ablation --name calibration_smollm2 --plot     # writes eval/results/...

Attention-output error (isolates the cache's quantization from everything else): on held-out samples of the
evaluation text, every layer's post-RoPE ``q, k, v`` are captured; ``k, v`` go through a real TurboLayer (BPQ, all
heads 4-bit, and all heads 2-bit) and exact softmax attention is computed in float64 with the dequantized K/V.
Quantization is per KV head and a query head reads one KV head, so the error of any head assignment is the sum of
per-head errors ``err_b[l, h] = ||O(K_b, V_b) - O(K, V)||^2`` over the query heads of KV head ``h``: one pass gives
every strategy exactly. Reported: the mean over layers of ``sqrt(sum_h err / sum_h ||O||^2)``.

Strategies (priorities ``[L][H_kv]``; the ``n_low`` lowest of each layer go to INT2):

* ``calibrated``: gap x std of K over the calibration text (running per-channel max/min); ``calibrated-kv``: K and
  V scores added; ``calibrated-v``: V only; ``calibrated-mean``: mean of per-sample gap x std;
* ``gap-only`` / ``std-only``: one factor of the product (calibration text);
* ``online``: gap x std of each request's own keys (the cache's default without calibration);
* ``random``: uniform random ranking (error: mean of 10 seeds; perplexity: seed 0);
* ``inverted``: the calibrated ranking upside down (sends the most sensitive heads to INT2);
* ``oracle-calib``: ranked by the measured INT2 attention error on the calibration text (error-driven calibration);
  ``oracle-eval``: the same measured on the evaluation samples themselves (a lower bound, not a usable method).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .calibrate import capture_attention, collect_stats, model_fingerprint, token_samples


# ---------------------------------------------------------------------------------------------------- error tables
@torch.no_grad()
def head_error_tables(model, samples: torch.Tensor, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per sample, layer and KV head: squared attention-output errors with all heads at 4 / 2 bits, the reference
    energy, and the online priorities (K, K+V) of that sample.

    Args:
        samples: int64 ``[N, T]`` (T a multiple of 64, so every token is in a compressed block).

    Returns:
        dict of float64 ``[N, L, H]``: ``err4, err2`` (K and V at 4 / 2 bits), ``err2k`` (K 2-bit, V 4-bit),
        ``err2v`` (K 4-bit, V 2-bit), ``ref``, ``online_k, online_kv``.
    """
    from tqdm.auto import tqdm

    from hf_turbo.cache import TurboLayer
    from hf_turbo.config import TurboConfig
    from hf_turbo.quant.attention import exact_attention
    from hf_turbo.quant.priority import head_priority

    fp = model_fingerprint(model)
    n, layers, heads = samples.shape[0], fp["num_hidden_layers"], fp["num_key_value_heads"]
    keys = ("err4", "err2", "err2k", "err2v", "ref", "online_k", "online_kv")
    out = {k: torch.zeros(n, layers, heads, dtype=torch.float64) for k in keys}
    state = {"i": 0}

    def per_head(sq: torch.Tensor, hq: int) -> torch.Tensor:  # [B, Hq, T, D] -> [Hkv]
        return sq.sum(dim=(0, 2, 3)).reshape(heads, hq // heads).sum(-1).cpu()

    def hook(layer, q, k, v):
        i, hq = state["i"], q.shape[1]
        scale = q.shape[-1] ** -0.5
        ref = exact_attention(q, k, v, sm_scale=scale)
        out["ref"][i, layer] = per_head(ref.pow(2), hq)
        deq = {}
        for bits in (4, 2):
            tl = TurboLayer(TurboConfig(bits=bits, low_bits=2, int2_heads=0))
            tl.update(k.float(), v.float())
            deq[bits] = tl.dequantized()  # every full block through BPQ (the sample is a multiple of 64 long)
        for key, kb, vb in (("err4", 4, 4), ("err2", 2, 2), ("err2k", 2, 4), ("err2v", 4, 2)):
            o = exact_attention(q, deq[kb][0], deq[vb][1], sm_scale=scale)
            out[key][i, layer] = per_head((o - ref).pow(2), hq)
        pk = head_priority(k).double().cpu()
        out["online_k"][i, layer] = pk
        out["online_kv"][i, layer] = pk + head_priority(v).double().cpu()

    device = next(model.parameters()).device
    with capture_attention(model, hook):
        for i in tqdm(range(n), desc="attention error", unit="sample", disable=not progress):
            state["i"] = i
            model(input_ids=samples[i : i + 1].to(device), use_cache=False)
    return out


def low_mask(priorities: torch.Tensor, n_low: int) -> torch.Tensor:
    """Bool ``[..., L, H]``: the ``n_low`` lowest priorities of each layer (ties: lower head index), as the cache."""
    order = torch.sort(priorities.float(), dim=-1, stable=True).indices
    mask = torch.zeros_like(priorities, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n_low], True)
    return mask


def attention_error(tables: dict[str, torch.Tensor], priorities: torch.Tensor | None, n_low: int,
                    *, online_key: str = "online_k") -> float:
    """Mean over layers of the relative attention-output error for a head assignment.

    ``priorities``: ``[L, H]`` (static) or ``[N, L, H]`` (per sample); None = online (each sample's own)."""
    pr = tables[online_key] if priorities is None else priorities
    mask = low_mask(pr, n_low)
    if mask.dim() == 2:
        mask = mask.expand_as(tables["err4"])
    err = torch.where(mask, tables["err2"], tables["err4"]).sum(dim=(0, 2))  # [L]
    ref = tables["ref"].sum(dim=(0, 2))
    return float((err / ref).sqrt().mean())


# ---------------------------------------------------------------------------------------------------- strategies
def strategies(stats, calib_tables: dict[str, torch.Tensor], eval_tables: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor | None]:
    """Priorities ``[L, H]`` per strategy (None = online)."""
    gap, std = stats.gap_std("k")
    calib_oracle = (calib_tables["err2"] - calib_tables["err4"]).sum(0) / calib_tables["ref"].sum(0).clamp_min(1e-30)
    eval_oracle = (eval_tables["err2"] - eval_tables["err4"]).sum(0) / eval_tables["ref"].sum(0).clamp_min(1e-30)
    return {
        "calibrated": stats.scores("k", "gap_std", "range"),
        "calibrated-kv": stats.scores("kv", "gap_std", "range"),
        "calibrated-v": stats.scores("v", "gap_std", "range"),
        "calibrated-mean": stats.scores("k", "gap_std", "mean"),
        "gap-only": gap,
        "std-only": std,
        "online": None,
        "random": "random",
        "inverted": -stats.scores("k", "gap_std", "range"),
        "oracle-calib": calib_oracle.float(),
        "oracle-eval": eval_oracle.float(),
    }


def _random_priorities(shape, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- driver
def run_ablation(model, tok, *, calib_text: str = "botchan", eval_text: str = "lee", calib_samples: int = 16,
                 err_samples: int = 8, seq_len: int = 512, n_lows=(1, 2), ppl_windows: int = 4, window: int = 1024,
                 context: int = 512, ppl_strategies=None, progress: bool = True) -> tuple[list[dict], dict]:
    """Run the whole comparison; returns ``(rows, extra)`` for :func:`hf_turbo.eval.results.write_result`."""
    from hf_turbo.eval.data import load_text
    from hf_turbo.eval.perplexity import Setting, evaluate, token_stream

    from .calibrate import resolve_texts

    docs, _ = resolve_texts(calib_text)
    calib = token_samples(tok, docs, calib_samples, seq_len, seed=0)
    stats = collect_stats(model, calib, progress=progress)
    calib_tables = head_error_tables(model, calib, progress=progress)
    text = load_text(eval_text)
    eval_ids = token_stream(tok, text)
    # error samples come from the part of the text the perplexity windows do not score (the end of the stream)
    tail = eval_ids[-err_samples * seq_len :]
    eval_samples = tail.reshape(err_samples, seq_len)
    eval_tables = head_error_tables(model, eval_samples, progress=progress)
    strat = strategies(stats, calib_tables, eval_tables)
    layers, heads = stats.shape[0], stats.shape[1]

    rows: list[dict[str, Any]] = []
    for name, pr in strat.items():
        row: dict[str, Any] = {"strategy": name}
        for n_low in (0, *n_lows):
            if name == "random":
                errs = [attention_error(eval_tables, _random_priorities((layers, heads), s), n_low) for s in range(10)]
                row[f"attn_err_{n_low}"] = sum(errs) / len(errs)
            else:
                row[f"attn_err_{n_low}"] = attention_error(eval_tables, pr, n_low)
        if isinstance(pr, torch.Tensor):
            ref_mask = low_mask(strat["calibrated"], 1)
            row["same_int2_head_as_calibrated_pct"] = 100.0 * float((low_mask(pr, 1) == ref_mask).all(-1).float().mean())
        rows.append(row)
    for label, key in (("all heads INT2", "err2"), ("all heads: K INT2, V INT4", "err2k"),
                       ("all heads: K INT4, V INT2", "err2v")):
        tables = {**eval_tables, "err2": eval_tables[key]}
        err = attention_error(tables, None, heads)
        rows.append({"strategy": label, **{f"attn_err_{n_low}": err for n_low in (0, *n_lows)}})

    # perplexity through the real cache (turbo attention, chunked protocol of hf_turbo.eval.perplexity)
    ppl_strategies = ppl_strategies or {1: ["calibrated", "calibrated-kv", "gap-only", "std-only", "online", "random",
                                            "inverted", "oracle-calib"],
                                        2: ["calibrated", "online", "random", "inverted", "oracle-calib"]}
    settings = [Setting("turbo-4bit", "turbo_cache", turbo={"bits": 4}, label="all heads 4-bit")]
    for n_low, names in ppl_strategies.items():
        for name in names:
            pr = strat[name]
            turbo = {"int2_heads": n_low}
            if name == "random":
                turbo["priorities"] = _random_priorities((layers, heads), 0).tolist()
            elif pr is not None:
                turbo["priorities"] = pr.tolist()
            settings.append(Setting(f"{name}@{n_low}", "turbo_cache", turbo=turbo, label=f"{name}, {n_low} INT2/layer"))
    ppl_rows = evaluate(model, eval_ids, settings, window=window, context=context, max_windows=ppl_windows,
                        progress=progress)
    by_name = {r["setting"]: r for r in ppl_rows}
    for row in rows:
        for n_low in n_lows:
            r = by_name.get(f"{row['strategy']}@{n_low}")
            if r:
                row[f"ppl_{n_low}"] = r["ppl"]
                row[f"ppl_delta_pct_{n_low}"] = r["ppl_delta_pct"]
    fp, four = by_name["fp"], by_name["turbo-4bit"]
    extra = {
        "fp_ppl": fp["ppl"], "int4_ppl": four["ppl"], "int4_ppl_delta_pct": four["ppl_delta_pct"],
        "ppl_rows": ppl_rows,
        "protocol": {"calib_text": calib_text, "calib_tokens": int(calib.numel()), "eval_text": eval_text,
                     "err_tokens": int(eval_samples.numel()), "seq_len": seq_len, "ppl_windows": ppl_windows,
                     "window": window, "context": context, "ppl_tokens": fp["tokens"]},
        "calibrated_priorities": strat["calibrated"].tolist(),
        "head_errors_eval": {k: v.sum(0).tolist() for k, v in eval_tables.items() if k.startswith(("err", "ref"))},
    }
    return rows, extra


def plot_ablation(rows, path: Path, n_lows=(1, 2), title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = [r for r in rows if not r["strategy"].startswith("all heads")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    x = range(len(named))
    width = 0.8 / len(n_lows)
    for j, n_low in enumerate(n_lows):
        axes[0].bar([i + j * width for i in x], [r[f"attn_err_{n_low}"] for r in named], width,
                    label=f"{n_low} INT2 head(s)/layer")
        ys = [r.get(f"ppl_delta_pct_{n_low}", math.nan) for r in named]
        axes[1].bar([i + j * width for i in x], ys, width, label=f"{n_low} INT2 head(s)/layer")
    base = rows[0]["attn_err_0"]
    axes[0].axhline(base, color="gray", ls="--", lw=1, label="all heads 4-bit")
    axes[0].set_ylabel("attention-output relative error (mean over layers)")
    axes[1].set_ylabel("perplexity increase vs FP (%)")
    for ax in axes:
        ax.set_xticks([i + width * (len(n_lows) - 1) / 2 for i in x])
        ax.set_xticklabels([r["strategy"] for r in named], rotation=45, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib-text", default="botchan")
    ap.add_argument("--eval-text", default="lee")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--err-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--name", default=None, help="write eval/results/<name>.json")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    from hf_turbo.eval.cli import describe_model, set_threads
    from hf_turbo.eval.results import write_result

    from hf_turbo.config import TurboConfig
    from hf_turbo.models import load_model

    set_threads(None)
    model, tok = load_model(args.model, attn_implementation="sdpa", device=args.device)
    rows, extra = run_ablation(model, tok, calib_text=args.calib_text, eval_text=args.eval_text,
                               calib_samples=args.calib_samples, err_samples=args.err_samples, seq_len=args.seq_len,
                               ppl_windows=args.ppl_windows, window=args.window, context=args.context)
    cols = ["strategy", "attn_err_1", "attn_err_2", "ppl_delta_pct_1", "ppl_delta_pct_2",
            "same_int2_head_as_calibrated_pct"]
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    if args.name:
        p = extra["protocol"]
        notes = (
            f"Head choice for INT2 (paper §5.6). attn_err_n: attention-output relative error with n INT2 KV heads per "
            f"layer (the rest INT4, BPQ through a real TurboLayer, exact softmax; mean over layers of "
            f"sqrt(sum err^2 / sum ref^2)) on {p['err_tokens']} held-out tokens of `{p['eval_text']}`; all heads "
            f"4-bit: {rows[0]['attn_err_0']:.4g}. ppl_delta_pct_n: perplexity vs FP SDPA through TurboQuantCache "
            f"(turbo attention, chunked protocol of hf_turbo.eval.perplexity) on {p['ppl_tokens']} tokens of "
            f"`{p['eval_text']}` with TurboConfig defaults (exp={TurboConfig().exp}, pv={TurboConfig().pv}); all heads "
            f"4-bit: {extra['int4_ppl_delta_pct']:+.2f}%. Calibration: "
            f"{p['calib_tokens']} tokens of `{p['calib_text']}`. random: error = mean of 10 seeds, ppl = seed 0. "
            f"oracle-eval is measured on the evaluation samples themselves (a bound, not a method). The 'all heads' rows "
            f"split the INT2 error into its K and V parts (attention error with only K, or only V, at 2 bits)."
        )
        path = write_result(args.name, rows, title=f"INT2 head selection: {describe_model(model, args.model)}",
                            columns=cols, notes=notes, extra=extra,
                            out_dir=Path(args.out_dir) if args.out_dir else None)
        print(f"wrote {path}")
        if args.plot:
            print(f"wrote {plot_ablation(rows, path.with_suffix('.png'), title='INT2 head selection strategies')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
