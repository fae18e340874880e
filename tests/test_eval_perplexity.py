"""Accuracy evaluation: data fetcher, KIVI reference cache, the chunked perplexity protocol, a small real-text run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from hf_turbo.eval import perplexity as P
from hf_turbo.eval.kivi import KIVICache, KIVILayer, fake_quantize

import hf_turbo  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fake_quantize_groups_and_error():
    x = torch.randn(2, 3, 64, 32)
    for bits in (2, 3, 4, 8):
        for dim in (-1, -2):
            y = fake_quantize(x, bits, 32, dim=dim)
            g = x.movedim(dim, -1).reshape(*x.movedim(dim, -1).shape[:-1], -1, 32)
            step = (g.amax(-1) - g.amin(-1)) / (2**bits - 1)
            err = (y - x).abs().movedim(dim, -1).reshape(g.shape).amax(-1)
            assert bool((err <= step * 0.5 + 2e-3 * g.abs().amax(-1)).all()), (bits, dim)
    with pytest.raises(ValueError):
        fake_quantize(x, 4, 48, dim=-1)


def test_kivi_layer_residuals_follow_kivi():
    layer = KIVILayer(nbits=2, group_size=32, residual_length=128)
    k, v = torch.randn(1, 2, 200, 64), torch.randn(1, 2, 200, 64)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)  # prefill attention in full precision
    assert layer.k_q.shape[-2] == 128 and layer.k_res.shape[-2] == 72  # K: full R-chunks quantized
    assert layer.v_q.shape[-2] == 72 and layer.v_res.shape[-2] == 128  # V: all but the last R quantized
    assert torch.equal(layer.k_res, k[:, :, 128:]) and not torch.equal(layer.k_q, k[:, :, :128])
    for _ in range(60):  # decode: K residual reaches 128 and is flushed on the next step
        keys, values = layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    assert layer.k_q.shape[-2] == 256 and layer.k_res.shape[-2] == 4
    assert layer.v_res.shape[-2] == 129 and keys.shape[-2] == 260 == layer.get_seq_length()
    assert layer.get_mask_sizes(1) == (261, 0)
    assert KIVICache(_cfg(), nbits=4, group_size=64).bits_per_element() == 4.5


def _cfg():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)


def test_window_plan():
    assert P.window_starts(3000, 1024, 512) == [0, 512, 1024, 1536]
    assert P.window_starts(3000, 1024, 512, max_windows=2) == [0, 512]
    with pytest.raises(ValueError):
        P.window_starts(100, 1024, 512)
    with pytest.raises(ValueError):
        P.window_starts(3000, 256, 256)
    assert set(P.SUITES["full"]) <= set(P.SETTINGS)


def test_data_sources_and_jsonl(tmp_path, monkeypatch):
    from hf_turbo.eval import data

    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.data_dir() == tmp_path
    (tmp_path / "lee_background.txt").write_text("first article.\nsecond article.\n")
    assert data.fetch("lee", download=False) == tmp_path / "lee_background.txt"
    assert data.load_text("lee", download=False) == "first article.\n\nsecond article."
    with pytest.raises(data.DataUnavailable):
        data.fetch("botchan", download=False)
    with pytest.raises(ValueError):
        data.fetch("wikitext")


@pytest.fixture(scope="module")
def smollm2():
    from hf_turbo.eval.data import DataUnavailable, fetch

    from hf_turbo.models import load_model

    try:
        fetch("lee")
    except DataUnavailable as exc:
        pytest.skip(f"the Lee corpus cannot be fetched here: {exc}")
    try:
        return load_model(attn_implementation="sdpa", device="cpu")
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")


@pytest.mark.slow
def test_small_perplexity_run(smollm2):
    """One 256-token window of Lee: chunking alone changes nothing, and the compressed cache is really read."""
    from hf_turbo.eval.data import load_text

    model, tok = smollm2
    tokens = P.token_stream(tok, load_text("lee"), max_tokens=2000)
    rows = P.evaluate(model, tokens, ["sdpa-chunked", "turbo-prefill", "turbo-4bit", "turbo-mixed1-online",
                                      "kivi-4-g64"], window=256, context=128, max_windows=1, progress=False)
    by = {r["setting"]: r for r in rows}
    assert rows[0]["setting"] == "fp" and by["fp"]["tokens"] == 128
    assert 2 < by["fp"]["ppl"] < 200
    assert by["sdpa-chunked"]["ppl"] == pytest.approx(by["fp"]["ppl"], rel=1e-4)
    assert by["sdpa-chunked"]["top1_agree"] == 1.0
    assert 4.0 < by["turbo-4bit"]["kv_bits"] < 4.5  # measured from the pools: compressed blocks were written
    assert 3.0 < by["turbo-mixed1-online"]["kv_bits"] < by["turbo-4bit"]["kv_bits"]
    assert by["kivi-4-g64"]["kv_bits"] == 4.5
    for name in ("turbo-prefill", "turbo-4bit", "kivi-4-g64"):
        assert by[name]["ppl"] == pytest.approx(by["fp"]["ppl"], rel=0.1), name
        assert by[name]["top1_agree"] > 0.8 and by[name]["kl"] < 0.1, name
    assert by["turbo-mixed1-online"]["int2_heads_per_layer"] == 1


@pytest.mark.slow
def test_chunked_turbo_cache_reads_compressed_blocks(smollm2):
    """The protocol's claim: a scored chunk attends to compressed blocks written by earlier calls."""
    from hf_turbo import TurboQuantCache

    model, _ = smollm2
    ids = torch.randint(100, 5000, (1, 192))
    seen = []
    orig = TurboQuantCache.update

    def spy(self, k, v, layer_idx, *a, **kw):
        out = orig(self, k, v, layer_idx, *a, **kw)
        if layer_idx == 0:
            seen.append((k.shape[-2], self.layers[0].blocks_before))
        return out

    TurboQuantCache.update = spy
    try:
        P.window_logits(model, ids, P.SETTINGS["turbo-4bit"], context=64, chunk=64)
    finally:
        TurboQuantCache.update = orig
    assert seen == [(64, 0), (64, 1), (64, 2)]  # prefill, then each chunk sees 1, 2 compressed blocks


