"""SmolLM2-135M-Instruct (the embedded default, GGUF): turbo attention + TurboQuantCache against SDPA on 256 tokens
of real English text -- next-token top-1 agreement and the perplexity delta.

The text is ``tests/data/sample.txt`` (the opening of *Pride and Prejudice*, Jane Austen, 1813; public domain,
Project Gutenberg). The SDPA reference runs the whole sequence at once in the model's dtype. The turbo run goes the
way generation does: a prefill of the first ``n_prefill`` tokens through the cache (attention over INT8 Q/K/V
quantized on the fly), then one token per step (decode), each step attending over the compressed 4-bit blocks + the
buffer (model dtype). Agreement counts positions where both pick the same next token; perplexities are of the text
itself.

    python -m hf_turbo.eval.smollm2_agreement          # writes eval/results/smollm2_agreement.json

``tests/test_real_model.py`` recomputes :func:`measure` for the default configuration and asserts the bounds.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from pathlib import Path
from typing import Any

import torch

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "sample.txt"
N_TOKENS = 256
N_PREFILL = 128

# name -> TurboQuantCache overrides (None: turbo attention without a cache: INT8 Q/K/V on the fly)
DEFAULT = "int4 (defaults: exp2, FP16 P)"
SAS_INT8 = "int4, SAS + INT8 P (the paper's softmax and PV)"
CONFIGS: dict[str, dict[str, Any] | None] = {
    DEFAULT: {},
    SAS_INT8: {"exp": "sas", "pv": "int8"},
    "paper preset (SAS, INT8 P, 25% INT2 heads)": {"exp": "sas", "pv": "int8", "int2_fraction": 0.25},
    "no cache (INT8 Q/K/V, defaults)": None,
}


def sample_ids(tokenizer, n_tokens: int = N_TOKENS, path: Path = SAMPLE) -> torch.Tensor:
    """``[1, n_tokens]`` token ids of the sample text."""
    ids = tokenizer(path.read_text(), return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"{path} has only {ids.shape[1]} tokens; {n_tokens} needed")
    return ids


def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of ``ids[0, 1:]`` under ``logits[0, :-1]``."""
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))


@torch.no_grad()
def turbo_logits(model, ids: torch.Tensor, overrides: dict[str, Any] | None, n_prefill: int = N_PREFILL):
    """Logits ``[1, T, V]`` of the turbo run (see the module docstring) and the cache (None without one)."""
    from hf_turbo import TurboQuantCache

    if overrides is None:
        return model(ids, use_cache=False).logits, None
    cache = TurboQuantCache(model.config, **overrides)
    kw = {_cache_kw(model): cache}
    out = [model(ids[:, :n_prefill], **kw).logits]
    for i in range(n_prefill, ids.shape[1]):
        out.append(model(ids[:, i : i + 1], **kw).logits)
    return torch.cat(out, 1), cache


@torch.no_grad()
def measure(
    model,
    ids: torch.Tensor,
    overrides: dict[str, Any] | None = None,
    n_prefill: int = N_PREFILL,
    reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Agreement and perplexities of turbo (``overrides`` for TurboQuantCache, None = no cache) vs SDPA.

    ``reference``: the SDPA logits if already computed. Leaves the model on its original attention implementation.
    """
    original = model.config._attn_implementation
    try:
        if reference is None:
            model.set_attn_implementation("sdpa")
            reference = model(ids, use_cache=False).logits
        model.set_attn_implementation("turbo")
        t0 = time.perf_counter()
        logits, cache = turbo_logits(model, ids, overrides, n_prefill)
        seconds = time.perf_counter() - t0
    finally:
        model.set_attn_implementation(original)
    same = logits[0, :-1].argmax(-1) == reference[0, :-1].argmax(-1)
    ppl_ref, ppl_turbo = math.exp(_nll(reference, ids)), math.exp(_nll(logits, ids))
    n_pre = n_prefill - 1 if cache is not None else same.numel()  # predictions made by the prefill
    row = {
        "tokens": int(ids.shape[1]),
        "top1_agreement": float(same.float().mean()),
        "agreement_prefill": float(same[:n_pre].float().mean()),
        "agreement_decode": float(same[n_pre:].float().mean()) if n_pre < same.numel() else None,
        "ppl_sdpa": ppl_ref,
        "ppl_turbo": ppl_turbo,
        "ppl_delta_pct": 100.0 * (ppl_turbo / ppl_ref - 1.0),
        "max_abs_logit_diff": float((logits.float() - reference.float()).abs().max()),
        "compression_ratio": cache.compression_ratio() if cache is not None else None,
        "turbo_seconds": seconds,
    }
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    from hf_turbo.eval.results import write_result

    from hf_turbo.models import load_model

    model, tok = load_model(args.model, attn_implementation="sdpa")
    ids = sample_ids(tok)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
    rows = []
    for name in args.configs:
        row = {"setting": name, **measure(model, ids, CONFIGS[name], reference=reference)}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    if args.no_write:
        return
    path = write_result(
        "smollm2_agreement",
        rows,
        title="SmolLM2-135M-Instruct: turbo vs SDPA, next-token agreement and perplexity (256 tokens of real text)",
        columns=[
            "setting",
            "top1_agreement",
            "agreement_prefill",
            "agreement_decode",
            "ppl_sdpa",
            "ppl_turbo",
            "ppl_delta_pct",
            "compression_ratio",
        ],
        notes=(
            f"Text: tests/data/sample.txt (Pride and Prejudice, ch. 1), first {N_TOKENS} tokens. SDPA: one forward "
            f"in the model's dtype. Turbo + TurboQuantCache: prefill of {N_PREFILL} tokens, then one token per step "
            "(decode over the compressed blocks + the full-precision buffer); 'no cache': turbo attention with "
            "use_cache=False "
            "(INT8 Q/K/V on the fly). Agreement: fraction of the 255 next-token predictions where both pick the "
            "same token. Asserted in tests/test_real_model.py (both int4 rows): agreement >= 0.90, decode agreement "
            ">= 0.85, perplexity delta <= 3%."
        ),
        extra={"model": args.model or "SmolLM2-135M-Instruct (GGUF Q4_1, embedded default)", "dtype": str(model.dtype)},
        command="python -m hf_turbo.eval.smollm2_agreement",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
