# ruff: noqa: B023, F821  (closures are timed inside the loop iteration that binds them)
"""Decode-kernel launch variants on the GPU: which software choices make packed-cache decode fast (issue 4).

    python -m hf_turbo.eval.bench_decode_tuning [--quick] [--bits 4,2,mixed] [--only PREFIX,..] [--cases B:CTX,..]
    python -m hf_turbo.eval.bench_decode_tuning --only default:,walk --bits 4,mixed \
        --cases 1:8192,1:16384,1:32768,1:65536,1:131072,16:4096 --name decode_walk_choice   # the walk choice

For each case (batch, context; 32 q / 8 kv heads, hd 128, 4-bit) and each variant of
:func:`hf_turbo.kernels.decode.decode_layer` (software prefetch of the next packed tile, V scale folded after the PV
product, integer or FP16 rebuild of the packed codes, warps, pipeline stages, how the context is split and the
cap, and which walk covers the compressed blocks: the Triton kernel or :mod:`hf_turbo.kernels.decode_mma`'s
MMA walk, against ``walk="auto"``'s choice, recorded as ``walk_taken``) it checks the output against the PyTorch
reference (:func:`hf_turbo.quant.attention.turbo_attention_reference`)
and times ``attend_layer`` two ways:

* ``graph_us``: replay of a CUDA graph holding the calls (GPU time only: what the kernels cost);
* ``eager_us``: plain calls (GPU time or Python launch time, whichever is longer: what generation pays today).

Several cache copies are attended per timed call and the time divided by their number, so small caches are read
from HBM, not L2. Writes ``eval/results/decode_tuning.json``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import triton
from hf_turbo.eval.results import write_result

BASE = dict(prefetch=True, fold_v=True, rebuild="words", num_warps=None, num_stages=1, split_mult=None)  # the default
VARIANTS = {
    "older (no prefetch, V scaled to fp16, int rebuild, w4, s2, 2/SM)": dict(
        prefetch=False, fold_v=False, rebuild="int", num_warps=4, num_stages=2, split_mult=2),
    "int rebuild, w4, s2, 4/SM (the default before this session)": dict(rebuild="int", num_warps=4, num_stages=2,
                                                                       split_mult=4),
    "int rebuild, w4, s2, wave splits": dict(rebuild="int", num_warps=4, num_stages=2),
    "fp16 rebuild from bytes, w4, s2, wave splits": dict(rebuild="fp16", num_warps=4, num_stages=2),
    "fp16 rebuild from words (PTX), w4, s2, wave splits": dict(num_warps=4, num_stages=2),
    "default: words, wave splits, w2 from 64 (sequence, KV head) pairs, s1": {},
    "default, w1": dict(num_warps=1),
    "default, w2": dict(num_warps=2),
    "default, w8": dict(num_warps=8),
    "default, 4/SM": dict(split_mult=4),
    "default, no prefetch": dict(prefetch=False),
    "default, s2": dict(num_stages=2),
    "default, at most 64 splits": dict(max_split=64),
    "walk: the Triton kernel": dict(walk="triton"),
    "walk: the MMA walk": dict(walk="mma"),
    "walk: the Triton kernel, 48 splits": dict(walk="triton", split=48),
    "walk: the Triton kernel, 64 splits": dict(walk="triton", split=64),
}
CASES = [(1, 4096), (1, 32768), (16, 4096), (16, 32768), (64, 32768)]


def _layer(cfg, b, hkv, ctx, d):
    from hf_turbo.cache import TurboLayer

    layer = TurboLayer(cfg)
    for t0 in range(0, ctx, 8192):
        n = min(8192, ctx - t0)
        layer.update(torch.randn(b, hkv, n, d, device="cuda").half(), torch.randn(b, hkv, n, d, device="cuda").half())
    # one more token: a step's FP16 tail, as in generation
    layer.update(torch.randn(b, hkv, 1, d, device="cuda").half(), torch.randn(b, hkv, 1, d, device="cuda").half())
    return layer


def main(argv=None):
    from hf_turbo.kernels import attend_layer

    from hf_turbo.config import TurboConfig
    from hf_turbo.quant.attention import turbo_attention_reference

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two cases, four variants")
    ap.add_argument("--bits", default="4", help="comma list of cache bit-widths: 4, 2, mixed")
    ap.add_argument("--only", default=None, help="comma list: keep the variants whose name starts with one of these")
    default_cases = ",".join(f"{b}:{c}" for b, c in CASES)
    ap.add_argument("--cases", default=None, help=f"comma list of BATCH:CONTEXT (default: {default_cases})")
    ap.add_argument("--name", default="decode_tuning", help="results file name (eval/results/NAME.json)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    hq, hkv, d = 32, 8, 128
    variants = dict(list(VARIANTS.items())[:4]) if args.quick else VARIANTS
    if args.only:
        variants = {k: v for k, v in variants.items() if k.startswith(tuple(args.only.split(",")))}
    cases = CASES[1:4:2] if args.quick else CASES
    if args.cases:
        cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]
    bit_cfgs = {"4": dict(int2_fraction=0.0), "2": dict(int2_fraction=1.0), "mixed": dict(int2_fraction=0.5)}
    rows = []
    for bits in args.bits.split(","):
        cfg = TurboConfig(**bit_cfgs[bits])
        # correctness of every variant on one ragged-free small case with several splits (graph-free, eager)
        small = _layer(cfg, 2, hkv, 4096 + 37, d)
        q = torch.randn(2, hq, 1, d, device="cuda").half()
        ref = turbo_attention_reference(q, small.attention_segments(), sm_scale=d**-0.5, causal=True, exp=cfg.exp,
                                        n_r=cfg.n_r, sas_base=cfg.sas_base, pv=cfg.pv, block_m=cfg.block_m,
                                        block_n=cfg.block_n)
        errs = {}
        for name, kw in variants.items():
            out = attend_layer(q, small, sm_scale=d**-0.5, causal=True, **{**BASE, **kw})
            errs[name] = ((out.float() - ref).norm() / ref.norm()).item()
        del small
        for b, ctx in cases:
            per = b * hkv * ctx * d  # elements of K (or V)
            n_copies = max(1, math.ceil(2 * 64 * 2**20 / (per // 2)))  # rotate >= 2x L2 of packed 4-bit bytes
            layers = [_layer(cfg, b, hkv, ctx, d) for _ in range(n_copies)]
            qs = [torch.randn(b, hq, 1, d, device="cuda").half() for _ in range(n_copies)]
            nbytes = layers[0].nbytes() + b * hq * d * 2
            for name, kw in variants.items():
                opts = {**BASE, **kw}

                def calls():
                    for lay, qq in zip(layers, qs):
                        attend_layer(qq, lay, sm_scale=d**-0.5, causal=True, **opts)

                row = dict(bits=bits, B=b, ctx=ctx, variant=name, **opts, rel_l2_vs_reference=errs[name])
                try:
                    calls()
                    torch.cuda.synchronize()
                    row["walk_taken"] = "mma" if layers[0].kernel_cache["decode_plan"][1].mma else "triton"
                    eager = triton.testing.do_bench(calls, warmup=10, rep=60, return_mode="median") / n_copies
                    graph = triton.testing.do_bench_cudagraph(calls, rep=60, return_mode="median") / n_copies
                    row.update(eager_us=eager * 1e3, graph_us=graph * 1e3, bytes=nbytes,
                               graph_gbps=nbytes / graph / 1e6, copies=n_copies)
                except Exception as exc:  # a variant that fails to compile or launch is recorded, not hidden
                    row.update(eager_us=None, graph_us=None, error=repr(exc)[:300])
                rows.append(row)
                print(row, flush=True)
            del layers, qs
            torch.cuda.empty_cache()
    path = write_result(
        args.name, rows, title="Decode kernel launch variants (32 q / 8 kv heads, hd 128)",
        columns=["bits", "B", "ctx", "variant", "graph_us", "eager_us", "graph_gbps", "rel_l2_vs_reference"],
        notes="graph_us: CUDA-graph replay (GPU time); eager_us: plain calls (includes Python launch cost when it "
              "exceeds GPU time). rel_l2_vs_reference: B=2, ctx=4133, against the PyTorch reference.",
        out_dir=Path(args.out_dir) if args.out_dir else None,
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
