"""INT2 heads chosen per layer or over the whole model (TurboConfig.int2_scope): validation, the exact model-wide
count, the per-layer counts following the priorities, the error without calibrated priorities, the tensor-parallel
slice, and the scope kept through calibration (save_pretrained / JSON / CLI)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from hf_turbo.calibration import Calibration, apply_calibration, calibrate, load_calibration
from hf_turbo.calibration import cli as calib_cli
from test_calibration import _tiny_llama  # one tiny-Llama builder for the calibration tests

import hf_turbo  # noqa: F401
from hf_turbo import TurboConfig, TurboQuantCache
from hf_turbo.cache import TurboLayer

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(layers=30, kv_heads=3, heads=9):
    cfg = SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=kv_heads, num_attention_heads=heads)
    cfg._attn_implementation = "sdpa"
    return cfg


def _fill(cache, layers, h, t=8, d=16):
    for i in range(layers):
        cache.update(torch.randn(1, h, t, d), torch.randn(1, h, t, d), i)


def test_config_validation():
    with pytest.raises(ValueError, match="int2_scope"):
        TurboConfig(int2_scope="global")
    with pytest.raises(ValueError, match="int2_normalize"):
        TurboConfig(int2_scope="model", int2_normalize="zscore")
    cfg = TurboConfig(int2_scope="model", int2_heads=91)
    with pytest.raises(ValueError, match="30 x 3"):
        cfg.num_low_heads(3, 30)
    assert TurboConfig.from_dict(TurboConfig(int2_scope="model").to_dict()).int2_scope == "model"


@pytest.mark.parametrize("fraction, heads, total", [(0.25, None, 22), (1 / 3, None, 30), (0.5, None, 45),
                                                    (0.0, 23, 23)])
def test_model_wide_count_is_exact(fraction, heads, total):
    """round(fraction * L * H) heads in total (Python round: 0.25 * 90 = 22.5 -> 22), or int2_heads in total."""
    layers, h = 30, 3
    pr = torch.rand(layers, h).tolist()
    cfg = TurboConfig(int2_fraction=fraction, int2_heads=heads, int2_scope="model", priorities=pr)
    assert cfg.num_low_heads(h, layers) == total
    cache = TurboQuantCache(_config(layers, h), turbo=cfg)
    _fill(cache, layers, h)
    bits = [layer.head_bits.tolist() for layer in cache.layers]
    assert sum(row.count(2) for row in bits) == total
    assert bits == cfg.head_bits(pr)
    # exactly the `total` lowest priorities of the model
    flat = torch.tensor(pr).flatten()
    low = torch.tensor(bits).flatten() == 2
    if 0 < total < flat.numel():
        assert float(flat[low].max()) < float(flat[~low].min())
    report = cache.memory_report()
    assert report["int2_scope"] == "model" and sum(report["low_bit_heads_per_layer"]) == total


def test_lower_priority_layers_get_more_int2_heads():
    layers, h = 4, 3
    pr = torch.rand(layers, h) + 1.0
    pr[1] *= 0.01  # a quiet layer: all its heads rank below the others
    pr[3] *= 100.0  # a loud one: none of its heads go to INT2
    cfg = TurboConfig(int2_fraction=0.25, int2_scope="model", priorities=pr.tolist())  # 3 of 12
    bits = torch.tensor(cfg.head_bits(pr.tolist()))
    per_layer = (bits == 2).sum(-1).tolist()
    assert per_layer == [0, 3, 0, 0]
    per_layer_cfg = cfg.replace(int2_scope="layer", int2_fraction=1 / 3)  # the per-layer choice: 1 in every layer
    assert [row.count(2) for row in per_layer_cfg.head_bits(pr.tolist())] == [1, 1, 1, 1]
    # layer_mean: a layer's scale does not decide, only its heads' spread around its own mean
    norm = cfg.replace(int2_normalize="layer_mean")
    scaled = pr.clone()
    scaled[1] *= 1e4
    assert norm.head_bits(pr.tolist()) == norm.head_bits(scaled.tolist())
    assert cfg.head_bits(pr.tolist()) != cfg.head_bits(scaled.tolist())


def test_model_scope_without_priorities_is_a_clear_error():
    with pytest.raises(ValueError, match="calibrated priorities.*online"):
        TurboQuantCache(_config(), int2_scope="model", int2_fraction=0.25)
    layer = TurboLayer(TurboConfig(int2_scope="model", int2_heads=1))
    with pytest.raises(ValueError, match="calibrated priorities"):
        layer.update(torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    # nothing to rank: no error (no INT2 heads, or no quantization)
    for kw in ({"int2_fraction": 0.0}, {"int2_heads": 0, "int2_fraction": 0.5}, {"quantize": False}):
        TurboQuantCache(_config(), int2_scope="model", **kw)


def test_tensor_parallel_rank_gets_its_slice(monkeypatch):
    """Under tensor parallelism each rank's layer slices the model-wide choice for its own heads."""
    import hf_turbo.cache as cache_mod

    pr = [[4.0, 1.0, 3.0, 0.5], [0.1, 5.0, 0.2, 6.0]]
    cfg = TurboConfig(int2_heads=3, int2_scope="model", priorities=pr)
    full = cfg.head_bits(pr)
    assert full == [[4, 4, 4, 2], [2, 4, 2, 4]]
    monkeypatch.setattr(cache_mod, "tensor_parallel_shard", lambda local, glob: (1, 2))
    cache = TurboQuantCache(_config(layers=2, kv_heads=4, heads=8), turbo=cfg)
    _fill(cache, 2, 2)  # this rank holds heads 2, 3
    assert [layer.head_bits.tolist() for layer in cache.layers] == [[4, 2], [2, 4]]


