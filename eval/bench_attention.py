# ruff: noqa: B023, F821  (closures are timed inside the loop iteration that binds them)
"""Attention benchmarks on the GPU (issue 4): prefill TFLOPS-equivalent and decode latency / bandwidth of the
TurboAttention kernels against SDPA flash, SDPA cuDNN and SageAttention 1.0.6 (Triton), with the machine's ceilings
measured in the same run, and the accuracy of each configuration against exact FP32 attention.

    python -m hf_turbo.eval.bench_attention [--quick]

Writes eval/results/attention_{ceilings,prefill,decode,accuracy}.json (+ attention_prefill.png, attention_decode.png).
Timings: ``triton.testing.do_bench(return_mode="median")`` (CUDA events), after the kernels were checked against the
reference (tests/gpu). Our prefill time **includes** quantizing K (stage-1 kernel, after K smoothing's mean where
the configuration smooths) and V where it is read as INT8, and Q (inside the kernel).
TFLOPS-eq = 4 B H S^2 d (/2 causal) / time. Decode bytes = bytes the kernel must read (codes, scales, zero points,
FP16 tail, Q) vs the FP16 K/V cache for SDPA. Inputs larger than L2 (prefill tensors are >= 268 MB; small decode
caches are rotated among copies so that every timed call reads from HBM).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback

import torch
import triton
from hf_turbo.eval.results import write_result

from hf_turbo.config import TurboConfig

_PAPER = {k: v for k, v in TurboConfig.preset("paper").to_dict().items() if k != "priorities"}
PREFILL_VARIANTS = {
    # the "paper" preset exactly (SAS base e, INT8 P.V, Q in 64-row blocks, no K smoothing, INT8 tail values)
    "turbo paper (SAS-e, INT8 PV)": _PAPER,
    "turbo SAS-2, FP16 PV": dict(exp="sas", sas_base="2", pv="fp16"),
    "turbo exp2, FP16 PV": dict(),  # the default: exp2, FP16 P.V on the FP16 values, K smoothing
    "turbo exp2, FP16 PV, INT8 V": dict(tail_v="int8"),  # values through stage-1 INT8 (one more pass)
    "turbo exp2, FP16 PV, INT8 V, no smoothing": dict(tail_v="int8", k_smooth=False),
    "turbo exp2, INT8 PV": dict(exp="exp2", pv="int8"),
}
# launch variants of the fastest configuration (tile / warps), timed like the others
LAUNCH_VARIANTS = {
    "turbo exp2, FP16 PV, 128x64 w4": (dict(exp="exp2", pv="fp16"), dict(num_warps=4)),
    "turbo exp2, FP16 PV, 64x64 w4": (dict(exp="exp2", pv="fp16"), dict(block_m_override=64, num_warps=4)),
}


def bench(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=20, rep=rep, return_mode="median")


def ceilings():
    rows = []
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    rows.append(dict(what="device-to-device copy 1 GiB", value=2 * x.numel() / ms / 1e6, unit="GB/s (read+write)"))
    del x, y
    n = 8192
    a = torch.randn(n, n, device="cuda").half()
    b = torch.randn(n, n, device="cuda").half()
    ms = bench(lambda: a @ b)
    rows.append(dict(what="fp16 matmul 8192^3", value=2 * n**3 / ms / 1e9, unit="TFLOPS"))
    a8 = torch.randint(-100, 100, (n, n), device="cuda", dtype=torch.int8)
    b8 = torch.randint(-100, 100, (n, n), device="cuda", dtype=torch.int8).t().contiguous().t()
    try:
        ms = bench(lambda: torch._int_mm(a8, b8))
        rows.append(dict(what="int8 matmul 8192^3 (torch._int_mm)", value=2 * n**3 / ms / 1e9, unit="TOPS"))
    except Exception as exc:
        rows.append(dict(what="int8 matmul", value=None, unit=repr(exc)[:120]))
    try:
        af = a.to(torch.float8_e4m3fn)
        bf = b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device="cuda")
        ms = bench(lambda: torch._scaled_mm(af, bf, one, one, out_dtype=torch.float16))
        rows.append(dict(what="fp8 matmul 8192^3 (torch._scaled_mm)", value=2 * n**3 / ms / 1e9, unit="TFLOPS"))
    except Exception as exc:
        rows.append(dict(what="fp8 matmul", value=None, unit=repr(exc)[:120]))
    return rows


def decode_notes() -> str:
    """The decode table's notes (what each 'walk' runs and when decode_layer picks the MMA walk)."""
    from hf_turbo.kernels.decode_mma import AUTO_LONG_TILES, AUTO_MIN_PAIRS, AUTO_MIN_TILES

    return ("ours (walk 'triton'): one decode launch per layer for all its bit-width pools (Q and the FP16 tail "
            "quantized inside it, split contexts merged by the last split); walk 'mma' (decode_layer's automatic "
            f"choice at >= {AUTO_MIN_TILES} pair-tiles and >= {AUTO_MIN_PAIRS} sequence x KV-head pairs or >= "
            f"{AUTO_LONG_TILES} pair-tiles): "
            "kernels/decode_mma attends to the compressed blocks, one launch per pool, then the Triton launch adds "
            "the tail and merges; eager calls, so small cases include the host launch cost (decode_tuning.json has "
            "CUDA-graph times)")


