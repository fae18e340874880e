"""The main job: generate with turbo attention + TurboQuantCache and report speed and KV memory.

Used by ``hf-turbo generate``; also a Python API::

    from hf_turbo.generate import run_generation
    report = run_generation(model, tokenizer, "Why is the sky blue?", method="turbo", max_new_tokens=64)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .cache import TurboQuantCache, head_dim, kv_heads, text_config

METHODS = ("turbo", "sdpa")


@dataclass
class GenerationReport:
    """What one generation did: the answer, token counts, wall times, and KV-cache bytes."""

    method: str
    answer: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    kv_bytes: int
    fp16_kv_bytes: int
    compression_ratio: float
    new_token_ids: list[int]
    compressed_tokens: int | None = None  # tokens in compressed blocks (turbo); the rest sit in the FP buffer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_kwarg() -> str:
    """The generate()/forward keyword for a user cache: ``cache`` from transformers 5.24 on (``past_key_values`` is
    deprecated there), ``past_key_values`` before."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """``[1, T]`` input ids; the chat template is applied when the tokenizer has one and ``chat`` is set."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def fp16_kv_bytes(model, tokens: int, batch: int = 1) -> int:
    """Bytes an FP16 KV cache holds for ``batch`` sequences of ``tokens`` tokens of ``model``."""
    cfg = text_config(model.config)
    return 2 * cfg.num_hidden_layers * batch * kv_heads(cfg) * tokens * head_dim(cfg) * 2


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, looking inside wrapper subclasses (quanto's packed/scaled tensors)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.nbytes


def cache_bytes(cache) -> int:
    """Bytes a cache object holds (ours: codes, scales, zeros, buffer; others: every tensor in its layers)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(tensor_bytes(v) for layer in cache.layers for v in vars(layer).values() if isinstance(v, torch.Tensor))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_generation(
    model,
    tokenizer,
    prompt: str,
    *,
    method: str = "turbo",
    max_new_tokens: int = 64,
    chat: bool = True,
    **turbo_overrides: Any,
) -> GenerationReport:
    """Greedy generation with ``method`` "turbo" (turbo attention + a fresh TurboQuantCache) or "sdpa" (SDPA +
    DynamicCache, the baseline). The model's attention implementation is switched in place for the call and
    restored afterwards. After an untimed warm-up, prefill is timed as a 1-token generation and decode time is the
    rest of a full generation (tokens/s is NaN when that difference is not positive: too few tokens to time)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, chat).to(device)
    previous = model.config._attn_implementation
    model.set_attn_implementation("turbo" if method == "turbo" else "sdpa")
    try:

        def make_cache():
            return TurboQuantCache(model.config, **turbo_overrides) if method == "turbo" else DynamicCache(config=model.config)

        gen_kw = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones_like(ids))
        ckw = cache_kwarg()
        model.generate(ids, max_new_tokens=1, **{ckw: make_cache()}, **gen_kw)  # warm-up: one-time costs untimed
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **{ckw: make_cache()}, **gen_kw)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        cache = make_cache()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=1, **{ckw: cache}, **gen_kw)
        _sync(device)
        total_s = time.perf_counter() - t0
    finally:
        model.set_attn_implementation(previous)
    new = out[0, ids.shape[1] :]
    n_new = int(new.numel())
    decode_s = total_s - prefill_s
    kv_bytes, fp16_bytes = cache_bytes(cache), fp16_kv_bytes(model, cache.get_seq_length())
    return GenerationReport(
        method=method,
        answer=tokenizer.decode(new, skip_special_tokens=True).strip(),
        prompt_tokens=int(ids.shape[1]),
        new_tokens=n_new,
        prefill_s=prefill_s,
        decode_s=decode_s,
        tokens_per_s=(n_new - 1) / decode_s if n_new > 1 and decode_s > 0 else float("nan"),
        kv_bytes=int(kv_bytes),
        fp16_kv_bytes=int(fp16_bytes),
        compression_ratio=fp16_bytes / kv_bytes if kv_bytes else float("nan"),
        new_token_ids=new.tolist(),
        compressed_tokens=cache.memory_report()["compressed_tokens"] if method == "turbo" else None,
    )


def format_reports(reports: list[GenerationReport]) -> str:
    """A short side-by-side table of the reports (with two, whether the second's greedy tokens equal the first's)."""
    rows = [
        ("method", [r.method for r in reports]),
        ("prompt / new tokens", [f"{r.prompt_tokens} / {r.new_tokens}" for r in reports]),
        ("prefill (s)", [f"{r.prefill_s:.3f}" for r in reports]),
        ("decode tokens/s", [f"{r.tokens_per_s:.1f}" for r in reports]),
        ("KV bytes", [f"{r.kv_bytes:,}" for r in reports]),
        ("FP16 KV bytes, same tokens", [f"{r.fp16_kv_bytes:,}" for r in reports]),
        ("compression vs FP16", [f"{r.compression_ratio:.2f}x" for r in reports]),
        ("tokens in compressed blocks", ["-" if r.compressed_tokens is None else
                                         f"{r.compressed_tokens} of {r.prompt_tokens + r.new_tokens - 1}"
                                         for r in reports]),
    ]
    if len(reports) == 2:  # turbo vs the baseline: do the greedy tokens agree?
        a, b = reports[0].new_token_ids, reports[1].new_token_ids
        agree = sum(x == y for x, y in zip(a, b)) / max(min(len(a), len(b)), 1)
        rows.append((f"same tokens as {reports[1].method}", ["yes" if a == b else f"no ({agree:.0%} pos.)"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  " + "  ".join(f"{v:>14}" for v in vals) for k, vals in rows)
