"""``hf-turbo bench``: ``throughput`` (end-to-end serving, eval/bench_throughput.py) and ``attention`` (kernels vs
SDPA/cuDNN/SageAttention, eval/bench_attention.py). Both need a GPU for meaningful numbers."""

from __future__ import annotations

import argparse
import importlib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    from . import bench_throughput

    bench_throughput.add_arguments(sub.add_parser("throughput", help="max decode throughput at a memory budget"))
    att = sub.add_parser("attention", help="attention kernels vs FP16 peers (arguments go to bench_attention)")
    att.add_argument("rest", nargs=argparse.REMAINDER)


def run(args) -> int:
    if args.bench == "throughput":
        from . import bench_throughput

        return bench_throughput.run(args)
    module = importlib.import_module("hf_turbo.eval.bench_attention")
    return int(module.main(args.rest) or 0)
