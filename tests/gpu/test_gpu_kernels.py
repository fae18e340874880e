# ruff: noqa: E741
"""GPU suite (skipped without CUDA; run with HF_TURBO_GPU_TESTS=1 so the interpreter stays off): the compiled
kernels against the reference at real sizes. The interpreted tests in tests/test_kernels_*.py also run on the GPU
under HF_TURBO_GPU_TESTS=1 (they pick the device from it)."""

import pytest
import torch
from test_kernels_attention import P_STEP  # tests/ is on the path (its conftest): one table of P's rounding steps

from hf_turbo.cache import TurboLayer
from hf_turbo.config import TurboConfig
from hf_turbo.quant.attention import exact_attention, no_cache_segments, turbo_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _kw(t):
    return dict(exp=t.exp, n_r=t.n_r, sas_base=t.sas_base, pv=t.pv, block_m=t.block_m, block_n=t.block_n)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check(out, ref, vmax, rel=5e-3, pv="int8"):
    """As the CPU tests, but the compiled kernel contracts the FP16 Horner steps of SAS into FMAs (one rounding
    instead of two), so an FP16 p may differ by one ulp from the reference and flip a P·127 code: measured relative
    L2 2.2e-3 to 2.7e-3 on the H100 for decode rows; elements stay within max|V| times one step of P's rounding
    (``P_STEP``: 1/127, or 1/14 for e4m3(448 p))."""
    assert not torch.isnan(out).any()
    o, r = out.float(), ref.float()
    assert _rel(o, r) <= rel, _rel(o, r)
    assert bool(((o - r).abs() <= vmax * P_STEP[pv] + 2e-3 * r.abs() + 1e-3).all()), (o - r).abs().max().item()


@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("preset", [dict(), dict(exp="sas", sas_base="2", pv="fp16"), dict(exp="exp2", pv="int8"),
                                    dict(tail_v="int8"), dict(k_smooth=False, tail_v="int8"),
                                    dict(dtype=torch.bfloat16), dict(pv="fp8"), dict(exp="sas", pv="fp8")])
def test_prefill_real_size(d, causal, preset):
    from hf_turbo.kernels import prefill

    preset = dict(preset)
    dtype = preset.pop("dtype", torch.float16)
    t = TurboConfig(**preset)
    b, hq, hkv, s = 2, 8, 2, 1000
    q, k, v = (torch.randn(b, h, s, d, device="cuda").to(dtype) for h in (hq, hkv, hkv))
    k = k + (2 * torch.randn(1, hkv, 1, d, device="cuda")).to(dtype)  # a per-channel key offset, as in real keys
    pad = torch.tensor([0, 123], dtype=torch.int32, device="cuda")
    km = torch.arange(s, device="cuda")[None] >= pad[:, None]
    out = prefill(q, k, v, t, sm_scale=d**-0.5, causal=causal, pad=pad)
    ref = turbo_attention_reference(q, no_cache_segments(k, v, t), sm_scale=d**-0.5, causal=causal, key_mask=km,
                                    **_kw(t))
    _check(out, ref, v.abs().max().item(), pv=t.pv)


@pytest.mark.parametrize("s", [16384, 32768])
def test_prefill_long_vs_exact(s):
    from hf_turbo.kernels import prefill

    b, h, d = 1, 4, 128
    q, k, v = (torch.randn(b, h, s, d, device="cuda").half() for _ in range(3))
    out = prefill(q, k, v, TurboConfig(), sm_scale=d**-0.5, causal=True)
    ex = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert not torch.isnan(out).any()
    assert _rel(out, ex) < 0.06


def _layer(cfg, b, hkv, d, lengths):
    layer = TurboLayer(cfg)
    for n in lengths:
        layer.update(torch.randn(b, hkv, n, d, device="cuda").half(), torch.randn(b, hkv, n, d, device="cuda").half())
    return layer


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("sq", [1, 300])
@pytest.mark.parametrize("res", [0, 128])
def test_attend_layer_real_size(d, frac, sq, res):
    from hf_turbo.kernels import attend_layer

    cfg = TurboConfig(int2_fraction=frac, residual_length=res)  # res: the newest 128 tokens stay in the FP16 tail
    b, hq, hkv = 3, 12, 4
    layer = _layer(cfg, b, hkv, d, [2000, sq])
    s_kv = 2000 + sq
    pad = torch.tensor([0, 100, 1500], dtype=torch.int32, device="cuda")
    km = torch.arange(s_kv, device="cuda")[None] >= pad[:, None]
    q = torch.randn(b, hq, sq, d, device="cuda").half()
    ref = turbo_attention_reference(q, layer.attention_segments(), sm_scale=d**-0.5, causal=True, key_mask=km,
                                    **_kw(cfg))
    out = attend_layer(q, layer, sm_scale=d**-0.5, causal=True, pad=pad, split=1)
    _check(out, ref, 6.0)
    if sq == 1:
        out_s = attend_layer(q, layer, sm_scale=d**-0.5, causal=True, pad=pad)  # automatic split
        kk, vv = layer.dequantized()
        ex = exact_attention(q, kk, vv, sm_scale=d**-0.5, causal=True, key_mask=km)
        assert _rel(out_s, ex) <= 1.5 * _rel(ref, ex) + 2e-3
        from hf_turbo.kernels.decode_mma import unsupported

        if unsupported(q, layer) is None:  # the MMA walk (compiled Gluon) over the compressed blocks
            layer.kernel_cache.clear()
            _check(attend_layer(q, layer, sm_scale=d**-0.5, causal=True, pad=pad, split=1, walk="mma"), ref, 6.0)
            out_m = attend_layer(q, layer, sm_scale=d**-0.5, causal=True, pad=pad, walk="mma")
            assert _rel(out_m, ex) <= 1.5 * _rel(ref, ex) + 2e-3
            layer.kernel_cache.clear()


