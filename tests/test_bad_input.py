"""Bad input gives a clear error that names the argument (never a silent wrong answer), and no path produces NaN."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import hf_turbo
from hf_turbo import TurboConfig, TurboQuantCache
from hf_turbo.quant import (
    assign_head_bits,
    head_priority,
    int8_segments,
    pack_bits,
    quantize_int8_blocks,
    quantize_stage2,
    turbo_attention_reference,
    unpack_bits,
)


def _config(layers=2, kv_heads=2, heads=4, attn="turbo"):
    cfg = SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=kv_heads, num_attention_heads=heads)
    cfg._attn_implementation = attn
    return cfg


def _kv(b=1, h=2, t=8, d=64, dtype=torch.float32):
    return torch.randn(b, h, t, d, dtype=dtype), torch.randn(b, h, t, d, dtype=dtype)


# --- cache.update -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.float64])
def test_update_wrong_dtype(dtype):
    k = torch.ones(1, 2, 8, 64, dtype=dtype)
    v = torch.ones(1, 2, 8, 64)
    with pytest.raises(TypeError, match="key_states must be float16, bfloat16 or float32"):
        TurboQuantCache(_config()).update(k, v, 0)
    with pytest.raises(TypeError, match="value_states must be float16, bfloat16 or float32"):
        TurboQuantCache(_config()).update(v, k, 0)
    with pytest.raises(TypeError, match="key_states must be a torch.Tensor"):
        TurboQuantCache(_config()).update([[1.0]], v, 0)


def test_update_wrong_device():
    cache = TurboQuantCache(_config())
    cache.update(*_kv(), 0)
    k, v = _kv()
    with pytest.raises(ValueError, match="key_states is on meta"):
        cache.update(k.to("meta"), v.to("meta"), 0)
    with pytest.raises(ValueError, match="value_states is on meta"):
        cache.update(k, v.to("meta"), 0)
    # the cache is unchanged by the rejected updates
    assert cache.get_seq_length() == 8


@pytest.mark.parametrize("quantize", [True, False])
def test_update_wrong_shape(quantize):
    cache = TurboQuantCache(_config(), quantize=quantize)
    with pytest.raises(ValueError, match=r"key_states must have shape \[batch, kv_heads, tokens, head_dim\]"):
        cache.update(torch.randn(2, 8, 64), torch.randn(2, 8, 64), 0)
    with pytest.raises(ValueError, match="key_states .* and value_states .* differ in shape"):
        cache.update(torch.randn(1, 2, 8, 64), torch.randn(1, 2, 7, 64), 0)
    cache.update(*_kv(), 0)
    with pytest.raises(ValueError, match=r"key_states has \(batch, kv_heads, head_dim\) = \(1, 3, 64\)"):
        cache.update(*_kv(h=3), 0)  # heads changed between updates
    with pytest.raises(ValueError, match=r"key_states has \(batch, kv_heads, head_dim\) = \(1, 2, 128\)"):
        cache.update(*_kv(d=128), 0)  # head_dim changed between updates
    with pytest.raises(ValueError, match=r"key_states has \(batch, kv_heads, head_dim\) = \(2, 2, 64\)"):
        cache.update(*_kv(b=2), 0)
    assert cache.get_seq_length() == 8


@pytest.mark.parametrize("d", [8, 40, 72, 100])
def test_unsupported_head_dim(d):
    with pytest.raises(ValueError, match=f"head_dim must be a multiple of 16.*got {d}"):
        TurboQuantCache(_config()).update(*_kv(d=d), 0)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["key_states", "value_states"])
def test_nonfinite_kv(bad, which):
    k, v = _kv(t=70)
    (k if which == "key_states" else v)[0, 1, 33, 5] = float(bad)
    cache = TurboQuantCache(_config())
    with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
        cache.update(k, v, 0)
    assert cache.get_seq_length() == 0
    # a bad token arriving later (decode) is refused too, before it reaches a compressed block
    cache.update(*_kv(t=63), 0)
    k1, v1 = _kv(t=1)
    (k1 if which == "key_states" else v1)[..., 0] = float(bad)
    with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
        cache.update(k1, v1, 0)
    assert cache.get_seq_length() == 63


@pytest.mark.parametrize("read", ["next_forward", "dequantized"])
def test_nonfinite_flush_is_refused_before_its_blocks_are_read(read, monkeypatch):
    """On CUDA a decode token is not checked on arrival (a device sync per layer per token); its block is checked
    when it is flushed, on the device, and the flag is read before anything reads the compressed block: at the
    next forward pass (one sync for all layers) or by a dequantized read. Simulated on CPU by skipping the arrival
    check."""
    import hf_turbo.cache as cache_mod

    real = cache_mod.validate_kv
    monkeypatch.setattr(cache_mod, "validate_kv", lambda name, x, check_finite=True: real(name, x, check_finite=False))
    cache = TurboQuantCache(_config())
    cache.update(*_kv(t=63), 0)
    k1, v1 = _kv(t=1)
    v1[..., 3] = float("nan")
    cache.update(k1, v1, 0)  # completes the block: flushed, flag recorded, nothing raised yet
    assert cache.layers[0].n_blocks == 1 and cache.layers[0]._flushed_finite is not None
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        if read == "next_forward":
            cache.update(*_kv(t=1), 0)
        else:
            cache.layers[0].dequantized()
    # a finite flush leaves nothing to report
    good = TurboQuantCache(_config())
    good.update(*_kv(t=63), 0)
    good.update(*_kv(t=1), 0)
    good.update(*_kv(t=1), 0)
    assert good.layers[0]._flushed_finite is None


def test_empty_input():
    cache = TurboQuantCache(_config())
    with pytest.raises(ValueError, match="key_states is empty"):
        cache.update(torch.randn(1, 2, 0, 64), torch.randn(1, 2, 0, 64), 0)
    with pytest.raises(ValueError, match="key_states is empty"):
        cache.update(torch.randn(0, 2, 4, 64), torch.randn(0, 2, 4, 64), 0)
    with pytest.raises(ValueError, match="segments is empty"):
        turbo_attention_reference(torch.randn(1, 2, 1, 64), [], sm_scale=0.125)


# --- TurboConfig ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("bits", 3),
        ("bits", 16),
        ("bits", 0),
        ("low_bits", 1),
        ("low_bits", "2"),
        ("block_size", 50),
        ("block_size", 0),
        ("block_size", 64.0),
        ("residual_length", -1),
        ("residual_length", 64.0),
        ("block_m", 8),
        ("block_n", 48),  # does not divide block_size 64
        ("int2_fraction", 1.5),
        ("int2_fraction", -0.1),
        ("int2_heads", -1),
        ("int2_heads", 1.5),
        ("n_r", 0),
        ("n_r", -2.0),
        ("k_axis", "row"),
        ("v_axis", None),
        ("exp", "exp"),
        ("sas_base", "10"),
        ("pv", "int4"),
        ("buffer_attention", "int4"),
        ("tail_v", "int4"),
        ("priority_source", "q"),
    ],
)
def test_turbo_config_invalid_fields(field, value):
    with pytest.raises(ValueError, match=f"TurboConfig.{field}"):
        TurboConfig(**{field: value})
    with pytest.raises(ValueError, match=f"TurboConfig.{field}"):
        TurboQuantCache(_config(), **{field: value})  # the cache validates its overrides the same way


def test_turbo_config_other_errors():
    with pytest.raises(ValueError, match=r"unknown TurboConfig fields \['bitz'\]"):
        TurboConfig.from_dict({"bitz": 4})
    with pytest.raises(ValueError, match="unknown TurboConfig preset 'fast'"):
        TurboConfig.preset("fast")
    with pytest.raises(TypeError):
        TurboQuantCache(_config(), bitz=4)
    with pytest.raises(ValueError, match="int2_heads=3 exceeds num_key_value_heads=2"):
        TurboQuantCache(_config(), int2_heads=3).update(*_kv(), 0)
    with pytest.raises(ValueError, match=r"tail_v='fp16' needs pv='fp16' \(pv='int8'"):
        TurboConfig(pv="int8", tail_v="fp16")
    assert TurboConfig(pv="int8").tail_v_precision == "int8" and TurboConfig().tail_v_precision == "fp16"
    # valid edge values are accepted
    TurboConfig(bits=8, low_bits=4, int2_fraction=1.0, block_size=128, block_n=32, n_r=0.5)


def test_quant_functions_name_their_arguments():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        quantize_int8_blocks(torch.ones(1, 4, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="x8 must be int8"):
        quantize_stage2(torch.ones(4, 16), 4, "token")
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        quantize_stage2(torch.ones(4, 16, dtype=torch.int8), 3, "token")
    with pytest.raises(ValueError, match="axis must be 'channel' or 'token'"):
        quantize_stage2(torch.ones(4, 16, dtype=torch.int8), 4, "row")
    with pytest.raises(ValueError, match=r"bits must be one of"):
        pack_bits(torch.zeros(4, 16, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"bits must be one of"):
        unpack_bits(torch.zeros(4, 16, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="last dim 6 must be a multiple of 4"):
        pack_bits(torch.zeros(4, 6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"n_low must be in \[0, 3\]"):
        assign_head_bits(torch.ones(3), 4)
    with pytest.raises(ValueError, match=r"x must be \[B, H, T, D\]"):
        head_priority(torch.ones(4, 4))
    with pytest.raises(ValueError, match="valid marks no token"):
        head_priority(torch.ones(1, 2, 4, 16), torch.zeros(1, 4, dtype=torch.bool))
    q = torch.randn(1, 3, 4, 64)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of KV heads \(2\)"):
        turbo_attention_reference(q, int8_segments(*_kv()), sm_scale=0.125)
    with pytest.raises(ValueError, match="pv must be"):
        turbo_attention_reference(q[:, :2], int8_segments(*_kv()), sm_scale=0.125, pv="int4")


# --- priorities -------------------------------------------------------------------------------------------------------


def test_priorities_for_another_model():
    cfg = _config(layers=2, kv_heads=2)
    wrong_layers = [[1.0, 2.0]] * 3
    with pytest.raises(ValueError, match=r"priorities have shape \[3\]\[2\] but this model needs \[2\]\[2\]"):
        TurboQuantCache(cfg, priorities=wrong_layers)
    wrong_heads = [[1.0, 2.0, 3.0, 4.0]] * 2
    with pytest.raises(ValueError, match=r"priorities have shape \[2\]\[4\] but this model needs \[2\]\[2\]"):
        TurboQuantCache(cfg, priorities=wrong_heads)
    with pytest.raises(ValueError, match="calibrated for another model"):
        TurboQuantCache(cfg, priorities=[[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="priorities contain NaN or Inf"):
        TurboQuantCache(cfg, priorities=[[1.0, math.nan], [1.0, 2.0]])
    # the same check when the priorities come saved in the model config (turbo_config entry)
    cfg.turbo_config = {"priorities": wrong_heads, "int2_heads": 1}
    with pytest.raises(ValueError, match=r"this model needs \[2\]\[2\]"):
        TurboQuantCache(cfg)


def _tiny_llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, **extra)


def test_priorities_for_another_model_at_apply_turbo():
    from transformers import LlamaForCausalLM

    cfg = _tiny_llama_config()
    model = LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"this model needs \[2\]\[2\]"):
        hf_turbo.apply_turbo(model, priorities=[[1.0] * 3] * 2)


# --- attention --------------------------------------------------------------------------------------------------------


class _Module(torch.nn.Module):
    def __init__(self, model_type="llama"):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.is_causal = True


def _qkv(b=2, sq=20, skv=20, d=64):
    return torch.randn(b, 4, sq, d), torch.randn(b, 2, skv, d), torch.randn(b, 2, skv, d)


def test_attention_function_argument_errors():
    fwd = hf_turbo.turbo_attention_forward
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="serves model types .* not 'gpt2'"):
        fwd(_Module("gpt2"), q, k, v, None)
    with pytest.raises(TypeError, match="query must be float16, bfloat16 or float32"):
        fwd(_Module(), q.to(torch.int32), k, v, None)
    with pytest.raises(ValueError, match="query head_dim 32 != key head_dim 64"):
        fwd(_Module(), q[..., :32], k, v, None)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key heads \(2\)"):
        fwd(_Module(), q[:, :3], k, v, None)
    with pytest.raises(ValueError, match="expects the 2D padding mask"):
        fwd(_Module(), q, k, v, torch.ones(2, 1, 20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask covers 19 keys but the cache holds 20"):
        fwd(_Module(), q, k, v, torch.ones(2, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="key: head_dim must be a multiple of 16"):
        fwd(_Module(), q[..., :40], k[..., :40], v[..., :40], None)
    bad = k.clone()
    bad[0, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="key contains NaN or Inf"):
        fwd(_Module(), q, bad, v, None)
    with pytest.raises(NotImplementedError, match="softcap"):
        fwd(_Module(), q, k, v, None, softcap=30.0)


def test_attention_fully_masked_rows_never_nan():
    """A batch row that is all padding, and padded query positions, give finite output (zeros), not NaN."""
    fwd = hf_turbo.turbo_attention_forward
    q, k, v = _qkv(b=3, sq=70, skv=70)
    mask = torch.ones(3, 70, dtype=torch.bool)
    mask[1] = False  # nothing to attend at all
    mask[2, :30] = False  # left padding
    out, _ = fwd(_Module(), q, k, v, mask)
    assert out.shape == (3, 70, 4, 64)
    assert torch.isfinite(out).all()
    assert bool((out[1] == 0).all()) and bool((out[2, :30] == 0).all())
    # the same through the cache's decode path
    cache = TurboQuantCache(_config())
    keys, values = cache.update(k, v, 0)
    q1 = torch.randn(3, 4, 1, 64)
    k1, v1 = cache.update(*_kv(b=3, t=1), 0)
    mask1 = torch.cat([mask, torch.tensor([[True], [False], [True]])], 1)
    out, _ = fwd(_Module(), q1, k1, v1, mask1)
    assert torch.isfinite(out).all() and bool((out[1] == 0).all())


def test_model_with_all_padding_row_is_finite():
    from transformers import LlamaForCausalLM

    cfg = _tiny_llama_config(pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    hf_turbo.apply_turbo(model)
    ids = torch.randint(1, 64, (2, 80))
    mask = torch.ones_like(ids)
    mask[1, :79] = 0  # row 1: one real token at the end
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False).logits
        assert torch.isfinite(out).all()
        cache = TurboQuantCache(model.config)
        kw = "cache" if "cache" in __import__("inspect").signature(model.forward).parameters else "past_key_values"
        out = model(ids, attention_mask=mask, **{kw: cache}).logits
        assert torch.isfinite(out).all()


# --- models -----------------------------------------------------------------------------------------------------------


def test_load_model_errors(tmp_path, monkeypatch):
    from hf_turbo.models import find_default_gguf, load_model

    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="could not load model"):
        load_model(str(tmp_path / "no-model-here"))
    monkeypatch.setenv("HF_TURBO_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="HF_TURBO_GGUF=.*is not a file"):
        find_default_gguf()
