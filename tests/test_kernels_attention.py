# ruff: noqa: E741
"""Interpreted (CPU) tests of kernels/prefill.py and kernels/decode.py against
hf_turbo.quant.attention.turbo_attention_reference (same tiling, same quantization).

Tolerance: both sides compute the same integer products exactly; they differ only by FP32 evaluation order of the
score scale (the kernel folds log2 e into Q's scale) and FP16 rounding inside SAS, which can move an FP16 argument
or a P·127 code by one step. One flipped P8 code moves an output by at most max|V| / 127 / l (l >= 1), so elements
are checked to ``max|V| / 127`` plus FP16 output rounding, and the relative L2 error to 2e-3 (measured ~1e-4).
FP8 PV rounds ``448 p`` to e4m3, whose step is up to 32 (for ``448 p`` in [256, 448]): one flipped code moves an
output by at most max|V| / 14, the elementwise bound there (:data:`P_STEP`).
Outputs are poisoned (NaN) before each run."""

import os

import pytest
import torch

from hf_turbo.cache import TurboLayer
from hf_turbo.config import TurboConfig
from hf_turbo.quant.attention import exact_attention, int8_segments, no_cache_segments, turbo_attention_reference

DEV = "cuda" if os.environ.get("HF_TURBO_GPU_TESTS") == "1" else "cpu"


def _ref_kwargs(t: TurboConfig):
    return dict(exp=t.exp, n_r=t.n_r, sas_base=t.sas_base, pv=t.pv, block_m=t.block_m, block_n=t.block_n)


# compiled on a GPU, the FP16 Horner steps of SAS are contracted into FMAs (one FP16 ulp of p, which can flip a P*127
# code): measured up to 2.7e-3 there (tests/gpu uses 5e-3 for the same reason); the interpreter rounds every step
REL_L2 = 5e-3 if DEV == "cuda" else 2e-3


# one rounding step of the probabilities as the PV product takes them, relative to p's range [0, 1]: P8 = round(127 p)
# and FP16 (finer) step 1/127; e4m3(448 p) up to 32/448
P_STEP = {"int8": 1 / 127, "fp16": 1 / 127, "fp8": 1 / 14}


def _check(out, ref, vmax, rel=REL_L2, pv="int8"):
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    o, r = out.float(), ref.float().to(out.device)
    err = (o - r).norm() / r.norm().clamp_min(1e-12)
    assert err <= rel, f"relative L2 {err:.2e}"
    bound = vmax * P_STEP[pv] + 2e-3 * r.abs() + 1e-3
    assert bool(((o - r).abs() <= bound).all()), f"max abs {(o - r).abs().max():.3e}"


def _poison_empty_like(x):
    return torch.full_like(x, float("nan"))


CASES = [
    # d, hq, hkv, sq, causal, exp, base, pv, pad, window, other TurboConfig fields
    (64, 4, 2, 130, True, "sas", "e", "int8", False, None, {}),
    (64, 2, 2, 96, False, "sas", "2", "fp16", True, None, {}),
    (96, 4, 1, 70, True, "exp2", "e", "int8", True, 40, dict(k_smooth=False)),
    (128, 2, 2, 64, True, "sas", "e", "fp16", False, None, {}),
    (64, 4, 2, 150, True, "exp2", "e", "fp16", True, None, dict(tail_v="int8")),
    (64, 4, 4, 100, False, "exp2", "e", "fp16", False, None, dict(k_smooth=False, tail_v="fp16")),
    (64, 4, 2, 130, True, "sas", "e", "fp8", True, None, {}),
    (128, 2, 1, 100, False, "exp2", "e", "fp8", False, 40, {}),
]


