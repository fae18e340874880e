"""End-to-end serving benchmark: maximum decode throughput at a fixed GPU memory budget, TTFT and time per token.

    python -m hf_turbo.eval.bench_throughput --shape llama3-8b --budget-gib 60       # GPU, one call < 10 min
    hf-turbo bench throughput --shape tiny --device cpu --lengths 128:16            # a CPU smoke run

Methods, same run, same weights: ``sdpa`` (SDPA + DynamicCache, the FP16/BF16 cache, torch's default backend
order: cuDNN first on Hopper), ``sdpa-flash`` (the same with cuDNN excluded: flash / memory-efficient kernels;
cuDNN builds a new plan for every new key length, a per-token host cost in generation), ``turbo4`` (turbo attention +
TurboQuantCache, all heads INT4), ``turbo-mixed`` (half the KV heads INT2), ``turbo-mixed25-r64`` (a quarter of
the KV heads INT2, the newest 64 tokens uncompressed: the accuracy-checked mixed setting), and ``quanto4``
(transformers' QuantizedCache, quanto backend, 4-bit, + SDPA) when optimum-quanto imports.

For each ``prompt:generated`` length the largest batch that fits the budget (weights included, the same budget for
every method) is found from two measured points of peak memory (batch 1 and 2: intercept + slope per sequence),
then checked by running it (stepping down 10% on OOM). At that batch and at a ladder of smaller batches we measure
time to first token (prefill of the whole batch), mean time per output token and decode throughput (generated
tokens / decode time), greedy, a fixed number of new tokens (EOS ignored); ``--repeats N`` keeps the median of N
runs. ``--latency-repeats N`` adds batch-1 time per token, every method once per round over N rounds (medians). No
CUDA graphs or torch.compile (not every method supports them). KV bytes per token are read from the cache objects
(scales and buffer included) next to the theoretical FP16 figure.

``--memory-contexts 1024,4096,...``: KV-cache bytes of one sequence at each context length, read from each method's
cache object after filling it through ``cache.update`` with random keys/values (no model run, so it also runs on a
CPU for the full-size shapes); ``<name>_memory.json`` and a plot of memory vs context length. ``--memory-only``
skips everything else (no model is built).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=32768)),
    # original_max_position_embeddings: transformers' Phi3 generation drops the cache once a sequence crosses it (a
    # LongRoPE model recomputes its prefix there); this shape has plain RoPE, so it is set to the full range
    "phi3-mini": ("phi3", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, vocab_size=32064, max_position_embeddings=32768,
                               original_max_position_embeddings=32768)),
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768)),
    "tiny": ("llama", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)),
}
# turbo methods: TurboQuantCache overrides. turbo-mixed25-r64 is the mixed setting that meets the accuracy target on
# SmolLM2 (README: 25% of the KV heads INT2 and the newest 64 tokens uncompressed)
TURBO_METHODS: dict[str, dict[str, Any]] = {
    "turbo4": dict(int2_fraction=0.0),
    "turbo-mixed": dict(int2_fraction=0.5),
    "turbo-mixed25-r64": dict(int2_fraction=0.25, residual_length=64),
}
METHODS = ("sdpa", "sdpa-flash", *TURBO_METHODS, "quanto4")
SDPA_METHODS = ("sdpa", "sdpa-flash")


def shape_config(shape: str):
    """The transformers config of ``shape`` (see :data:`SHAPES`)."""
    from transformers import AutoConfig

    model_type, kw = SHAPES[shape]
    return AutoConfig.for_model(model_type, **kw)


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight model of ``shape`` built directly on ``device`` (no download)."""
    from transformers import AutoModelForCausalLM

    cfg = shape_config(shape)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def method_available(method: str) -> str | None:
    """None if ``method`` can run here, else why not."""
    if method == "quanto4":
        try:
            import optimum.quanto  # noqa: F401
        except Exception as exc:
            return f"optimum-quanto not importable: {exc!r}"
    return None


