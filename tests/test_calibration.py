"""Calibration: statistics, the round trip through save_pretrained / from_pretrained into TurboQuantCache, the
standalone JSON, wrong-model rejection, and the offline-without-text error."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from hf_turbo.calibration import (
    Calibration,
    CalibrationTextError,
    HeadStats,
    apply_calibration,
    calibrate,
    load_calibration,
    resolve_texts,
)
from hf_turbo.calibration import cli as calib_cli

import hf_turbo  # noqa: F401
from hf_turbo import TurboQuantCache
from hf_turbo.quant.priority import head_priority


def _tiny_llama(layers=2, kv_heads=2, heads=4, head_dim=16, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _cache_kw(model):
    from hf_turbo.eval.perplexity import cache_kwarg

    return cache_kwarg(model)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_stats_single_sample_equals_head_priority():
    k, v = torch.randn(1, 3, 40, 16), torch.randn(1, 3, 40, 16)
    k[:, 1, :, 5] *= 20  # an outlier channel in head 1
    stats = HeadStats(1, 3, 16)
    stats.update(0, k, v)
    torch.testing.assert_close(stats.scores("k")[0], head_priority(k))
    torch.testing.assert_close(stats.scores("k", reduce="mean")[0], head_priority(k))
    torch.testing.assert_close(stats.scores("kv")[0], head_priority(k) + head_priority(v))
    assert int(stats.scores("k")[0].argmax()) == 1
    # running max/min: a second sample widens the ranges
    stats.update(0, 3 * k, v)
    torch.testing.assert_close(stats.scores("k")[0], head_priority(torch.cat([k, 3 * k], dim=2)))


def test_round_trip_tiny_model(tmp_path):
    """calibrate -> save_pretrained -> from_pretrained -> TurboQuantCache uses the priorities; JSON round trip."""
    from transformers import AutoModelForCausalLM

    model = _tiny_llama()
    samples = torch.randint(0, 128, (3, 64))
    cal = calibrate(model, samples=samples, int2_heads=1, progress=False)
    assert len(cal.priorities) == 2 and all(len(r) == 2 for r in cal.priorities)
    assert model.config.turbo_config["priorities"] == cal.priorities
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["turbo_config"]
    assert saved["priorities"] == cal.priorities and saved["int2_heads"] == 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="turbo").eval()
    cache = TurboQuantCache(loaded.config)
    with torch.no_grad():
        loaded(input_ids=torch.randint(0, 128, (1, 70)), use_cache=True, **{_cache_kw(loaded): cache})
    assert [layer.head_bits.tolist() for layer in cache.layers] == cal.head_bits()
    # standalone JSON applied to a fresh model of the same shape
    path = cal.save(tmp_path / "cal.json")
    fresh = _tiny_llama()
    apply_calibration(fresh, load_calibration(path))
    assert fresh.config.turbo_config["priorities"] == cal.priorities
    assert TurboQuantCache(fresh.config).turbo.priorities == cal.priorities


def test_calibrated_priorities_override_online_choice():
    """With calibrated priorities the cache ignores the request's own keys (online would pick another head)."""
    model = _tiny_llama(layers=1, kv_heads=2)
    cal = Calibration(priorities=[[0.0, 1.0]], model={"num_hidden_layers": 1, "num_key_value_heads": 2,
                                                       "head_dim": 16}, int2_heads=1)
    apply_calibration(model, cal)
    cache = TurboQuantCache(model.config)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 64, 16)
    k[:, 0, :, 3] *= 50  # online scoring would keep head 0 at 4 bits
    layer.update(k, torch.randn(1, 2, 64, 16))
    assert layer.head_bits.tolist() == [2, 4]
    online = TurboQuantCache(_tiny_llama(layers=1, kv_heads=2).config, int2_heads=1).layers[0]
    online.update(k, torch.randn(1, 2, 64, 16))
    assert online.head_bits.tolist() == [4, 2]


def test_wrong_model_rejected(tmp_path):
    model = _tiny_llama(layers=2)
    cal = calibrate(model, samples=torch.randint(0, 128, (1, 64)), apply=False, progress=False)
    path = cal.save(tmp_path / "cal.json")
    with pytest.raises(ValueError, match="another model"):
        apply_calibration(_tiny_llama(layers=3), path)
    with pytest.raises(ValueError, match="another model"):
        apply_calibration(_tiny_llama(layers=2, kv_heads=4, heads=4), path)
    other = _tiny_llama(layers=3)
    other.config.turbo_config = {"priorities": cal.priorities}  # smuggled in without apply_calibration
    with pytest.raises(ValueError, match="another model"):
        TurboQuantCache(other.config)
    with pytest.raises(ValueError, match="not an hf_turbo calibration"):
        Calibration.from_dict({"priorities": []})


def test_offline_without_text_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs, _ = resolve_texts(None)
    with pytest.raises(CalibrationTextError, match="--text-file"):
        next(iter(docs))
    with pytest.raises(CalibrationTextError, match="no such file"):
        resolve_texts("/nonexistent/calib.txt")
    parser = calib_cli.add_arguments(argparse.ArgumentParser())
    assert calib_cli.run(parser.parse_args([])) == 2
    assert "--text-file" in capsys.readouterr().err


def test_text_file_txt_and_jsonl(tmp_path):
    from hf_turbo.calibration import token_samples

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 100 + 1 for c in text]}

    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(5)))
    for name in ("a.txt", "b.jsonl"):
        docs, _ = resolve_texts(tmp_path / name)
        s = token_samples(Tok(), docs, 3, 32)
        assert s.shape == (3, 32) and s.dtype == torch.long
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="'text' field"):
        list(resolve_texts(tmp_path / "bad.jsonl")[0])


@pytest.mark.slow
def test_smollm2_calibration_round_trip(tmp_path):
    """The real model on real text (Botchan): calibrate -> save_pretrained -> from_pretrained -> the cache's choice."""
    from hf_turbo.eval.data import DataUnavailable, fetch
    from transformers import AutoModelForCausalLM

    from hf_turbo.models import load_model

    try:
        fetch("botchan")
    except DataUnavailable as exc:
        pytest.skip(f"Botchan text cannot be fetched here: {exc}")
    try:
        model, tok = load_model(attn_implementation="sdpa", device="cpu")
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")
    cal = calibrate(model, tok, text_file="botchan", num_samples=2, seq_len=128, int2_fraction=0.34, progress=False)
    assert len(cal.priorities) == 30 and {len(r) for r in cal.priorities} == {3}
    assert cal.meta["tokens"] == 256 and cal.num_low_heads() == 1
    model.save_pretrained(tmp_path / "smol")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", attn_implementation="turbo").eval()
    assert loaded.config.turbo_config["priorities"] == cal.priorities
    cache = TurboQuantCache(loaded.config)
    ids = tok("The cache picks the calibrated heads. " * 12, return_tensors="pt")["input_ids"][:, :80]
    with torch.no_grad():
        loaded(input_ids=ids, use_cache=True, **{_cache_kw(loaded): cache})
    assert [layer.head_bits.tolist() for layer in cache.layers] == cal.head_bits()