@pytest.mark.parametrize("d,hq,hkv,sq,causal,exp,base,pv,pad,window,extra", CASES)
def test_prefill_matches_reference(d, hq, hkv, sq, causal, exp, base, pv, pad, window, extra):
    """The no-cache kernel path against the reference of what it reads (``no_cache_segments``: K smoothing, stage-1
    INT8 keys, INT8 or FP16 values); keys carry a per-channel offset, as real keys do, so smoothing matters."""
    from hf_turbo.kernels import prefill, unavailable_reason

    assert unavailable_reason(DEV, allow_interpreter=True) is None
    t = TurboConfig(exp=exp, sas_base=base, pv=pv, **extra)
    b = 2
    q = torch.randn(b, hq, sq, d, device=DEV).half()
    k = (torch.randn(b, hkv, sq, d, device=DEV) + 3 * torch.randn(1, hkv, 1, d, device=DEV)).half()
    v = torch.randn(b, hkv, sq, d, device=DEV).half()
    padv = torch.tensor([0, 37], dtype=torch.int32, device=DEV) if pad else None
    key_mask = None
    if pad:
        key_mask = torch.arange(sq, device=DEV)[None, :] >= padv[:, None]
    sm = d**-0.5
    out = prefill(q, k, v, t, sm_scale=sm, causal=causal, pad=padv, sliding_window=window)
    ref = turbo_attention_reference(q.cpu(), no_cache_segments(k.cpu(), v.cpu(), t), sm_scale=sm, causal=causal,
                                    key_mask=None if key_mask is None else key_mask.cpu(), sliding_window=window,
                                    **_ref_kwargs(t))
    _check(out, ref, v.abs().max().item(), pv=pv)
    exact = exact_attention(q.cpu(), k.cpu(), v.cpu(), sm_scale=sm, causal=causal,
                            key_mask=None if key_mask is None else key_mask.cpu(), sliding_window=window)
    has = exact.abs().sum(-1) > 0
    rel = ((out.cpu().double() - exact)[has].norm() / exact[has].norm()).item()
    assert rel < 0.08, rel  # INT8 + SAS accuracy sanity vs exact attention


def _layer(cfg, b, hkv, d, lengths):
    """A TurboLayer filled by successive updates (reference compression on CPU, kernel compression on CUDA)."""
    layer = TurboLayer(cfg)
    ks, vs = [], []
    for n in lengths:
        k = torch.randn(b, hkv, n, d, device=DEV).half()
        v = torch.randn(b, hkv, n, d, device=DEV).half()
        layer.update(k, v)
        ks.append(k)
        vs.append(v)
    return layer, torch.cat(ks, -2), torch.cat(vs, -2)


@pytest.mark.parametrize(
    "d,hq,hkv,hist,sq,frac,pv,exp,base,causal,pad,window,res,tail_v",
    [
        (64, 4, 2, 130, 70, 0.5, "int8", "sas", "e", True, True, None, 0, "auto"),  # chunked prefill, mixed 4/2-bit
        (64, 6, 2, 200, 1, 0.5, "int8", "sas", "e", True, True, None, 0, "auto"),  # decode, GQA 3:1, ragged
        (128, 8, 2, 300, 1, 0.0, "fp16", "sas", "2", True, False, 100, 0, "int8"),  # decode, 4-bit, window
        (96, 4, 4, 64, 3, 0.25, "int8", "exp2", "e", True, False, None, 0, "auto"),  # small Sq, padded head dim
        # residual_length 128: 1 compressed block + a 137-token FP16 tail (3 tail blocks in the decode kernel)
        (64, 6, 2, 200, 1, 0.5, "fp16", "exp2", "e", True, True, None, 128, "fp16"),
        (64, 4, 2, 130, 70, 0.0, "fp16", "exp2", "e", True, False, None, 0, "int8"),  # chunked prefill, INT8 tail V
        (64, 4, 2, 130, 70, 0.5, "fp16", "exp2", "e", True, True, None, 0, "fp16"),  # chunked prefill, FP16 tail V
        (64, 4, 2, 130, 70, 0.5, "fp8", "sas", "e", True, True, None, 0, "auto"),  # chunked prefill, FP8 PV
        (128, 8, 2, 200, 1, 0.5, "fp8", "exp2", "e", True, True, None, 0, "auto"),  # decode, FP8 PV, mixed
    ],
)
def test_attend_layer_matches_reference(d, hq, hkv, hist, sq, frac, pv, exp, base, causal, pad, window, res, tail_v):
    from hf_turbo.kernels import attend_layer

    cfg = TurboConfig(int2_fraction=frac, pv=pv, exp=exp, sas_base=base, residual_length=res, tail_v=tail_v)
    b = 2
    layer, k_all, v_all = _layer(cfg, b, hkv, d, [hist, sq])
    q = torch.randn(b, hq, sq, d, device=DEV).half()
    s_kv = hist + sq
    padv = torch.tensor([0, 45], dtype=torch.int32, device=DEV) if pad else None
    key_mask = None if not pad else (torch.arange(s_kv, device=DEV)[None, :] >= padv[:, None])
    sm = d**-0.5
    ref = turbo_attention_reference(
        q.cpu(), [s._replace(**{f: getattr(s, f).cpu() for f in ("k", "v", "k_scale", "v_scale")
                                if getattr(s, f) is not None}) for s in layer.attention_segments()],
        sm_scale=sm, causal=causal, key_mask=None if key_mask is None else key_mask.cpu(), sliding_window=window,
        **_ref_kwargs(cfg))
    assert layer.blocks_before == max(hist - res, 0) // 64  # the residual stays in the tail
    out = attend_layer(q, layer, sm_scale=sm, causal=causal, pad=padv, sliding_window=window, split=1)
    _check(out, ref, v_all.abs().max().item(), pv=pv)
    if sq == 1:
        # split-K with LSE merge: a reordering of the tile walk (SAS / P8 relative to each split's running max),
        # so compare with exact attention at the accuracy the reference itself reaches.
        out_s = attend_layer(q, layer, sm_scale=sm, causal=causal, pad=padv, sliding_window=window, split=3)
        assert not torch.isnan(out_s).any()
        exact = exact_attention(q.cpu(), layer.dequantized()[0].cpu(), layer.dequantized()[1].cpu(), sm_scale=sm,
                                causal=causal, key_mask=None if key_mask is None else key_mask.cpu(),
                                sliding_window=window)
        e_ref = (ref.double() - exact).norm() / exact.norm()
        e_split = (out_s.cpu().double() - exact).norm() / exact.norm()
        assert e_split <= 1.5 * e_ref + 2e-3, (e_split, e_ref)
        # the last split to finish merges and resets its arrival counter: later steps with the same scratch (another
        # split count, then this one again) merge the same way, bit for bit
        attend_layer(q, layer, sm_scale=sm, causal=causal, pad=padv, sliding_window=window, split=2)
        again = attend_layer(q, layer, sm_scale=sm, causal=causal, pad=padv, sliding_window=window, split=3)
        assert torch.equal(again, out_s)


