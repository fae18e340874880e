"""The real model: SmolLM2-135M-Instruct (embedded default GGUF) on 256 tokens of real English text, turbo attention +
TurboQuantCache vs SDPA. The measurement is :func:`hf_turbo.eval.smollm2_agreement.measure` (the script that writes
``eval/results/smollm2_agreement.json``); this test recomputes it and asserts the bounds. It never writes results.

Bounds (measured first, CPU float32; transformers 5.17 and 5.24 give identical figures):

=====================================  ===========  ============  ============================================
setting                                measured     asserted      why this margin
=====================================  ===========  ============  ============================================
int4 defaults (exp2, FP16 P): top-1    0.957        >= 0.90       ~8-14 more of the 255 predictions may flip:
  decode positions only                0.930        >= 0.85       a 135M model has many near-ties that flip
  perplexity delta                     +0.37%       <= 3%         under ~1% logit noise; the ppl bound is 8x
int4, SAS + INT8 P: top-1              0.933        >= 0.90
  decode positions only                0.914        >= 0.85
  perplexity delta                     +0.27%       <= 3%
no cache (INT8 Q/K/V): top-1           0.969        >= 0.93       INT8 only (no 4-bit blocks): tighter
  perplexity delta                     +0.63%       <= 2%
=====================================  ===========  ============  ============================================

For scale (eval/results/smollm2_agreement.json): with 25% of the KV heads at INT2 the paper preset (SAS, INT8 P)
measures 0.902 / decode 0.852 / +1.7%, and the defaults + 25% INT2 measured 0.914 / +3.7%: the bounds are set for
all-INT4 and sit at the edge of what 2-bit heads give, so they are not loose enough to hide a real regression (a
broken block, mask or position costs far more).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Decode steps are batch-1, one-token ops: intra-op threads only add synchronization (and on a busy 2-core
    machine spin-waiting made the decode loop ~8x slower). The figures do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    """One model for the module: loaded with SDPA, float32 on the CPU; measure() switches attention as needed."""
    pytest.importorskip("gguf", reason="the gguf package is needed to read the embedded SmolLM2 GGUF")
    from hf_turbo.models import find_default_gguf, load_model

    try:
        find_default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 GGUF not found: {exc}")
    model, tok = load_model(None, attn_implementation="sdpa", device="cpu")
    return model, tok


@pytest.fixture(scope="module")
def sample(smollm2):
    from hf_turbo.eval.smollm2_agreement import sample_ids

    model, tok = smollm2
    ids = sample_ids(tok)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
    return ids, reference


def test_model_is_the_embedded_default(smollm2, sample):
    model, _ = smollm2
    ids, reference = sample
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    assert ids.shape == (1, 256)
    # the SDPA reference is a sensible language model on English prose (not a broken load)
    ppl = torch.exp(torch.nn.functional.cross_entropy(reference[0, :-1], ids[0, 1:]))
    assert 5 < float(ppl) < 60


@pytest.mark.parametrize("setting", ["defaults", "sas-int8"])
def test_turbo_cache_agreement_and_perplexity(smollm2, sample, setting):
    from hf_turbo.eval.smollm2_agreement import CONFIGS, DEFAULT, SAS_INT8, measure

    model, _ = smollm2
    ids, reference = sample
    r = measure(model, ids, CONFIGS[DEFAULT if setting == "defaults" else SAS_INT8], reference=reference)
    msg = f"measured {r}"
    assert r["top1_agreement"] >= 0.90, msg
    assert r["agreement_decode"] >= 0.85, msg
    assert abs(r["ppl_delta_pct"]) <= 3.0, msg
    assert r["compression_ratio"] > 3.5, msg  # 4 full blocks, all INT4, buffer empty at 256 tokens
    assert model.config._attn_implementation == "sdpa"  # measure() restores the model


def test_turbo_no_cache_agreement_and_perplexity(smollm2, sample):
    from hf_turbo.eval.smollm2_agreement import measure

    model, _ = smollm2
    ids, reference = sample
    r = measure(model, ids, None, reference=reference)
    msg = f"measured {r}"
    assert r["top1_agreement"] >= 0.93, msg
    assert abs(r["ppl_delta_pct"]) <= 2.0, msg


README_PROMPT = "What is the capital of France? Answer in one sentence."


def test_cli_generate_compare_readme_prompt(capsys):
    """The README's main command (``hf-turbo generate PROMPT --compare``) on the embedded model: turbo answers like
    SDPA, and the report's byte counts add up (the 49 tokens are all in the FP buffer: no block is full yet)."""
    import json

    from hf_turbo.cli import main

    assert main(["generate", README_PROMPT, "--compare", "--max-new-tokens", "8", "--device", "cpu", "--json"]) == 0
    turbo, sdpa = json.loads(capsys.readouterr().out)
    assert (turbo["method"], sdpa["method"]) == ("turbo", "sdpa")
    assert "Paris" in turbo["answer"] and turbo["new_token_ids"] == sdpa["new_token_ids"]
    tokens = turbo["prompt_tokens"] + turbo["new_tokens"] - 1  # the last token is sampled, never cached
    assert tokens < 64 and turbo["compressed_tokens"] == 0 and sdpa["compressed_tokens"] is None
    assert turbo["fp16_kv_bytes"] == sdpa["fp16_kv_bytes"] > 0 and turbo["kv_bytes"] > 0
    assert turbo["prefill_s"] > 0 and turbo["tokens_per_s"] > 0


def test_format_reports_table_rows():
    from hf_turbo.generate import GenerationReport, format_reports

    def report(method, ids, compressed):
        return GenerationReport(method=method, answer="", prompt_tokens=100, new_tokens=len(ids), prefill_s=0.1,
                                decode_s=float("nan"), tokens_per_s=float("nan"), kv_bytes=10, fp16_kv_bytes=40,
                                compression_ratio=4.0, new_token_ids=ids, compressed_tokens=compressed)

    table = format_reports([report("turbo", [1, 2, 3, 4], 64), report("sdpa", [1, 2, 9, 9], None)])
    lines = {line.split("  ")[0].strip(): line for line in table.splitlines()}
    assert "64 of 103" in lines["tokens in compressed blocks"]
    assert "no (50% pos.)" in lines["same tokens as sdpa"] and "nan" in lines["decode tokens/s"]
    assert "same tokens as" in format_reports([report("turbo", [1], 0), report("sdpa", [1], None)])
    assert "same tokens as" not in format_reports([report("turbo", [1], 0)])
