"""Where a decode step's time goes in real transformers generation: TurboQuantCache + turbo attention vs SDPA +
DynamicCache, profiled with ``torch.profiler`` (issue 6).

    python -m hf_turbo.eval.profile_generation --shape llama3-8b --batches 1,8 --prompt 1024

For each method and batch: the time per output token over ``--new`` greedy tokens (after a chunked prefill of the
prompt), then a profile of ``--profile-steps`` further tokens: the top operators by self CPU time and by GPU time,
the number of host-device synchronisations, kernel launches, and GPU busy time per token, and the Python functions
with the most own time (``cProfile``, the same number of tokens). Writes
``eval/results/profile_generation_<shape>.json``. ``--parts N``: layer 0's decode step timed whole and in parts
(cache update, attention function) on the host, N calls each (``<name>_parts.json``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from pathlib import Path

import torch
from hf_turbo.eval.bench_throughput import SHAPES, attention_backends, build_model, make_cache, prefill
from hf_turbo.eval.results import write_result

from hf_turbo.cache import head_dim

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCH_OPS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _top(events, key, n=15):
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [dict(name=e.key[:120], calls=e.count, self_cpu_us=e.self_cpu_time_total,
                 device_us=getattr(e, "self_device_time_total", 0.0)) for e in rows]


class TokenClock:
    """A ``generate(streamer=...)`` hook that timestamps every generated token (after a device sync), so the
    per-token times show whether a slow mean comes from every step or from a few spikes (a flush, a pool growth,
    a compile). The first ``put`` is the prompt; each later one is one decode step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def put(self, value) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_ms(self) -> list[float]:
        """Milliseconds between consecutive tokens (decode steps only)."""
        return [1e3 * (b - a) for a, b in zip(self.stamps[1:], self.stamps[2:])]


def step_stats(step_ms: list[float]) -> dict[str, float]:
    """Median, max and mean of the per-step times: median << mean means spikes, not a uniformly slow step."""
    if not step_ms:
        return dict(step_median_ms=float("nan"), step_max_ms=float("nan"), step_mean_ms=float("nan"))
    return dict(step_median_ms=statistics.median(step_ms), step_max_ms=max(step_ms),
                step_mean_ms=statistics.fmean(step_ms))


def profile_method(model, method, batch, prompt, new, steps, device):
    with attention_backends(method):
        return _profile_method(model, method, batch, prompt, new, steps, device)