def make_cache(method: str, model):
    from transformers import DynamicCache

    from hf_turbo import TurboQuantCache

    if method in SDPA_METHODS:
        return DynamicCache(config=model.config)
    if method in TURBO_METHODS:
        return TurboQuantCache(model.config, **TURBO_METHODS[method])
    if method == "quanto4":
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def attention_backends(method: str):
    """The SDPA backend restriction a method runs under (a context manager; no restriction for most)."""
    import contextlib

    if method == "sdpa-flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    return contextlib.nullcontext()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache, chunk: int) -> None:
    """Fill ``cache`` with all but the last prompt token, ``chunk`` tokens at a time (bounded activation memory, as
    a serving engine's chunked prefill; the same for every method). Only the last position's logits are computed."""
    from hf_turbo.generate import cache_kwarg

    ckw = cache_kwarg()
    for s in range(0, ids.shape[1] - 1, chunk):
        model(ids[:, s : min(s + chunk, ids.shape[1] - 1)], use_cache=True, logits_to_keep=1, **{ckw: cache})


def run_once(model, method: str, batch: int, prompt: int, new: int, device, chunk: int = 1024) -> dict[str, Any]:
    """One generation: chunked prefill, then greedy decoding of ``new`` tokens. TTFT = prefill + the first token."""
    with attention_backends(method):
        return _run_once(model, method, batch, prompt, new, device, chunk)


class StepClock:
    """A stopping criterion that never stops and notes the host time of each generation step (``times``).

    generate() waits for the device once per step (its end-of-sequence check), so the gap between two notes is one
    step as the user sees it; the median gap is the inter-token latency, which a stall of the shared host during a
    few steps does not move (the mean, TPOT, takes every stall in)."""

    def __init__(self):
        self.times: list[float] = []
        self._false = None

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        if self._false is None or self._false.shape[0] != input_ids.shape[0]:
            self._false = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._false

    def gaps_ms(self) -> list[float]:
        return [1e3 * (b - a) for a, b in zip(self.times, self.times[1:])]


@torch.inference_mode()
def _run_once(model, method, batch, prompt, new, device, chunk):
    from transformers import StoppingCriteriaList

    from hf_turbo.generate import cache_bytes, cache_kwarg

    model.set_attn_implementation("turbo" if method.startswith("turbo") else "sdpa")
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    ckw = cache_kwarg()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cache = make_cache(method, model)
    _sync(device)
    t0 = time.perf_counter()
    prefill(model, ids, cache, chunk)
    model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, **{ckw: cache})
    _sync(device)
    ttft = time.perf_counter() - t0
    if method != "quanto4":
        cache.crop(-1)  # drop the last prompt token so that generate() re-enters with it
    else:  # QuantizedCache cannot crop: prefill again
        cache = make_cache(method, model)
        prefill(model, ids, cache, chunk)
    clock = StepClock()
    _sync(device)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   stopping_criteria=StoppingCriteriaList([clock]), **{ckw: cache})
    _sync(device)
    decode = time.perf_counter() - t0
    gaps = clock.gaps_ms()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    tokens = prompt + new
    kv = cache_bytes(cache)
    return {
        "method": method, "batch": batch, "prompt": prompt, "new": new,
        "ttft_s": ttft, "tpot_ms": 1e3 * decode / new,
        "itl_ms_median": statistics.median(gaps) if gaps else float("nan"),
        "decode_tok_s": batch * new / decode, "peak_gib": peak / 2**30,
        "kv_bytes_per_token": kv / (batch * tokens),
    }


def fp16_bytes_per_token(model) -> float:
    from hf_turbo.generate import fp16_kv_bytes

    return fp16_kv_bytes(model, 1)


