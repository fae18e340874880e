"""Tensor-parallel generation with turbo attention + TurboQuantCache, against SDPA + DynamicCache.

Launch one process per GPU (or per CPU rank on gloo)::

    torchrun --nproc-per-node 2 -m hf_turbo.eval.tp_generate --shape llama3-8b --device cuda
    torchrun --nproc-per-node 2 -m hf_turbo.eval.tp_generate --model-dir ./tiny --device cpu --out-dir /tmp/r

transformers' ``tp_plan="auto"`` splits the attention heads over the ranks; each rank's TurboQuantCache holds its own
heads, with the INT2/INT4 assignment made over all heads and sliced (see ``TurboLayer._choose_head_bits``). Rank 0
writes ``tp_generate_<shape>_tp<world>.json`` (tokens/s, per-GPU KV bytes, generated tokens, prefill logits) so that
runs at different world sizes can be compared. ``--shape llama3-8b`` builds a random-weight Llama-3-8B-shaped
checkpoint on local disk first (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=2048,
    ),
}


def make_checkpoint(shape: str, path: Path, dtype: torch.dtype) -> Path:
    """Save a random-weight Llama of ``shape`` to ``path`` (rank 0 only; others wait)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(**SHAPES[shape])
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg).to(dtype)
        model.save_pretrained(path)
    return path


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run(args) -> dict:
    """Generate with both methods on this rank; return rank 0's record (None elsewhere)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    import hf_turbo  # noqa: F401  (registers "turbo")
    from hf_turbo import TurboQuantCache
    from hf_turbo.generate import cache_bytes, cache_kwarg

    rank, world = _rank_world()
    dtype = getattr(torch, args.dtype)
    model_dir = Path(args.model_dir) if args.model_dir else Path(args.work_dir) / f"random-{args.shape}"
    if not args.model_dir:
        if rank == 0:
            make_checkpoint(args.shape, model_dir, dtype)
        if world > 1:
            dist.barrier()
    device = torch.device(args.device, rank % max(torch.cuda.device_count(), 1)) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kw = dict(dtype=dtype)
    if world > 1:
        kw["tp_plan"] = "auto"
    else:
        kw["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="turbo", **kw).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)
    ckw = cache_kwarg()
    record = {"world": world, "shape": args.shape or str(model_dir), "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "methods": {}}
    for method in ("sdpa", "turbo"):
        model.set_attn_implementation("turbo" if method == "turbo" else "sdpa")
        make = (lambda: TurboQuantCache(model.config, int2_fraction=args.int2_fraction, quantize=not args.no_quant,
                                        k_smooth=args.k_smooth)) \
            if method == "turbo" else (lambda: DynamicCache(config=model.config))
        with torch.inference_mode():
            cache = make()
            logits = model(ids, **{ckw: cache}).logits[:, -1].float()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            cache = make()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, **{ckw: cache})
            if device.type == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
        kv = cache_bytes(cache)
        kv_all = [int(kv)]
        if world > 1:
            kv_all = [None] * world
            dist.all_gather_object(kv_all, int(kv))
        record["methods"][method] = {
            "tokens_per_s": args.batch * args.new_tokens / secs,
            "seconds": secs,
            "kv_bytes_per_rank": kv_all,
            "tokens": out[:, args.prompt_len:].tolist(),
            "last_logits": logits[0].tolist() if args.save_logits else None,
        }
    return record if rank == 0 else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape")
    src.add_argument("--model-dir", help="a local Llama/Phi3/Qwen2 checkpoint")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--int2-fraction", type=float, default=0.25)
    ap.add_argument("--no-quant", action="store_true", help="TurboQuantCache(quantize=False): plumbing check")
    ap.add_argument("--k-smooth", action="store_true", help="TurboQuantCache(k_smooth=True)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-logits", action="store_true")
    ap.add_argument("--work-dir", default="/tmp/hf_turbo_tp")
    ap.add_argument("--out-dir", default=None, help="where rank 0 writes its JSON (default eval/results)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    record = run(args)
    if record is not None:
        from hf_turbo.eval.results import write_result

        rows = [
            {"method": m, "world": record["world"], "tokens_per_s": r["tokens_per_s"],
             "max_kv_bytes_per_rank": max(r["kv_bytes_per_rank"]), "kv_bytes_total": sum(r["kv_bytes_per_rank"])}
            for m, r in record["methods"].items()
        ]
        name = f"tp_generate_{args.shape or 'model'}_tp{record['world']}"
        path = write_result(name, rows, title=f"Tensor-parallel generation, {record['shape']}, tp={record['world']}",
                            extra={"detail": record}, out_dir=Path(args.out_dir) if args.out_dir else None)
        print(json.dumps(rows), "->", path)
    if dist.is_initialized():
        # every rank waits for rank 0's write: a rank that tears gloo down while its peer still runs aborts
        # ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
