"""TurboQuantCache / TurboLayer as a data structure: flushes, stored state, the transformers Cache API (crop,
reorder_cache, batch_repeat_interleave, batch_select_indices, reset, get_mask_sizes), the reader hand-off and the
memory accounting. Driven by direct ``update`` calls; generation with real (tiny) models is in test_models.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_turbo import TurboQuantCache
from hf_turbo.quant import quantize_int8_blocks, quantize_stage2, rebuild_stage2

BS = 64


def _cache(config=None, **overrides):
    """A TurboQuantCache with unsmoothed keys: these tests check the stored layout bit for bit against the BPQ
    reference and the inputs; tests/test_k_smooth.py covers K smoothing (the default)."""
    return TurboQuantCache(config, **{"k_smooth": False, **overrides})


def _config(layers=2, kv_heads=2, heads=4, attn="turbo", **extra):
    """A minimal model config: what the cache reads (layer / head counts, live attention implementation)."""
    cfg = SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=kv_heads, num_attention_heads=heads, **extra)
    cfg._attn_implementation = attn
    return cfg


def _kv(b=2, h=2, t=10, d=64, dtype=torch.float32):
    return torch.randn(b, h, t, d, dtype=dtype), torch.randn(b, h, t, d, dtype=dtype)


def _fill(cache, chunks, layers=2):
    """Feed ``chunks`` (a list of (k, v)) to every layer; return the concatenated inputs per layer."""
    seen = [([], []) for _ in range(layers)]
    for k, v in chunks:
        for i in range(layers):
            kk, vv = k * (i + 1), v * (i + 1)  # different contents per layer
            cache.update(kk, vv, i)
            seen[i][0].append(kk)
            seen[i][1].append(vv)
    return [(torch.cat(ks, 2), torch.cat(vs, 2)) for ks, vs in seen]


def _bpq_bound(x: torch.Tensor, bits: int, axis: str) -> torch.Tensor:
    """Per-element error bound of BPQ on whole blocks of ``x`` ([B, H, nb*64, D]): step * (s2 / 2 + 1/2)."""
    b, h, t, d = x.shape
    x8, scale = quantize_int8_blocks(x, BS)
    st = quantize_stage2(x8.view(b, h, t // BS, BS, d), bits, axis)
    s2 = st.scale.double().unsqueeze(-2 if axis == "channel" else -1)
    bound = scale.double()[..., None, None] * (s2 / 2 + 0.5 + 1e-4)
    return bound.expand(b, h, t // BS, BS, d).reshape(b, h, t, d)


# --- flush ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [63, 64, 65, 129])
@pytest.mark.parametrize("residual", [0, 64, 100])
def test_flush_boundaries_prefill_then_decode(t, residual):
    """Blocks flush whole once ``residual_length + 64`` tokens wait; the newest ``residual_length`` never flush."""
    cache = _cache(_config(), residual_length=residual)
    (k_all, v_all), _ = _fill(cache, [_kv(t=t)])
    layer = cache.layers[0]

    def blocks(n):
        return max(n - residual, 0) // BS

    assert layer.n_blocks == blocks(t)
    assert layer.buffer_k.shape[-2] == t - blocks(t) * BS
    assert cache.get_seq_length() == t and layer.get_seq_length() == t
    # the buffer holds the newest tokens verbatim
    assert torch.equal(layer.buffer_k, k_all[:, :, blocks(t) * BS :])
    assert torch.equal(layer.buffer_v, v_all[:, :, blocks(t) * BS :])
    # decode: blocks flush exactly when the buffer reaches residual + 64, a whole block at a time
    for step in range(1, 70):
        k, v = _kv(t=1)
        for i in range(2):
            cache.update(k, v, i)
        n = t + step
        assert layer.n_blocks == blocks(n), (n, layer.n_blocks)
        assert residual <= layer.buffer_k.shape[-2] == n - blocks(n) * BS < residual + BS or n < residual
        assert cache.get_seq_length() == n
    assert cache.get_seq_length(1) == t + 69


def test_compressed_blocks_are_the_bpq_reference():
    """What the pools hold, rebuilt, is exactly quant/bpq's stage 1 + stage 2 of the same block (K per channel,
    V per token); the dequantized state is within one BPQ bound of the input, and the buffer is exact."""
    cache = _cache(_config(), int2_fraction=0.5)
    chunks = [_kv(t=100), _kv(t=1), _kv(t=30)]  # 131 tokens: 2 blocks (one flushed by the 30-token chunk)
    inputs = _fill(cache, chunks)
    for i, layer in enumerate(cache.layers):
        assert sorted(layer.head_bits.tolist()) == [2, 4]
        k_in, v_in = inputs[i]
        k_blk, v_blk = k_in[:, :, : 2 * BS], v_in[:, :, : 2 * BS]
        for kv, x, axis in (("k", k_blk, "channel"), ("v", v_blk, "token")):
            x8_ref, scale_ref = quantize_int8_blocks(x, BS)
            x8, scale = layer.rebuild_int8(kv)
            assert torch.equal(scale, scale_ref)
            for h, bits in enumerate(layer.head_bits.tolist()):
                st = quantize_stage2(x8_ref[:, h].reshape(2, 2, BS, -1), bits, axis)
                expect = rebuild_stage2(st.codes, st.scale, st.zero, axis).reshape(2, 2 * BS, -1)
                assert torch.equal(x8[:, h], expect), (kv, h, bits)
        k_deq, v_deq = layer.dequantized()
        assert k_deq.shape == k_in.shape and k_deq.dtype == k_in.dtype
        for deq, x, axis in ((k_deq, k_blk, "channel"), (v_deq, v_blk, "token")):
            for h, bits in enumerate(layer.head_bits.tolist()):
                bound = _bpq_bound(x[:, h : h + 1], bits, axis)
                err = (deq[:, h : h + 1, : 2 * BS].double() - x[:, h : h + 1].double()).abs()
                assert bool((err <= bound).all())
        assert torch.equal(k_deq[:, :, 2 * BS :], k_in[:, :, 2 * BS :])
        assert torch.equal(v_deq[:, :, 2 * BS :], v_in[:, :, 2 * BS :])


def test_head_bits_follow_priority_or_calibration():
    k, v = _kv(b=1, h=4, t=70)
    k[:, 2, :, 5] *= 30  # head 2: outlier channel, highest priority
    k[:, 0] *= 0.05  # head 0: quiet, lowest priority
    cache = _cache(_config(kv_heads=4), int2_heads=1)
    _fill(cache, [(k, v)])
    assert cache.layers[0].head_bits.tolist() == [2, 4, 4, 4]
    # calibrated priorities override the online choice (and are per layer)
    pri = [[5.0, 1.0, 3.0, 4.0], [1.0, 2.0, 3.0, 0.5]]
    cache = _cache(_config(kv_heads=4), int2_heads=2, priorities=pri)
    _fill(cache, [(k, v)])
    assert cache.layers[0].head_bits.tolist() == [4, 2, 2, 4]
    assert cache.layers[1].head_bits.tolist() == [2, 4, 4, 2]
    assert cache.memory_report()["head_bits"] == [[4, 2, 2, 4], [2, 4, 4, 2]]


# --- reader -----------------------------------------------------------------------------------------------------------


def test_reader_turbo_gets_placeholders_other_readers_get_real_kv():
    cfg = _config(attn="turbo")
    cache = _cache(cfg)
    k, v = _kv(t=80)
    keys, values = cache.update(k, v, 0)
    assert keys.shape == (2, 2, 80, 64) and keys.turbo_layer is cache.layers[0]
    assert keys.stride() == (0, 0, 0, 0)  # nothing materialized for the turbo reader
    cfg._attn_implementation = "sdpa"  # read live on every update
    k2, v2 = _kv(t=1)
    keys, values = cache.update(k2, v2, 0)
    assert keys.shape == (2, 2, 81, 64) and keys.stride() != (0, 0, 0, 0)
    k_deq, v_deq = cache.layers[0].dequantized()
    assert torch.equal(keys, k_deq) and torch.equal(values, v_deq)  # no flush this step: the whole stored state
    assert torch.equal(keys[:, :, 64:], torch.cat([k, k2], 2)[:, :, 64:])
    # a step that flushes: its own tokens are read in full precision (what the turbo attention reads, too);
    # blocks compressed by earlier steps are read dequantized
    k3, v3 = _kv(t=100)
    keys, values = cache.update(k3, v3, 0)
    assert keys.shape[-2] == 181 and cache.layers[0].n_blocks == 2
    assert torch.equal(keys[:, :, :64], k_deq[:, :, :64]) and torch.equal(values[:, :, :64], v_deq[:, :, :64])
    assert torch.equal(keys[:, :, 64:], torch.cat([k, k2, k3], 2)[:, :, 64:])
    # without a model config the layers are created lazily and always hand out real K/V
    lazy = TurboQuantCache(k_smooth=False)
    keys, _ = lazy.update(k, v, 0)
    assert keys.stride() != (0, 0, 0, 0) and len(lazy.layers) == 1
    assert torch.equal(keys, k)


def test_noquant_mode_is_a_plain_dynamic_cache():
    cache = _cache(_config(), quantize=False)
    inputs = _fill(cache, [_kv(t=70), _kv(t=1)])
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys, inputs[i][0]) and torch.equal(layer.values, inputs[i][1])
        assert layer.dequantized()[0] is layer.keys
    assert cache.get_seq_length() == 71
    assert cache.compression_ratio() == pytest.approx(0.5)  # float32 tensors: twice an FP16 cache's bytes


# --- crop -------------------------------------------------------------------------------------------------------------


def _state(cache):
    return [tuple(t.clone() for t in layer.dequantized()) for layer in cache.layers]


@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("form", ["negative", "positive"])
@pytest.mark.parametrize("keep", [150, 128, 100, 64, 30, 0])
def test_crop_keeps_contents(quantize, form, keep):
    """crop(-n) (transformers >= 5.18) and crop(length) (the legacy absolute form) drop the newest tokens; the kept
    tokens dequantize exactly as before (a block cut in the middle goes back to the buffer as its dequantized
    values), and the cache keeps working."""
    cache = _cache(_config(), quantize=quantize)
    _fill(cache, [_kv(t=140), _kv(t=1), _kv(t=1), _kv(t=20)])  # 162 tokens: 2 blocks + 34 buffered
    before = _state(cache)
    arg = keep - 162 if form == "negative" else keep
    if form == "positive" and keep == 0:
        arg = -162  # crop(0) means "remove nothing"; an empty cache is reached with the negative form
    cache.crop(arg)
    assert cache.get_seq_length() == keep
    for layer, (k0, v0) in zip(cache.layers, before):
        k1, v1 = layer.dequantized()
        assert k1.shape[-2] == keep
        assert torch.equal(k1, k0[:, :, :keep]) and torch.equal(v1, v0[:, :, :keep])
        if quantize:
            assert layer.n_blocks == keep // BS and layer.buffer_k.shape[-2] == keep % BS
    # keep generating after the crop: 70 more tokens (a partial block re-flushes from its dequantized values)
    more = _fill(cache, [_kv(t=1)] * 70)
    assert cache.get_seq_length() == keep + 70
    for i, layer in enumerate(cache.layers):
        k2, _ = layer.dequantized()
        assert k2.shape[-2] == keep + 70
        start = ((keep + 70) // BS) * BS  # the new buffer is exact
        assert torch.equal(k2[:, :, start:], torch.cat([before[i][0][:, :, :keep], more[i][0]], 2)[:, :, start:])
        if quantize:  # blocks kept whole are untouched; a re-flushed block is one more BPQ of its dequantized values
            ref = torch.cat([before[i][0][:, :, :keep], more[i][0]], 2)[:, :, :start]
            err = (k2[:, :, :start].double() - ref.double()).abs()
            assert bool((err <= _bpq_bound(ref, 4, "channel")).all())
            whole = (keep // BS) * BS
            assert torch.equal(k2[:, :, :whole], ref[:, :, :whole])


@pytest.mark.parametrize("keep", [150, 100, 40])
def test_crop_and_reorder_with_residual(keep):
    """With residual_length 64 the buffer holds 64..127 tokens: crop keeps every kept token exactly, reorder moves
    buffer and blocks together, and later flushes still leave the newest 64 uncompressed."""
    cache = _cache(_config(), residual_length=64)
    _fill(cache, [_kv(t=140), _kv(t=1), _kv(t=21)])  # 162 tokens: 1 block + 98 buffered
    assert cache.layers[0].n_blocks == 1 and cache.layers[0].buffer_k.shape[-2] == 98
    before = _state(cache)
    cache.crop(keep - 162)
    for layer, (k0, v0) in zip(cache.layers, before):
        k1, v1 = layer.dequantized()
        assert torch.equal(k1, k0[:, :, :keep]) and torch.equal(v1, v0[:, :, :keep])
    cache.reorder_cache(torch.tensor([1, 0]))
    for layer, (k0, _) in zip(cache.layers, before):
        assert torch.equal(layer.dequantized()[0], k0[:, :, :keep].flip(0))
    _fill(cache, [_kv(t=1)] * 90)
    layer = cache.layers[0]
    assert cache.get_seq_length() == keep + 90
    assert 64 <= layer.buffer_k.shape[-2] < 128  # the newest 64 never flushed, blocks still whole


def test_crop_noop_cases():
    cache = _cache(_config())
    _fill(cache, [_kv(t=70)])
    before = _state(cache)
    cache.crop(0)
    cache.crop(70)  # legacy absolute length equal to the current one
    cache.crop(500)  # longer than the cache
    assert cache.get_seq_length() == 70
    assert all(torch.equal(a[0], b[0]) for a, b in zip(before, _state(cache)))
    _cache(_config()).crop(-3)  # an empty cache: nothing to do, no error


# --- batch ops --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [True, False])
def test_reorder_repeat_select(quantize):
    cache = _cache(_config(), quantize=quantize)
    _fill(cache, [_kv(b=3, t=70), _kv(b=3, t=1)])
    before = _state(cache)

    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    after = _state(cache)
    for (k0, v0), (k1, v1) in zip(before, after):
        assert torch.equal(k1, k0[beam_idx]) and torch.equal(v1, v0[beam_idx])

    cache.batch_repeat_interleave(2)
    rep = _state(cache)
    for (k1, _), (k2, _) in zip(after, rep):
        assert k2.shape[0] == 6 and torch.equal(k2, k1.repeat_interleave(2, dim=0))

    cache.batch_select_indices(torch.tensor([1, 4]))
    sel = _state(cache)
    for (k2, v2), (k3, v3) in zip(rep, sel):
        assert torch.equal(k3, k2[[1, 4]]) and torch.equal(v3, v2[[1, 4]])

    # the reshaped cache keeps working (and flushes) with the new batch size
    _fill(cache, [_kv(b=2, t=1)] * 60)
    assert cache.get_seq_length() == 131
    assert cache.layers[0].dequantized()[0].shape == (2, 2, 131, 64)
    if quantize:
        assert cache.layers[0].n_blocks == 2


def test_reset_and_reuse():
    cache = _cache(_config())
    _fill(cache, [_kv(b=2, t=100)])
    assert cache.nbytes() > 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    for layer in cache.layers:
        assert layer.n_blocks == 0 and not layer.is_initialized
    # reused with another batch size and head dim
    inputs = _fill(cache, [_kv(b=1, t=65, d=128)])
    assert cache.get_seq_length() == 65 and cache.layers[0].n_blocks == 1
    assert torch.equal(cache.layers[1].dequantized()[1][:, :, 64:], inputs[1][1][:, :, 64:])


def test_get_mask_sizes():
    cache = _cache(_config())
    assert cache.get_mask_sizes(5, 0) == (5, 0)
    _fill(cache, [_kv(t=100)])
    assert cache.get_mask_sizes(1, 0) == (101, 0)
    assert cache.get_mask_sizes(7, 1) == (107, 0)
    assert cache.layers[0].get_mask_sizes(3) == (103, 0)
    assert cache.get_max_length() == -1


# --- memory -----------------------------------------------------------------------------------------------------------


def _expected_nbytes(b, h, n_blocks, buffered, d, bits_per_head):
    """Bytes by hand: per block and head, packed codes (64 * d * bits / 8) for K and V, one float32 stage-1 scale
    each, uint8 s2 + int8 zero per channel for K (d of each) and per token for V (64 of each); plus the FP16 buffer."""
    total = 0
    for bits in bits_per_head:
        per_block = 2 * (BS * d * bits // 8) + 2 * 4 + 2 * d + 2 * BS
        total += b * n_blocks * per_block
    return total + 2 * b * h * buffered * d * 2


@pytest.mark.parametrize("d", [64, 128])
def test_memory_ratio_all_4bit_at_1k_tokens(d):
    b, h = 1, 4
    cache = _cache(_config(kv_heads=h), bits=4, int2_fraction=0.0)
    _fill(
        cache, [_kv(b=b, h=h, t=1000, d=d, dtype=torch.float16)] + [_kv(b=b, h=h, t=1, d=d, dtype=torch.float16)] * 24
    )
    assert cache.get_seq_length() == 1024 and cache.layers[0].buffer_k.shape[-2] == 0
    per_layer = _expected_nbytes(b, h, 16, 0, d, [4] * h)
    assert cache.nbytes() == 2 * per_layer
    assert cache.fp16_nbytes() == 2 * (2 * b * h * 1024 * d * 2)
    ratio = cache.compression_ratio()
    assert ratio >= 3.5, ratio  # 3.76 (d=64) / 3.82 (d=128): 4-bit codes + scales, zero points
    report = cache.memory_report()
    assert report["compression_ratio"] == ratio and report["tokens"] == 1024 and report["compressed_tokens"] == 1024
    assert report["kv_bytes_allocated"] >= report["kv_bytes"]

    # the buffer counts: 10 more tokens are FP16 until the next flush
    _fill(cache, [_kv(b=b, h=h, t=10, d=d, dtype=torch.float16)])
    assert cache.nbytes() == 2 * _expected_nbytes(b, h, 16, 10, d, [4] * h)
    assert cache.compression_ratio() < ratio
    assert cache.memory_report()["compressed_tokens"] == 1024 and cache.memory_report()["tokens"] == 1034


def test_memory_mixed_precision_and_noquant():
    b, h, d = 2, 4, 64
    mixed = _cache(_config(kv_heads=h), int2_fraction=0.5)
    _fill(mixed, [_kv(b=b, h=h, t=1024, d=d, dtype=torch.float16)])
    assert mixed.nbytes() == 2 * _expected_nbytes(b, h, 16, 0, d, [4, 4, 2, 2])
    assert mixed.compression_ratio() > 4.4  # half the heads at 2 bits: the paper's "over 4.4x" regime (spec §6.3)
    plain = _cache(_config(kv_heads=h), quantize=False)
    _fill(plain, [_kv(b=b, h=h, t=1024, d=d, dtype=torch.float16)])
    assert plain.nbytes() == plain.fp16_nbytes()


def test_short_first_update_read_by_sdpa():
    """A non-turbo reader gets the real K/V before the first flush (no pools yet): a prompt shorter than a block."""
    cache = _cache(_config(attn="sdpa"), int2_heads=1)
    k, v = _kv(b=1, t=10)
    keys, values = cache.update(k, v, 0)
    assert torch.equal(keys, k) and torch.equal(values, v)
    k2, v2 = _kv(b=1, t=60)
    keys, _ = cache.update(k2, v2, 0)  # flushes one block; this step still reads it in full precision
    assert torch.equal(keys, torch.cat([k, k2], dim=-2))