@torch.inference_mode()
def _profile_method(model, method, batch, prompt, new, steps, device):
    from hf_turbo.generate import cache_kwarg

    ckw = cache_kwarg()
    model.set_attn_implementation("turbo" if method.startswith("turbo") else "sdpa")
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    cache = make_cache(method, model)
    prefill(model, ids, cache, 1024)
    gen = dict(attention_mask=mask, do_sample=False, **{ckw: cache})
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up (compiles kernels)
    cache = make_cache(method, model)
    prefill(model, ids, cache, 1024)
    gen[ckw] = cache
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen)
    torch.cuda.synchronize()
    tpot = (time.perf_counter() - t0) / new
    cache = make_cache(method, model)  # the same generation again, each step timed (syncs after every token)
    prefill(model, ids, cache, 1024)
    clock = TokenClock(device)
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, streamer=clock, **{**gen, ckw: cache})
    steps_ms = clock.step_ms()
    cache = make_cache(method, model)
    prefill(model, ids, cache, 1024)
    gen[ckw] = cache
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, with_stack=True) as prof:
        model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, **gen)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    sync_stacks = [dict(name=e.key, calls=e.count, stack=[f for f in e.stack if "hf_turbo" in f or "transformers" in f][:6])
                   for e in prof.key_averages(group_by_stack_n=12) if e.key.startswith(SYNC_OPS)]
    cache = make_cache(method, model)
    prefill(model, ids, cache, 1024)
    gen[ckw] = cache
    py = cProfile.Profile()
    py.enable()
    model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, **gen)
    torch.cuda.synchronize()
    py.disable()
    stats = pstats.Stats(py)
    top_py = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:25]  # by own (total) time
    top_python = [dict(function=f"{Path(f).name}:{line}:{name}", calls=nc, own_ms=tt * 1e3, cum_ms=ct * 1e3)
                  for (f, line, name), (cc, nc, tt, ct, _) in top_py]
    syncs = sum(e.count for e in ev if e.key.startswith(SYNC_OPS))
    launches = sum(e.count for e in ev if e.key in LAUNCH_OPS)
    gpu_us = sum(getattr(e, "self_device_time_total", 0.0) for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
    return dict(
        method=method, batch=batch, prompt=prompt, tpot_ms=1e3 * tpot, **step_stats(steps_ms), step_ms=steps_ms,
        new=new, tokens=int(out.shape[1] - prompt),
        profile_steps=steps, syncs_per_token=syncs / steps, launches_per_token=launches / steps,
        gpu_busy_ms_per_token=gpu_us / steps / 1e3,
        top_cpu=_top(ev, "self_cpu_time_total"), top_gpu=_top(ev, "self_device_time_total"),
        top_python=top_python, sync_stacks=sorted(sync_stacks, key=lambda x: -x["calls"])[:12],
    )


def _host_times(fn, calls: int, before=None) -> dict[str, float]:
    """Host time of ``calls`` calls of ``fn`` (each timed alone, no device sync: what the Python side costs while
    the GPU keeps up), after ``before()`` when given (untimed): min and median in microseconds."""
    xs = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        xs.append(1e6 * (time.perf_counter() - t0))
    return dict(min_us=min(xs), median_us=statistics.median(xs))


def layer_parts(model, method: str, batch: int, prompt: int, calls: int, device) -> list[dict]:
    """Host time of one decode step of layer 0, whole and in parts, for ``method``: the attention module's forward
    (projections, rotary, cache update, attention, output projection), the cache update alone and the attention
    function alone (after an untimed update, as in a step). Rows: ``{method, batch, prompt, part, min_us,
    median_us}``; the module minus its two parts is the rest of the module (the same code for every method)."""
    with attention_backends(method), torch.inference_mode():
        return _layer_parts(model, method, batch, prompt, calls, device)


def _layer_parts(model, method, batch, prompt, calls, device):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = "turbo" if method.startswith("turbo") else "sdpa"
    model.set_attn_implementation(impl)
    cfg = model.config
    attn = model.model.layers[0].self_attn
    d = head_dim(cfg)
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
    h = torch.randn(batch, 1, cfg.hidden_size, device=device, dtype=dtype)
    pos = model.model.rotary_emb(h, torch.full((batch, 1), prompt + calls, device=device))
    q = torch.randn(batch, cfg.num_attention_heads, 1, d, device=device, dtype=dtype)
    kv = torch.randn(batch, cfg.num_key_value_heads, 1, d, device=device, dtype=dtype)
    fn = ALL_ATTENTION_FUNCTIONS[impl]
    rows = []

    def fresh_cache():
        cache = make_cache(method, model)
        prefill(model, ids, cache, 1024)
        return cache

    cache = fresh_cache()
    part = _host_times(lambda: attn(h, position_embeddings=pos, attention_mask=None, past_key_values=cache), calls)
    rows.append(dict(part="attention module step", **part))
    cache = fresh_cache()
    rows.append(dict(part="cache update", **_host_times(lambda: cache.update(kv, kv, 0), calls)))
    cache = fresh_cache()
    step = {}

    def update():
        step["kv"] = cache.update(kv, kv, 0)

    part = _host_times(lambda: fn(attn, q, *step["kv"], None, scaling=d**-0.5), calls, before=update)
    rows.append(dict(part="attention function", **part))
    return [dict(method=method, batch=batch, prompt=prompt, **r) for r in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (faster runs)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--methods", default="sdpa,sdpa-flash,turbo4,turbo-mixed")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--parts", type=int, default=0,
                    help="also time layer 0's decode step whole and in parts, this many calls each (host time; "
                         "written to <name>_parts.json)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_generation needs a CUDA GPU")
    device = torch.device("cuda")
    if args.layers:
        SHAPES[args.shape][1]["num_hidden_layers"] = args.layers
    model = build_model(args.shape, device, getattr(torch, args.dtype))
    rows = []
    for b in map(int, args.batches.split(",")):
        for m in args.methods.split(","):
            r = profile_method(model, m, b, args.prompt, args.new, args.profile_steps, device)
            rows.append(r)
            print({k: v for k, v in r.items() if not k.startswith("top")}, flush=True)
            for e in r["top_cpu"][:8]:
                print("   cpu", e)
            for e in r["top_gpu"][:8]:
                print("   gpu", e)
            for e in r["top_python"][:15]:
                print("   py", e)
            for e in r["sync_stacks"]:
                print("   sync", e)
    name = args.name or f"profile_generation_{args.shape}"
    path = write_result(
        name, rows, title=f"Decode step profile, {args.shape} ({args.dtype}), prompt {args.prompt}",
        columns=["method", "batch", "tpot_ms", "step_median_ms", "step_max_ms", "gpu_busy_ms_per_token",
                 "launches_per_token", "syncs_per_token"],
        notes="tpot_ms: wall time per output token; step_median/max_ms: the same generation with every step timed "
              "(a device sync per token), median << mean means a few slow steps; gpu_busy: summed kernel time per "
              "token from torch.profiler (tpot far above it = the step is bound by Python / launches, not by the GPU).",
    )
    print("wrote", path)
    if args.parts:
        parts = [r for b in map(int, args.batches.split(",")) for m in args.methods.split(",")
                 for r in layer_parts(model, m, b, args.prompt, args.parts, device)]
        for r in parts:
            print(r)
        write_result(
            f"{name}_parts", parts, title=f"Host time of one layer's decode step, {args.shape} ({args.dtype}), "
            f"prompt {args.prompt}", columns=["method", "batch", "part", "min_us", "median_us"],
            notes=f"{args.parts} calls per part, each timed alone without a device sync (host time); the attention "
                  "function is timed after an untimed cache update, as in a step.",
        )


if __name__ == "__main__":
    main()