@pytest.mark.slow
def test_eval_cli_writes_result_and_plot(smollm2, tmp_path, monkeypatch):
    from hf_turbo.eval import cli

    monkeypatch.setattr("hf_turbo.models.load_model", lambda *a, **k: smollm2)
    parser = cli.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--settings", "fp,turbo-4bit", "--window", "128", "--context", "64", "--max-windows",
                              "1", "--name", "acc_test", "--out-dir", str(tmp_path), "--plot"])
    assert cli.run(args) == 0
    rec = json.loads((tmp_path / "acc_test.json").read_text())
    assert [r["setting"] for r in rec["rows"]] == ["fp", "turbo-4bit"]
    assert rec["protocol"]["window"] == 128 and "ppl" in rec["columns"]
    assert (tmp_path / "acc_test.png").stat().st_size > 1000


@pytest.mark.parametrize("argv0, main_spec, expect", [
    ("/venv/bin/hf-turbo", None, "hf-turbo eval --suite full"),
    ("/repo/eval/cli.py", "hf_turbo.eval.cli", "python -m hf_turbo.eval.cli eval --suite full"),
    ("/repo/hf_turbo/__main__.py", "hf_turbo.__main__", "python -m hf_turbo eval --suite full"),
])
def test_results_record_the_command_as_typed(monkeypatch, argv0, main_spec, expect):
    """A results file's command is what the user typed (not "hf-turbo eval eval ...")."""
    import sys
    import types

    from hf_turbo.eval.results import invocation

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=main_spec) if main_spec else None
    monkeypatch.setattr(sys, "argv", [argv0, "eval", "--suite", "full"])
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert invocation() == expect


def test_ppl_delta_se_pct():
    from hf_turbo.eval.perplexity import ppl_delta_se_pct

    ref = [3.0, 3.2, 2.9, 3.1]
    assert ppl_delta_se_pct([r + 0.01 for r in ref], ref) == pytest.approx(0.0, abs=1e-9)  # a constant shift
    d = [0.0, 0.02, 0.01, 0.03]
    mean, sd = 0.015, (sum((x - 0.015) ** 2 for x in d) / 3) ** 0.5
    got = ppl_delta_se_pct([r + x for r, x in zip(ref, d)], ref)
    assert got == pytest.approx(100 * 2.718281828459045**mean * sd / 2, rel=1e-9)
    assert ppl_delta_se_pct([3.0], [2.9]) != ppl_delta_se_pct([3.0], [2.9])  # NaN: one window has no spread
    with pytest.raises(ValueError):
        ppl_delta_se_pct([3.0, 3.1], [3.0])