def test_calibration_round_trip_keeps_scope(tmp_path):
    from hf_turbo.eval.perplexity import cache_kwarg
    from transformers import AutoModelForCausalLM

    model = _tiny_llama(layers=3)
    cal = calibrate(model, samples=torch.randint(0, 128, (2, 64)), int2_heads=2, int2_scope="model",
                    int2_normalize="layer_mean", progress=False)
    assert cal.num_low_heads() == 2 and sum(row.count(2) for row in cal.head_bits()) == 2
    entry = model.config.turbo_config
    assert entry["int2_scope"] == "model" and entry["int2_normalize"] == "layer_mean" and entry["int2_heads"] == 2
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["turbo_config"]
    assert saved["int2_scope"] == "model" and saved["int2_normalize"] == "layer_mean"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="turbo").eval()
    cache = TurboQuantCache(loaded.config)
    assert cache.turbo.int2_scope == "model"
    with torch.no_grad():
        loaded(input_ids=torch.randint(0, 128, (1, 70)), use_cache=True, **{cache_kwarg(loaded): cache})
    assert [layer.head_bits.tolist() for layer in cache.layers] == cal.head_bits()
    # standalone JSON
    back = load_calibration(cal.save(tmp_path / "cal.json"))
    assert (back.int2_scope, back.int2_normalize) == ("model", "layer_mean") and back.head_bits() == cal.head_bits()
    # a file written before the scope existed reads as per-layer; apply_calibration can override the scope
    old = {k: v for k, v in back.to_dict().items() if k not in ("int2_scope", "int2_normalize")}
    assert Calibration.from_dict(old).int2_scope == "layer"
    fresh = apply_calibration(_tiny_llama(layers=3), Calibration.from_dict(old), int2_scope="model")
    assert fresh.config.turbo_config["int2_scope"] == "model"
    with pytest.raises(ValueError, match="int2_scope"):
        Calibration.from_dict({**old, "int2_scope": "global"})


def test_calibrate_cli_has_scope_options():
    parser = calib_cli.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--int2-scope", "model", "--int2-normalize", "layer_mean", "--int2-fraction", "0.25"])
    assert (args.int2_scope, args.int2_normalize, args.int2_fraction) == ("model", "layer_mean", 0.25)
    assert parser.parse_args([]).int2_scope == "layer"
    with pytest.raises(SystemExit):
        parser.parse_args(["--int2-scope", "global"])