def _sdpa(q, k, v, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    gqa = q.shape[1] != k.shape[1]

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


def _sage():
    try:
        from sageattention import sageattn

        return sageattn
    except Exception:
        return None


def prefill_rows(quick=False):
    from hf_turbo.kernels import prefill

    rows = []
    sage = _sage()
    seqs = [1024, 4096, 16384] if quick else [1024, 4096, 16384, 32768]
    for d in (128, 64):
        for s in seqs:
            b, h = 32768 // s, 32
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
            for causal in (True, False):
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                cands = {}
                for name, kw in PREFILL_VARIANTS.items():
                    t = TurboConfig(**kw)
                    cands[name] = (lambda t=t: prefill(q, k, v, t, sm_scale=d**-0.5, causal=causal))
                for name, (kw, launch) in LAUNCH_VARIANTS.items():
                    t = TurboConfig(**kw)
                    cands[name] = (lambda t=t, launch=launch: prefill(q, k, v, t, sm_scale=d**-0.5, causal=causal,
                                                                      **launch))
                cands["SDPA flash (FA2)"] = _sdpa(q, k, v, causal, "flash")
                cands["SDPA cuDNN"] = _sdpa(q, k, v, causal, "cudnn")
                if sage is not None:
                    cands["SageAttention1 Triton"] = lambda: sage(q, k, v, tensor_layout="HND", is_causal=causal)
                for name, fn in cands.items():
                    try:
                        ms = bench(fn)
                        rows.append(dict(kernel=name, d=d, S=s, B=b, H=h, causal=causal, ms=ms, tflops=flops / ms / 1e9))
                    except Exception as exc:
                        rows.append(dict(kernel=name, d=d, S=s, B=b, H=h, causal=causal, ms=None, tflops=None,
                                         error=repr(exc)[:200]))
                    r = rows[-1]
                    print(f"prefill d={d} S={s} causal={causal} {name:32s} "
                          f"{r['tflops'] and round(r['tflops'], 1)} TFLOPS {r.get('error', '')}", flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def accuracy_rows():
    from hf_turbo.kernels import prefill

    rows = []
    sage = _sage()
    b, h, s = 1, 8, 4096
    for d in (64, 128):
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
        k = k + 2.0 * torch.randn(1, 1, 1, d, device="cuda", dtype=torch.float16)  # a per-channel key bias
        for causal in (True, False):
            ex = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            cands = {name: (lambda kw=kw: prefill(q, k, v, TurboConfig(**kw), sm_scale=d**-0.5, causal=causal))
                     for name, kw in PREFILL_VARIANTS.items()}
            cands["SDPA flash (FP16)"] = _sdpa(q, k, v, causal, "flash")
            if sage is not None:
                cands["SageAttention1 Triton"] = lambda: sage(q, k, v, tensor_layout="HND", is_causal=causal)
            for name, fn in cands.items():
                try:
                    o = fn().float()
                    rel = ((o - ex).norm() / ex.norm()).item()
                    cos = torch.nn.functional.cosine_similarity(o.flatten(), ex.flatten(), dim=0).item()
                    rows.append(dict(kernel=name, d=d, S=s, causal=causal, rel_l2=rel, cosine=cos))
                except Exception as exc:
                    rows.append(dict(kernel=name, d=d, S=s, causal=causal, rel_l2=None, cosine=None,
                                     error=repr(exc)[:200]))
    return rows


def _decode_layer(cfg, b, hkv, ctx, d):
    from hf_turbo.cache import TurboLayer

    layer = TurboLayer(cfg)
    step = 8192

    def append(n):  # as turbo attention does: no dequantized copy of the context (B=64 128k would not fit)
        layer.update(torch.randn(b, hkv, n, d, device="cuda").half(), torch.randn(b, hkv, n, d, device="cuda").half(),
                     turbo_reader=True)

    for t0 in range(0, ctx, step):
        append(min(step, ctx - t0))
        layer.release_step()
    append(1)
    return layer


def decode_rows(quick=False):
    from hf_turbo.kernels import attend_layer

    from hf_turbo.quant.attention import exact_attention, turbo_attention_reference

    rows = []
    hq, hkv, d = 32, 8, 128
    l2 = 64 * 2**20
    configs = {"turbo 4-bit": dict(int2_fraction=0.0), "turbo 2-bit": dict(int2_fraction=1.0),
               "turbo mixed (50% 2-bit)": dict(int2_fraction=0.5)}
    for ctx in (4096, 32768) if quick else (4096, 32768, 131072):  # 128k: B=64's FP16 K/V take 34 GB
        for b in ((1, 16) if quick else (1, 16, 64)):
            fp16_bytes = 2 * b * hkv * (ctx + 1) * d * 2
            ncopy = max(1, math.ceil(2 * l2 / fp16_bytes))
            qs = [torch.randn(b, hq, 1, d, device="cuda").half() for _ in range(ncopy)]
            kv = [(torch.randn(b, hkv, ctx + 1, d, device="cuda").half(),
                   torch.randn(b, hkv, ctx + 1, d, device="cuda").half()) for _ in range(ncopy)]
            it = [0]

            def sd(backend):
                fns = [_sdpa(qs[i], kv[i][0], kv[i][1], False, backend) for i in range(ncopy)]

                def run():
                    it[0] = (it[0] + 1) % ncopy
                    return fns[it[0]]()
                return run

            for name in ("flash", "cudnn"):
                try:
                    ms = bench(sd(name))
                    rows.append(dict(kernel=f"SDPA {name} FP16 cache", B=b, ctx=ctx, us=ms * 1e3,
                                     bytes=fp16_bytes, gbps=fp16_bytes / ms / 1e6))
                except Exception as exc:
                    rows.append(dict(kernel=f"SDPA {name} FP16 cache", B=b, ctx=ctx, us=None, error=repr(exc)[:200]))
                print("decode", rows[-1], flush=True)
            del kv
            torch.cuda.empty_cache()
            for cname, kw in configs.items():
                cfg = TurboConfig(**kw)
                try:
                    first = _decode_layer(cfg, b, hkv, ctx, d)
                    nbytes = first.nbytes() + b * hq * d * 2
                    nl = max(1, math.ceil(2 * l2 / nbytes))
                    layers = [first] + [_decode_layer(cfg, b, hkv, ctx, d) for _ in range(nl - 1)]
                    if b == 1 and ctx == 4096:  # correctness of this exact configuration before timing it
                        lay, q = layers[0], qs[0]
                        ref = turbo_attention_reference(q, lay.attention_segments(), sm_scale=d**-0.5, causal=True,
                                                        exp=cfg.exp, n_r=cfg.n_r, sas_base=cfg.sas_base, pv=cfg.pv)
                        out = attend_layer(q, lay, sm_scale=d**-0.5, causal=True, split=1)
                        assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-3
                        ex = exact_attention(q, *lay.dequantized(), sm_scale=d**-0.5, causal=True)
                        outs = attend_layer(q, lay, sm_scale=d**-0.5, causal=True)
                        err = ((outs.double() - ex).norm() / ex.norm()).item()
                    else:
                        err = None
                    j = [0]

                    def run():
                        j[0] = (j[0] + 1) % len(layers)
                        return attend_layer(qs[j[0] % ncopy], layers[j[0]], sm_scale=d**-0.5, causal=True)

                    ms = bench(run)
                    plan = layers[0].kernel_cache["decode_plan"][1]  # the walk decode_layer chose ("auto")
                    sdpa = [r for r in rows if r["B"] == b and r["ctx"] == ctx and r["kernel"].startswith("SDPA flash")]
                    base = sdpa[0]["us"] if sdpa and sdpa[0]["us"] else None
                    rows.append(dict(kernel=cname, B=b, ctx=ctx, us=ms * 1e3, bytes=nbytes, gbps=nbytes / ms / 1e6,
                                     speedup_vs_sdpa_flash=(base / (ms * 1e3)) if base else None,
                                     rel_l2_vs_dequantized_exact=err, walk="mma" if plan.mma else "triton"))
                    del layers
                except Exception as exc:
                    traceback.print_exc()
                    rows.append(dict(kernel=cname, B=b, ctx=ctx, us=None, error=repr(exc)[:200]))
                print("decode", rows[-1], flush=True)
                torch.cuda.empty_cache()
            del qs
    return rows


def _plot(rows, name, key, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    from hf_turbo.eval.results import RESULTS_DIR

    fig, ax = plt.subplots(figsize=(10, 5))
    kernels = sorted({r["kernel"] for r in rows})
    for kname in kernels:
        rr = [r for r in rows if r["kernel"] == kname and r.get(key) is not None]
        if rr:
            ax.plot(range(len(rr)), [r[key] for r in rr], marker="o", label=kname)
            ticks = [r.get("label") for r in rr]
    ax.set_xticks(range(len(ticks)))
    ax.set_xticklabels(ticks, rotation=45, fontsize=7)
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{name}.png", dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of: ceilings,accuracy,prefill,decode")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    cmd = "python -m hf_turbo.eval.bench_attention " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    if "ceilings" not in skip:
        rows = ceilings()
        for r in rows:
            print("ceiling", r, flush=True)
        write_result("attention_ceilings", rows, title="Ceilings measured in the attention benchmark run",
                     command=cmd)
    if "accuracy" not in skip:
        rows = accuracy_rows()
        for r in rows:
            print("accuracy", r, flush=True)
        write_result("attention_accuracy", rows, title="Prefill accuracy vs exact FP32 attention (B=1, H=8, S=4096)",
                     command=cmd, notes="random normal Q/K/V, keys with a per-channel bias; ours: INT8 QK + SAS/exp2")
    if "decode" not in skip:
        rows = decode_rows(args.quick)
        for r in rows:
            r["label"] = f"B{r['B']} ctx{r['ctx'] // 1024}k"
        write_result("attention_decode", rows, title="Decode, 32 q / 8 kv heads, d=128, one query token",
                     command=cmd,
                     notes=decode_notes())
        _plot(rows, "attention_decode", "us", "Decode latency (us), lower is better")
    if "prefill" not in skip:
        rows = prefill_rows(args.quick)
        for r in rows:
            r["label"] = f"d{r['d']} S{r['S'] // 1024}k {'c' if r['causal'] else 'f'}"
        write_result("attention_prefill", rows, title="Prefill TFLOPS-eq, B*S = 32k tokens, 32 heads",
                     command=cmd, notes="ours includes K/V quantization (stage-1 kernel) and in-kernel Q quantization")
        _plot(rows, "attention_prefill", "tflops", "Prefill TFLOPS-equivalent (higher is better)")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