@pytest.mark.parametrize("d,frac,k_axis,v_axis", [(96, 0.5, "channel", "token"), (64, 1.0, "token", "channel"),
                                                 (128, 0.0, "channel", "token")])
def test_decode_fp16_rebuild_is_the_integer_rebuild(d, frac, k_axis, v_axis):
    """The FP16 rebuild of the packed codes, from bytes or int32 words (and its FP16 QK dot), computes the same
    integers as the integer rebuild and INT8 dot: the outputs agree bit for bit (padded head dim, 2-bit, 4-bit, both
    stage-2 axes)."""
    from hf_turbo.kernels import attend_layer

    cfg = TurboConfig(int2_fraction=frac, pv="fp16", k_axis=k_axis, v_axis=v_axis)
    layer, _, _ = _layer(cfg, 2, 2, d, [150, 1])
    q = torch.randn(2, 4, 1, d, device=DEV).half()
    outs = [attend_layer(q, layer, sm_scale=d**-0.5, causal=True, split=2, rebuild=r) for r in ("int", "fp16", "words")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("k_smooth,frac,sq,read_first", [(True, 0.5, 1, False), (False, 0.0, 3, False),
                                                          (True, 0.0, 1, True)])
def test_decode_writes_the_pending_tokens(k_smooth, frac, sq, read_first):
    """A decode step's tokens left pending by the update (after a first decode showed the kernels write them) are
    written by the decode kernel, or by any other reader first: the buffer and the output equal a twin layer's
    whose update wrote them, bit for bit (K smoothing's mu subtracted the same way)."""
    from hf_turbo.kernels import attend_layer

    cfg = TurboConfig(int2_fraction=frac, k_smooth=k_smooth)
    b, hkv, hq, d = 2, 2, 4, 64
    layer, twin = TurboLayer(cfg), TurboLayer(cfg)
    for step, n in enumerate((130, sq, sq, sq)):
        k = torch.randn(b, hkv, n, d, device=DEV).half()
        v = torch.randn(b, hkv, n, d, device=DEV).half()
        layer.update(k, v, turbo_reader=True)
        twin.update(k, v)
        assert (layer.pending is not None) == (step >= 2), step  # from the second decode step on
        if step == 0:
            continue
        if read_first and step == 3:  # another reader writes them first
            assert torch.equal(layer.buffer_k, twin.buffer_k) and layer.pending is None
        q = torch.randn(b, hq, sq, d, device=DEV).half()
        out = attend_layer(q, layer, sm_scale=d**-0.5, causal=True, split=2)
        assert torch.equal(out, attend_layer(q, twin, sm_scale=d**-0.5, causal=True, split=2))
        assert layer.pending is None
        assert torch.equal(layer.buffer_k, twin.buffer_k) and torch.equal(layer.buffer_v, twin.buffer_v)


def test_decode_plan_leaves_the_layer_free():
    """The decode launch plan kept on a layer (pools, split scratch) holds no reference back to it: a dropped cache
    is freed at once, not when Python's cycle collector next runs (GPU memory would pile up until then)."""
    import gc
    import weakref

    from hf_turbo.kernels import attend_layer

    layer, _, _ = _layer(TurboConfig(), 1, 2, 64, [200, 1])
    q = torch.randn(1, 4, 1, 64, device=DEV).half()
    attend_layer(q, layer, sm_scale=0.125, causal=True, split=2)
    assert "decode_plan" in layer.kernel_cache
    alive = weakref.ref(layer)
    gc.disable()
    try:
        del layer
        assert alive() is None
    finally:
        gc.enable()


def test_decode_plan_follows_reordered_pools():
    """A reorder (beam search) replaces the pools: the next decode reads the new ones, not the plan's old ones."""
    from hf_turbo.kernels import attend_layer

    layer, _, _ = _layer(TurboConfig(), 2, 2, 64, [200, 1])
    q = torch.randn(2, 4, 1, 64, device=DEV).half()
    before = attend_layer(q, layer, sm_scale=0.125, causal=True, split=2)
    layer.reorder_cache(torch.tensor([1, 0]))
    after = attend_layer(q.flip(0), layer, sm_scale=0.125, causal=True, split=2)
    assert torch.equal(after, before.flip(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_reads_fp16_values_in_place(dtype):
    """``tail_v="fp16"``: the values are read through their strides (here a [B, S, H, D] projection viewed as
    [B, H, S, D], as the attention modules pass them), bfloat16 rounded to FP16 first, like the reference."""
    from hf_turbo.kernels import prefill

    t = TurboConfig(k_smooth=False)
    q, k, v = (torch.randn(2, 90, 4, 64, device=DEV).to(dtype).transpose(1, 2) for _ in range(3))
    out = prefill(q, k, v, t, sm_scale=0.125, causal=True)
    assert out.dtype == dtype
    ref = turbo_attention_reference(q.cpu(), no_cache_segments(k.cpu(), v.cpu(), t), sm_scale=0.125, causal=True,
                                    **_ref_kwargs(t))
    _check(out, ref, v.abs().max().item(), rel=REL_L2 if dtype == torch.float16 else 1e-2)


@pytest.mark.parametrize("pv", ["int8", "fp8"])
@pytest.mark.parametrize("v_trans", [True, False])
def test_prefill_v_layouts(v_trans, pv):
    """INT8 or FP8 PV with V's INT8 codes stored [D, T] (the GPU layout: reduction dim contiguous) or [T, D]: the
    reference's result either way."""
    from hf_turbo.kernels.prefill import launch_prefill, quantize_kv_segment

    t = TurboConfig(pv=pv)
    q = torch.randn(1, 2, 100, 64, device=DEV).half()
    k = torch.randn(1, 2, 100, 64, device=DEV).half()
    v = torch.randn(1, 2, 100, 64, device=DEV).half()
    seg = quantize_kv_segment(k, v, t, v_trans=v_trans)
    out = _poison_empty_like(q)
    launch_prefill(q, out, turbo=t, sm_scale=0.125, causal=True, pad=None, sliding_window=None,
                   hmap=torch.arange(2, dtype=torch.int32, device=DEV), g=1, seg=seg)
    ref = turbo_attention_reference(q.cpu(), int8_segments(k.cpu(), v.cpu(), 0, 64), sm_scale=0.125, causal=True,
                                    **_ref_kwargs(t))
    _check(out, ref, v.abs().max().item(), pv=pv)


def test_kernels_take_what_they_compute():
    """ops's question, ``unsupported``, and the kernel entry points' ``check_supported`` agree: FP8 PV (which matches
    the reference compiled too: ``tests/gpu``, ``eval/results/gpu_tests.json``) goes to the kernels, what they do not
    compute (an FP16 QK over the tail) is refused by both, naming the choice."""
    from hf_turbo.kernels import check_supported, unsupported

    fp8 = TurboConfig(pv="fp8")
    assert unsupported(fp8) is None
    check_supported(fp8)
    fp16_buffer = TurboConfig(buffer_attention="fp16")
    assert "buffer_attention" in unsupported(fp16_buffer)
    with pytest.raises(NotImplementedError, match="buffer_attention"):
        check_supported(fp16_buffer)