@pytest.mark.parametrize("frac", [0.0, 0.5])
@pytest.mark.parametrize("b,ctx", [(4, 32768), (1, 131072)])
def test_mma_walk_long_context(frac, b, ctx):
    """The MMA walk at the benchmark's shape (32 q / 8 kv heads, hd 128, 32k context and a batch of 4, or 128k and
    batch 1: "auto" picks the walk there for its length and splits it up to WALK_MAX_SPLIT ways): against the
    reference (one split) and exact attention (automatic split), and against the Triton walk."""
    from hf_turbo.kernels import attend_layer, decode_mma

    cfg = TurboConfig(int2_fraction=frac)
    hq, hkv, d = 32, 8, 128
    layer = _layer(cfg, b, hkv, d, [ctx, 1])
    q = torch.randn(b, hq, 1, d, device="cuda").half()
    ref = turbo_attention_reference(q, layer.attention_segments(), sm_scale=d**-0.5, causal=True, **_kw(cfg))
    _check(attend_layer(q, layer, sm_scale=d**-0.5, causal=True, split=1, walk="mma"), ref, 6.0)
    layer.kernel_cache.clear()
    out_m = attend_layer(q, layer, sm_scale=d**-0.5, causal=True, walk="mma")
    layer.kernel_cache.clear()
    out_t = attend_layer(q, layer, sm_scale=d**-0.5, causal=True, walk="triton")
    kk, vv = layer.dequantized()
    ex = exact_attention(q, kk, vv, sm_scale=d**-0.5, causal=True)
    assert _rel(out_m, ex) <= 1.5 * _rel(ref, ex) + 2e-3
    assert _rel(out_m, out_t) <= 2e-3
    if b == 1:  # the long-context branch of "auto", and a split count the merge reads in a partial group of four
        assert decode_mma.walk_choice("auto", q, layer, fold_v=True, rebuild="words", on_gpu=True)
        layer.kernel_cache.clear()
        assert _rel(attend_layer(q, layer, sm_scale=d**-0.5, causal=True, split=127, walk="mma"), out_m) <= 2e-3


def test_offsets_past_2_31():
    """Tensors and pools of more than 2^31 elements (the kernels index them in 64 bits): the last sequence of a big
    batch gives bit for bit what the same sequence gives alone. Prefill: Q, K, V and the output of 129 x 8 heads x
    16k x 128 (2.2e9 elements each). Decode: a 4-bit pool of 40 sequences x 8 KV heads x 128k (K's codes 2.7e9
    bytes) -- its blocks, and the Triton and MMA walks over it."""
    from hf_turbo.kernels import attend_layer, prefill

    cfg = TurboConfig(k_smooth=False)  # K smoothing's mean is a reduction over the batch's tensor: off, to compare
    d = 128
    q, k, v = (torch.randn(129, 8, 16384, d, device="cuda").half() for _ in range(3))
    out = prefill(q, k, v, cfg, sm_scale=d**-0.5, causal=True)
    alone = prefill(q[-1:].clone(), k[-1:].clone(), v[-1:].clone(), cfg, sm_scale=d**-0.5, causal=True)
    assert torch.equal(out[-1:], alone)
    del q, k, v, out
    torch.cuda.empty_cache()

    b, hq, hkv, ctx = 40, 32, 8, 131072
    big, one = TurboLayer(cfg), TurboLayer(cfg)
    for n in [8192] * (ctx // 8192) + [1]:
        kk, vv = (torch.randn(b, hkv, n, d, device="cuda").half() for _ in range(2))
        big.update(kk, vv, turbo_reader=True)
        one.update(kk[-1:].clone(), vv[-1:].clone(), turbo_reader=True)
        if n > 1:
            big.release_step()
            one.release_step()
    del kk, vv
    assert big.pools[4]["k_codes"].numel() > 2**31
    for name, t in one.pools[4].items():
        assert torch.equal(big.pools[4][name][-1:, :, : one.n_blocks], t[:, :, : one.n_blocks]), name
    q = torch.randn(b, hq, 1, d, device="cuda").half()
    for walk in ("triton", "mma"):
        out = attend_layer(q, big, sm_scale=d**-0.5, causal=True, split=8, walk=walk)
        assert torch.equal(out[-1:], attend_layer(q[-1:], one, sm_scale=d**-0.5, causal=True, split=8, walk=walk))


def test_kernel_dispatch_through_ops():
    """ops sends CUDA tensors to the kernels (compress + attention) and the answer matches the reference."""
    from hf_turbo import ops

    cfg = TurboConfig(int2_fraction=0.25)
    layer = _layer(cfg, 2, 4, 64, [700, 1])
    q = torch.randn(2, 12, 1, 64, device="cuda").half()
    out = ops.attend_layer(q, layer, sm_scale=0.125, causal=True, key_mask=None, sliding_window=None)
    assert out.dtype == torch.float16
    ref = turbo_attention_reference(q, layer.attention_segments(), sm_scale=0.125, causal=True, **_kw(cfg))
    ex = exact_attention(q, *layer.dequantized(), sm_scale=0.125, causal=True)
    assert _rel(out, ex) <= 1.5 * _rel(ref, ex) + 2e-3
