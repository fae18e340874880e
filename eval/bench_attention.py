# ruff: noqa: B023, F821  (closures are timed inside the loop iteration that binds them)
"""Attention benchmarks on the GPU (issue 4): prefill TFLOPS-equivalent and decode latency / bandwidth of the
TurboAttention kernels against SDPA flash, SDPA cuDNN and SageAttention 1.0.6 (Triton), with the machine's ceilings
measured in the same run, and the accuracy of each configuration against exact FP32 attention.

    python -m hf_turbo.eval.bench_attention [--quick] [--skip ceilings,accuracy,prefill,decode]
    python -m hf_turbo.eval.bench_attention --derive   # no GPU: the ratio / % columns of the records on disk

Writes eval/results/attention_{ceilings,prefill,decode,accuracy}.json (+ attention_prefill.png, attention_decode.png).
Every timed row also gets its speedup over SDPA flash (and cuDNN) at the same shape and its % of the hardware limit
from the ceilings (:func:`derive`): decode bytes read / time against the device-to-device copy, prefill TFLOPS-eq
against the matmul rates of the products the kernel runs (half the operations in Q.K^T, half in P.V).
Timings: ``triton.testing.do_bench(return_mode="median")`` (CUDA events), after the kernels were checked against the
reference (tests/gpu). Our prefill time **includes** quantizing K (stage-1 kernel, after K smoothing's mean where
the configuration smooths) and V where it is read as INT8, and Q (inside the kernel).
TFLOPS-eq = 4 B H S^2 d (/2 causal) / time. Decode bytes = bytes the kernel must read (codes, scales, zero points,
FP16 tail, Q) vs the FP16 K/V cache for SDPA. Inputs larger than L2 (prefill tensors are >= 268 MB; small decode
caches are rotated among copies so that every timed call reads from HBM).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
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
    "turbo exp2, FP8 PV": dict(exp="exp2", pv="fp8"),  # P and the INT8 values to e4m3, one FP8 product
}
# launch variants of the fastest configuration (tile / warps), timed like the others
LAUNCH_VARIANTS = {
    "turbo exp2, FP16 PV, 128x64 w4": (dict(exp="exp2", pv="fp16"), dict(num_warps=4)),
    "turbo exp2, FP16 PV, 64x64 w4": (dict(exp="exp2", pv="fp16"), dict(block_m_override=64, num_warps=4)),
}


SDPA_FLASH, SDPA_CUDNN, SAGE = "SDPA flash (FA2)", "SDPA cuDNN", "SageAttention1 Triton"
# the operand types of each prefill kernel's two products (Q.K^T, P.V): its limit is their two matmul rates
PREFILL_MATMULS = {**{name: ("int8", TurboConfig(**kw).pv) for name, kw in PREFILL_VARIANTS.items()},
                   **{name: ("int8", TurboConfig(**kw).pv) for name, (kw, _) in LAUNCH_VARIANTS.items()},
                   SDPA_FLASH: ("fp16", "fp16"), SDPA_CUDNN: ("fp16", "fp16"), SAGE: ("int8", "fp16")}
# ceilings() rows by the start of their "what": the copy (GB/s) and the matmul rates (TFLOPS / TOPS)
CEILING_KEYS = {"copy": "device-to-device copy", "fp16": "fp16 matmul", "int8": "int8 matmul", "fp8": "fp8 matmul"}


def _ceiling_values(ceiling_rows) -> dict:
    return {key: r["value"] for key, what in CEILING_KEYS.items() for r in ceiling_rows
            if r["what"].startswith(what) and r.get("value")}


def derive(kind: str, rows: list[dict], ceiling_rows: list[dict]) -> list[dict]:
    """Add to each timed row of a ``kind`` ("decode" or "prefill") table its speedup over SDPA flash (and, prefill,
    over cuDNN) timed in the same run at the same shape, and its % of the hardware limit from ``ceiling_rows``
    (:func:`ceilings`): decode ``pct_of_copy`` = bytes read per second / the copy's bytes moved per second; prefill
    ``pct_of_peak`` = TFLOPS-eq / ``1 / (0.5 / rate(Q.K^T) + 0.5 / rate(P.V))`` with the rates of the kernel's
    operand types (:data:`PREFILL_MATMULS`). Rows without a time, or ceilings not measured, get None."""
    lim = _ceiling_values(ceiling_rows)
    shape = ("B", "ctx") if kind == "decode" else ("d", "S", "causal")
    base = {name: {tuple(r[k] for k in shape): r for r in rows if r["kernel"].startswith(name)}
            for name in (("SDPA flash", "SDPA cudnn") if kind == "decode" else (SDPA_FLASH, SDPA_CUDNN))}

    def ratio(r, name, key, faster):  # time-like keys: base / ours; rate-like: ours / base
        b = base[name].get(tuple(r[k] for k in shape))
        if not (b and b.get(key) and r.get(key)):
            return None
        return b[key] / r[key] if faster == "lower" else r[key] / b[key]

    for r in rows:
        if kind == "decode":
            r["speedup_vs_sdpa_flash"] = ratio(r, "SDPA flash", "us", "lower")
            r["pct_of_copy"] = 100 * r["gbps"] / lim["copy"] if r.get("gbps") and lim.get("copy") else None
        else:
            r["speedup_vs_sdpa_flash"] = ratio(r, SDPA_FLASH, "tflops", "higher")
            r["speedup_vs_cudnn"] = ratio(r, SDPA_CUDNN, "tflops", "higher")
            qk, pv = PREFILL_MATMULS.get(r["kernel"], (None, None))
            peak = 1 / (0.5 / lim[qk] + 0.5 / lim[pv]) if lim.get(qk) and lim.get(pv) else None
            r["pct_of_peak"] = 100 * r["tflops"] / peak if peak and r.get("tflops") else None
    return rows


DECODE_COLUMNS = ["kernel", "B", "ctx", "us", "bytes", "gbps", "pct_of_copy", "speedup_vs_sdpa_flash", "walk"]
PREFILL_COLUMNS = ["kernel", "d", "S", "B", "H", "causal", "ms", "tflops", "pct_of_peak", "speedup_vs_sdpa_flash",
                   "speedup_vs_cudnn"]


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
            f"{AUTO_LONG_TILES} pair-tiles in one bit-width pool): "
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
                cands[SDPA_FLASH] = _sdpa(q, k, v, causal, "flash")
                cands[SDPA_CUDNN] = _sdpa(q, k, v, causal, "cudnn")
                if sage is not None:
                    cands[SAGE] = lambda: sage(q, k, v, tensor_layout="HND", is_causal=causal)
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
                cands[SAGE] = lambda: sage(q, k, v, tensor_layout="HND", is_causal=causal)
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
                    rows.append(dict(kernel=cname, B=b, ctx=ctx, us=ms * 1e3, bytes=nbytes, gbps=nbytes / ms / 1e6,
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


PREFILL_NOTES = "ours includes K/V quantization (stage-1 kernel) and in-kernel Q quantization"
LIMITS_MARK = " Ratios and % of limit:"


def limits_note(ceilings_from: str) -> str:
    """The sentence under a table that says where its ratio and % columns come from (:func:`derive`)."""
    return (f"{LIMITS_MARK} speedups against SDPA timed in the same run at the same shape; the limits from the "
            f"ceilings of {ceilings_from} (pct_of_copy: bytes read per second over the device-to-device copy's bytes "
            "moved per second, which a kernel that only reads can pass; pct_of_peak: TFLOPS-eq over the rate of the "
            "kernel's two products, half the operations each, at the measured INT8 / FP16 / FP8 matmul rates).")


def _ceilings_on_disk(device: str | None = None) -> tuple[list[dict], str]:
    """The rows of ``attention_ceilings.json`` and where they come from (no rows when none is recorded, or when it
    was measured on another device than ``device``)."""
    from hf_turbo.eval.results import RESULTS_DIR

    path = RESULTS_DIR / "attention_ceilings.json"
    rec = json.loads(path.read_text()) if path.exists() else None
    if rec is None or (device is not None and rec["device"] != device):
        return [], "no recorded run on this device (none measured)"
    return rec["rows"], f"attention_ceilings.json ({rec['device']}, {rec['date']})"


def derive_records(kinds=("decode", "prefill")) -> list:
    """Recompute :func:`derive`'s columns of the ``attention_<kind>.json`` records on disk from their own rows and
    ``attention_ceilings.json`` when it was measured on the record's GPU (else the % columns become None), without a
    GPU (the measured figures, device, date and command stay as recorded; a ``derived`` entry says when and from
    what). Returns the paths rewritten."""
    from hf_turbo.eval.results import RESULTS_DIR

    done = []
    for kind in kinds:
        path = RESULTS_DIR / f"attention_{kind}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        ceil, ceil_from = _ceilings_on_disk(rec["device"])
        rec["rows"] = derive(kind, rec["rows"], ceil)
        rec["columns"] = DECODE_COLUMNS if kind == "decode" else PREFILL_COLUMNS
        rec["notes"] = rec.get("notes", "").split(LIMITS_MARK)[0].rstrip() + limits_note(ceil_from)
        rec["derived"] = dict(command="python -m hf_turbo.eval.bench_attention --derive", ceilings=ceil_from,
                              date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        path.write_text(json.dumps(rec, indent=1, default=float) + "\n")
        done.append(path)
    return done


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of: ceilings,accuracy,prefill,decode")
    ap.add_argument("--derive", action="store_true",
                    help="no GPU: recompute the ratio and %% of limit columns of the decode / prefill records on disk")
    args = ap.parse_args(argv)
    if args.derive:
        for path in derive_records():
            print("derived", path)
        return
    skip = set(filter(None, args.skip.split(",")))
    cmd = "python -m hf_turbo.eval.bench_attention " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    if "ceilings" not in skip:
        ceil, ceil_from = ceilings(), "this run"
        for r in ceil:
            print("ceiling", r, flush=True)
        write_result("attention_ceilings", ceil, title="Ceilings measured in the attention benchmark run",
                     command=cmd)
    else:  # the recorded ceilings of this GPU, else measured now (not recorded: --skip ceilings)
        ceil, ceil_from = _ceilings_on_disk(torch.cuda.get_device_name(0))
        if not ceil:
            ceil, ceil_from = ceilings(), "this run"
    if "accuracy" not in skip:
        rows = accuracy_rows()
        for r in rows:
            print("accuracy", r, flush=True)
        write_result("attention_accuracy", rows, title="Prefill accuracy vs exact FP32 attention (B=1, H=8, S=4096)",
                     command=cmd, notes="random normal Q/K/V, keys with a per-channel bias; ours: INT8 QK + SAS/exp2")
    if "decode" not in skip:
        rows = derive("decode", decode_rows(args.quick), ceil)
        for r in rows:
            r["label"] = f"B{r['B']} ctx{r['ctx'] // 1024}k"
        write_result("attention_decode", rows, title="Decode, 32 q / 8 kv heads, d=128, one query token",
                     command=cmd, columns=DECODE_COLUMNS, notes=decode_notes() + limits_note(ceil_from))
        _plot(rows, "attention_decode", "us", "Decode latency (us), lower is better")
    if "prefill" not in skip:
        rows = derive("prefill", prefill_rows(args.quick), ceil)
        for r in rows:
            r["label"] = f"d{r['d']} S{r['S'] // 1024}k {'c' if r['causal'] else 'f'}"
        write_result("attention_prefill", rows, title="Prefill TFLOPS-eq, B*S = 32k tokens, 32 heads",
                     command=cmd, columns=PREFILL_COLUMNS, notes=PREFILL_NOTES + limits_note(ceil_from))
        _plot(rows, "attention_prefill", "tflops", "Prefill TFLOPS-equivalent (higher is better)")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
