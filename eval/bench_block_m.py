"""Q-scale granularity (TurboConfig.block_m) in the prefill kernel: accuracy vs the reference on queries with an
outlier row, and speed at hd128, S=16k, B=2, H=32, causal (quantization included). GPU only.

    python -m hf_turbo.eval.bench_block_m [--out-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None) -> int:
    import triton
    from hf_turbo.eval.results import write_result
    from hf_turbo.kernels import prefill

    from hf_turbo.config import TurboConfig
    from hf_turbo.quant.attention import exact_attention, int8_segments, turbo_attention_reference

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    rows = []
    for bm in (64, 32, 16):
        t = TurboConfig(block_m=bm)
        q = torch.randn(1, 4, 1000, 128, device="cuda").half()
        k, v = torch.randn(1, 2, 1000, 128, device="cuda").half(), torch.randn(1, 2, 1000, 128, device="cuda").half()
        q[:, :, 7] *= 30  # one outlier query row, as chat-template tokens produce
        out = prefill(q, k, v, t, sm_scale=128**-0.5, causal=True, pad=None, sliding_window=None).float().cpu()
        ref = turbo_attention_reference(q.cpu(), int8_segments(k.cpu(), v.cpu()), sm_scale=128**-0.5, exp=t.exp,
                                        pv=t.pv, block_m=bm, block_n=64)
        exact = exact_attention(q.cpu(), k.cpu(), v.cpu(), sm_scale=128**-0.5)
        b, h, s, d = 2, 32, 16384, 128
        qq, kk, vv = (torch.randn(b, h, s, d, device="cuda").half() for _ in range(3))
        ms = triton.testing.do_bench(
            lambda qq=qq, kk=kk, vv=vv, t=t, d=d: prefill(qq, kk, vv, t, sm_scale=d**-0.5, causal=True, pad=None,
                                                          sliding_window=None),
            warmup=50, rep=300, return_mode="median")
        rows.append({
            "block_m": bm,
            "kernel_vs_reference_rel_l2": float((out - ref).norm() / ref.norm()),
            "kernel_vs_exact_rel_l2": float((out.double() - exact).norm() / exact.norm()),
            "ms_16k_causal": ms,
            "tflops_eq": 4 * b * h * s * s * d / 2 / (ms * 1e-3) / 1e12,
        })
        print(rows[-1])
    write_result("prefill_block_m", rows, title="Prefill kernel: Q scale per block_m rows (hd128, 16k, causal)",
                 notes="Accuracy on S=1000 with one outlier query row; speed at B=2, H=32, S=16384, quantization included.",
                 out_dir=Path(args.out_dir) if args.out_dir else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