def max_batch(model, method, prompt, new, budget_bytes, device, cap: int) -> int:
    """Largest batch under ``budget_bytes`` peak memory: fit intercept + slope from batches 1 and 2, then check."""
    if device.type != "cuda":
        return min(cap, 4)
    p1 = run_once(model, method, 1, prompt, new, device)["peak_gib"] * 2**30
    p2 = run_once(model, method, 2, prompt, new, device)["peak_gib"] * 2**30
    slope = max(p2 - p1, 1.0)
    b = int(max(1, min(cap, (budget_bytes - (p1 - slope)) // slope)))
    while b > 1:
        try:
            r = run_once(model, method, b, prompt, min(new, 8), device)
            if r["peak_gib"] * 2**30 <= budget_bytes:
                return b
        except torch.OutOfMemoryError:
            pass
        gc.collect()
        b = int(b * 0.9)
    return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget-gib", type=float, default=60.0, help="GPU memory budget, weights included")
    ap.add_argument("--lengths", default="1024:256,4096:256,16384:128", help="prompt:generated pairs")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ladder", default="1,4,16", help="smaller batches measured besides the maximum")
    ap.add_argument("--max-batch-cap", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed generations per (method, batch); the median run by tokens/s is reported")
    ap.add_argument("--latency-repeats", type=int, default=0,
                    help="also measure batch-1 time per token: every method this many times, interleaved, at each "
                         "prompt length (written to <name>_batch1.json)")
    ap.add_argument("--latency-new", type=int, default=64, help="generated tokens per batch-1 latency run")
    ap.add_argument("--latency-only", action="store_true", help="only the batch-1 latency rounds (no throughput)")
    ap.add_argument("--memory-contexts", default="",
                    help="also measure the KV bytes of one sequence at these context lengths (comma list; written to "
                         "<name>_memory.json)")
    ap.add_argument("--memory-only", action="store_true", help="only the KV memory measurement (no model is built)")
    ap.add_argument("--name", default=None, help="results name (default bench_throughput_<shape>)")
    ap.add_argument("--out-dir", default=None)


def run(args) -> int:
    from pathlib import Path

    from hf_turbo.eval.results import write_result
    from tqdm import tqdm

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = args.name or f"bench_throughput_{args.shape}"
    out_dir = Path(args.out_dir) if args.out_dir else None
    if args.memory_contexts:
        contexts = [int(x) for x in args.memory_contexts.split(",")]
        available = [m for m in methods if method_available(m) is None]
        mem = kv_memory_rows(shape_config(args.shape), available, contexts, device, dtype)
        write_result(
            f"{name}_memory", mem,
            title=f"KV-cache memory of one sequence vs context length, {args.shape} ({args.dtype})",
            columns=["method", "context", "kv_mib", "kv_bytes_per_token", "ratio_vs_fp16"],
            notes="Bytes held by each method's cache object (codes, scales, zero points, FP16 buffer and residual) "
                  "after filling it with random keys/values through cache.update, 1024 tokens at a time; ratio_vs_fp16:"
                  " an FP16 cache's bytes for the same tokens over these.",
            out_dir=out_dir,
        )
        _plot_memory(mem, f"{name}_memory", out_dir)
        for row in mem:
            print(row)
    if args.memory_only:
        return 0
    model = build_model(args.shape, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = args.budget_gib * 2**30
    rows, skipped = [], {}
    lengths = [tuple(int(x) for x in pair.split(":")) for pair in args.lengths.split(",")]
    for method in methods:
        reason = method_available(method)
        if reason:
            skipped[method] = reason
    jobs = [(m, p, n) for p, n in lengths for m in methods if m not in skipped]
    for method, prompt in {(m, p) for m, p, _ in jobs}:  # warm-up: compilation and allocator growth stay out of timings
        run_once(model, method, 1, prompt, 4, device)  # the prompt's length: the kernels' variants for that context
    if args.latency_repeats > 0:
        active = [m for m in methods if m not in skipped]
        lat = batch1_latency(model, active, [p for p, _ in lengths], args.latency_new, args.latency_repeats, device)
        write_result(
            f"{name}_batch1", lat["summary"],
            title=f"Time per output token at batch 1, {args.shape} ({args.dtype}), median of {args.latency_repeats} "
                  "interleaved runs",
            notes=(f"{args.latency_new} greedy tokens per run after a chunked prefill; every method runs once per "
                   "round, rounds repeated, so host or clock drift hits all alike. ratio_vs_sdpa: median TPOT over the "
                   "faster SDPA method's median (<= 1.10 is the target: at most 10% slower per token); "
                   "ratio_paired_median: the median over rounds of TPOT over the faster SDPA method's TPOT in the "
                   "same round (drift between rounds cancels; the order of the methods rotates from round to "
                   "round). itl_ms_median: the median over runs of each run's median inter-token latency (the time "
                   "between two generation steps, host stalls during a few steps "
                   "left out; TPOT, the mean, keeps them); itl_ratio_paired_median: its per-round ratio, as above."),
            extra={"samples": lat["samples"], "itl_samples": lat["itl_samples"]}, out_dir=out_dir,
        )
        for row in lat["summary"]:
            print(row)
    if args.latency_only:
        return 0
    for method, prompt, new in tqdm(jobs, desc="throughput"):
        try:
            bmax = max_batch(model, method, prompt, new, budget, device, args.max_batch_cap)
            batches = sorted({b for b in (int(x) for x in args.ladder.split(",")) if b < bmax} | {bmax})
            for b in batches:
                runs = [run_once(model, method, b, prompt, new, device) for _ in range(max(1, args.repeats))]
                r = sorted(runs, key=lambda x: x["decode_tok_s"])[len(runs) // 2]
                r["decode_tok_s_runs"] = [x["decode_tok_s"] for x in runs]
                r["max_batch"] = b == bmax
                rows.append(r)
        except Exception as exc:  # one method failing must not hide the others' numbers
            skipped[f"{method}@{prompt}"] = repr(exc)[:300]
        # written after every job, so a run cut short still leaves its data
        summary = summarize(rows, fp16_bytes_per_token(model))
        write_result(
            name, summary,
            title=f"Max decode throughput at a {args.budget_gib:g} GiB budget, {args.shape} ({args.dtype})",
            notes=(f"Weights {weights / 2**30:.1f} GiB; FP16 KV {fp16_bytes_per_token(model):.0f} B/token. Greedy, "
                   "fixed new tokens, no CUDA graphs; ratio_vs_sdpa: decode tokens/s at each method's max batch over the faster "
                   "of sdpa and sdpa-flash at theirs."
                   + (f" Skipped: {skipped}" if skipped else "")),
            extra={"all_rows": rows, "skipped": skipped, "budget_gib": args.budget_gib},
            out_dir=out_dir,
        )
    _plot(rows, name, out_dir)
    for s in summarize(rows, fp16_bytes_per_token(model)):
        print(s)
    return 0


def batch1_latency(model, methods, prompts, new, repeats, device) -> dict[str, Any]:
    """Batch-1 time per output token of every method, interleaved over ``repeats`` rounds (one generation per method
    per round): ``{"summary": [row per (prompt, method)], "samples": {"<prompt>/<method>": [tpot_ms, ...]},
    "itl_samples": {...: [median inter-token latency of each run, ms]}}``."""
    from tqdm import tqdm

    samples: dict[str, list[float]] = {}
    itl: dict[str, list[float]] = {}
    for rnd in tqdm(range(repeats), desc="batch-1 latency"):
        for prompt in prompts:
            for method in methods[rnd % len(methods):] + methods[: rnd % len(methods)]:  # no method always first
                r = run_once(model, method, 1, prompt, new, device)
                samples.setdefault(f"{prompt}/{method}", []).append(r["tpot_ms"])
                itl.setdefault(f"{prompt}/{method}", []).append(r["itl_ms_median"])
    summary = []
    for prompt in prompts:
        sdpa = [m for m in SDPA_METHODS if m in methods]
        tpot = _vs_sdpa({m: samples[f"{prompt}/{m}"] for m in methods}, sdpa, repeats)
        gap = _vs_sdpa({m: itl[f"{prompt}/{m}"] for m in methods}, sdpa, repeats)
        for m in methods:
            xs = samples[f"{prompt}/{m}"]
            summary.append({"prompt": prompt, "method": m, "tpot_ms_median": tpot[m][0], "tpot_ms_min": min(xs),
                            "tpot_ms_max": max(xs), "runs": len(xs), "ratio_vs_sdpa": tpot[m][1],
                            "ratio_paired_median": tpot[m][2], "itl_ms_median": gap[m][0],
                            "itl_ratio_paired_median": gap[m][2]})
    return {"summary": summary, "samples": samples, "itl_samples": itl}


def _vs_sdpa(runs: dict[str, list[float]], sdpa: list[str], repeats: int) -> dict[str, tuple[float, float, float]]:
    """Per method: (median over runs, that median over the faster SDPA method's, median over rounds of the run over
    the faster SDPA run of the same round). The per-round pairing cancels drift between rounds."""
    med = {m: statistics.median(xs) for m, xs in runs.items()}
    base = min((med[m] for m in sdpa), default=float("nan"))
    round_base = [min(runs[m][r] for m in sdpa) for r in range(repeats)] if sdpa else []
    out = {}
    for m, xs in runs.items():
        paired = statistics.median(x / b for x, b in zip(xs, round_base)) if round_base else float("nan")
        out[m] = (med[m], med[m] / base, paired)
    return out


def summarize(rows: list[dict], fp16_per_token: float) -> list[dict]:
    """One row per (prompt, method) at its maximum batch, with the throughput ratio to the faster SDPA method
    (``sdpa`` or ``sdpa-flash``) at its own maximum batch."""
    for r in rows:
        r["kv_ratio_vs_fp16"] = fp16_per_token / r["kv_bytes_per_token"] if r["kv_bytes_per_token"] else float("nan")
    best = {(r["prompt"], r["method"]): r for r in rows if r.get("max_batch")}
    summary = []
    for (prompt, method), r in sorted(best.items()):
        sdpa = [best[(prompt, m)] for m in SDPA_METHODS if (prompt, m) in best]
        base = max(sdpa, key=lambda x: x["decode_tok_s"]) if sdpa else None
        summary.append({
            "prompt": prompt, "method": method, "max_batch": r["batch"], "decode_tok_s": r["decode_tok_s"],
            "ratio_vs_sdpa": r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan"),
            "ttft_s": r["ttft_s"], "tpot_ms": r["tpot_ms"], "kv_bytes_per_token": r["kv_bytes_per_token"],
            "kv_ratio_vs_fp16": r["kv_ratio_vs_fp16"],
        })
    return summary


@torch.inference_mode()
def kv_memory_rows(config, methods, contexts, device, dtype, chunk: int = 1024) -> list[dict]:
    """KV bytes of one sequence after ``context`` tokens, for each method's cache, filled through ``cache.update``
    with random keys/values ``[1, kv_heads, <= chunk, head_dim]`` layer by layer, as a chunked prefill would (the
    bytes do not depend on the values). Rows: ``{method, context, kv_bytes, kv_mib, kv_bytes_per_token,
    ratio_vs_fp16}``; methods sharing a cache (``sdpa``, ``sdpa-flash``) are measured once, as ``sdpa``."""
    from types import SimpleNamespace

    from tqdm import tqdm

    from hf_turbo.cache import head_dim as config_head_dim
    from hf_turbo.cache import kv_heads
    from hf_turbo.generate import cache_bytes, fp16_kv_bytes

    heads, head_dim = kv_heads(config), config_head_dim(config)
    holder = SimpleNamespace(config=config)  # what make_cache and fp16_kv_bytes read of a model
    fp16_per_token = fp16_kv_bytes(holder, 1)
    todo = list(dict.fromkeys("sdpa" if m in SDPA_METHODS else m for m in methods))
    rows = []
    for method, context in tqdm([(m, c) for m in todo for c in contexts], desc="kv memory"):
        cache = make_cache(method, holder)
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            k = torch.randn(1, heads, n, head_dim, device=device, dtype=dtype)
            v = torch.randn(1, heads, n, head_dim, device=device, dtype=dtype)
            for layer in range(config.num_hidden_layers):
                cache.update(k, v, layer)
        kv = cache_bytes(cache)
        rows.append(dict(method=method, context=context, kv_bytes=kv, kv_mib=kv / 2**20,
                         kv_bytes_per_token=kv / context, ratio_vs_fp16=fp16_per_token * context / kv))
        del cache
        gc.collect()
    return rows


def _pyplot():
    """matplotlib.pyplot with the file backend, or None when matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot_memory(rows, name, out_dir) -> None:
    plt = _pyplot()
    if plt is None:
        return
    from hf_turbo.eval.results import RESULTS_DIR

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["context"], r["kv_mib"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache of one sequence (MiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig((out_dir or RESULTS_DIR) / f"{name}.png", dpi=100)
    plt.close(fig)


def _plot(rows, name, out_dir) -> None:
    plt = _pyplot()
    if plt is None:
        return
    from hf_turbo.eval.results import RESULTS_DIR

    out = (out_dir or RESULTS_DIR) / f"{name}.png"
    prompts = sorted({r["prompt"] for r in rows})
    fig, axes = plt.subplots(1, len(prompts), figsize=(5 * len(prompts), 4), squeeze=False)
    for ax, prompt in zip(axes[0], prompts):
        for method in METHODS:
            pts = sorted((r["batch"], r["decode_tok_s"]) for r in rows if r["prompt"] == prompt and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"prompt {prompt}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
