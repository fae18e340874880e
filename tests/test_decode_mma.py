"""kernels/decode_mma: the decode walk that unpacks packed K/V codes straight into the MMA operand registers.

Interpreted here (the same source runs as plain Triton under TRITON_INTERPRET=1: layouts ignored, the packed PTX
replaced by its plain twin); the compiled Gluon kernel is checked on the H100 by tests/gpu and its static SASS by
test_walk_compiles_without_shared_memory (no GPU needed)."""

import pytest
import torch
import triton
from test_decode_sass import decode_sass_rows  # one runner of eval/decode_sass
from test_kernels_attention import DEV, _check, _layer, _ref_kwargs  # one layer builder and tolerance

from hf_turbo.config import TurboConfig
from hf_turbo.quant.attention import exact_attention, turbo_attention_reference


def _attend(q, layer, walk, split, pad=None, window=None):
    from hf_turbo.kernels import attend_layer

    layer.kernel_cache.clear()  # a fresh plan: the walk choice is part of it
    return attend_layer(q, layer, sm_scale=q.shape[-1] ** -0.5, causal=True, pad=pad, sliding_window=window,
                        split=split, walk=walk)


@pytest.mark.parametrize(
    "d,hq,hkv,hist,frac,pad,window,res",
    [
        (128, 8, 2, 300, 0.0, False, None, 0),  # 4-bit: K folded into the query, codes as FP16 subnormals
        (128, 4, 2, 200, 1.0, True, None, 0),  # 2-bit (FP16 rebuild), ragged batch
        (128, 8, 2, 330, 0.5, False, 200, 64),  # mixed 4/2-bit pools, sliding window, 64-token residual
        (64, 6, 2, 260, 0.0, True, None, 0),  # head dim 64, GQA 3:1 (SmolLM2's shape)
        (128, 32, 2, 200, 0.5, False, None, 0),  # 16 query heads per KV head: two MMA column tiles
    ],
)
def test_walk_matches_reference_and_triton_walk(d, hq, hkv, hist, frac, pad, window, res):
    cfg = TurboConfig(int2_fraction=frac, residual_length=res)
    b = 2
    layer, _, _ = _layer(cfg, b, hkv, d, [hist, 1])
    assert layer.blocks_before >= 2
    q = torch.randn(b, hq, 1, d, device=DEV).half()
    padv = torch.tensor([0, 45], dtype=torch.int32, device=DEV) if pad else None
    key_mask = None if not pad else (torch.arange(hist + 1, device=DEV)[None, :] >= padv[:, None])
    ref = turbo_attention_reference(q, layer.attention_segments(), sm_scale=d**-0.5, causal=True, key_mask=key_mask,
                                    sliding_window=window, **_ref_kwargs(cfg))
    out = _attend(q, layer, "mma", 1, padv, window)
    _check(out, ref, 1.0)
    triton_walk = _attend(q, layer, "triton", 1, padv, window)
    # the same exact integer scores; the tail is merged as a split of its own (FP16 P relative to its own running
    # max): the two differ by less than the FP16 rounding of the output (2^-11 relative)
    assert ((out.float() - triton_walk.float()).norm() / triton_walk.float().norm()).item() < 2**-11
    # split over several programs: a reordering of the walk, as accurate as the reference against exact attention
    deq = layer.dequantized()
    exact = exact_attention(q, deq[0], deq[1], sm_scale=d**-0.5, causal=True, key_mask=key_mask,
                            sliding_window=window)
    out_s = _attend(q, layer, "mma", 3, padv, window)
    e_ref = (ref.double() - exact).norm() / exact.norm()
    e_split = (out_s.double() - exact).norm() / exact.norm()
    assert e_split <= 1.5 * e_ref + 2e-3, (e_split, e_ref)


def test_walk_writes_every_partial_it_merges():
    """The partial scratch poisoned with NaN between two steps: the merged output is unchanged (every partial the
    merge reads was written by this step's walk or tail)."""
    from hf_turbo.kernels import attend_layer

    cfg = TurboConfig()
    layer, _, _ = _layer(cfg, 2, 2, 128, [260, 1])
    q = torch.randn(2, 8, 1, 128, device=DEV).half()
    first = _attend(q, layer, "mma", 2)
    plan = layer.kernel_cache["decode_plan"][1]
    for t in plan.scratch[:3]:
        t.fill_(float("nan"))
    again = attend_layer(q, layer, sm_scale=128**-0.5, causal=True, split=2, walk="mma")
    assert torch.equal(first, again)


def test_walk_choice_and_unsupported_steps(monkeypatch):
    from hf_turbo.kernels import decode_mma

    cfg = TurboConfig()
    layer, _, _ = _layer(cfg, 1, 2, 128, [200, 1])
    q2 = torch.randn(1, 8, 2, 128, device=DEV).half()
    with pytest.raises(NotImplementedError, match="one query token"):
        decode_mma.walk_choice("mma", q2, layer, fold_v=True, rebuild="words", on_gpu=False)
    q1 = q2[:, :, :1]
    with pytest.raises(NotImplementedError, match="rebuild='words'"):
        decode_mma.walk_choice("mma", q1, layer, fold_v=True, rebuild="int", on_gpu=False)
    with pytest.raises(ValueError, match="walk must be"):
        decode_mma.walk_choice("fast", q1, layer, fold_v=True, rebuild="words", on_gpu=False)
    assert decode_mma.walk_choice("mma", q1, layer, fold_v=True, rebuild="words", on_gpu=False)
    # "auto": never in the interpreter; on the GPU only with enough (sequence, KV head) pairs and tiles
    assert not decode_mma.walk_choice("auto", q1, layer, fold_v=True, rebuild="words", on_gpu=False)
    assert not decode_mma.walk_choice("auto", q1, layer, fold_v=True, rebuild="words", on_gpu=True)  # 2 pairs
    # ... or, with fewer pairs, with a long enough context (AUTO_LONG_TILES pair-tiles: many splits fill the GPU)
    tiles = 2 * layer.blocks_before * (cfg.block_size // cfg.block_n)
    monkeypatch.setattr(decode_mma, "AUTO_MIN_TILES", 1)
    monkeypatch.setattr(decode_mma, "AUTO_LONG_TILES", tiles)
    assert decode_mma.walk_choice("auto", q1, layer, fold_v=True, rebuild="words", on_gpu=True)
    assert not decode_mma.walk_choice("auto", q1, layer, fold_v=True, rebuild="words", on_gpu=False)
    monkeypatch.setattr(decode_mma, "AUTO_LONG_TILES", tiles + 1)
    assert not decode_mma.walk_choice("auto", q1, layer, fold_v=True, rebuild="words", on_gpu=True)
    # ... counted in one bit-width pool (one walk launch each): a mixed layer's pools hold one of the two heads each
    mixed = _layer(TurboConfig(int2_fraction=0.5), 1, 2, 128, [200, 1])[0]
    assert sorted(idx.numel() for idx in mixed.groups.values()) == [1, 1]
    monkeypatch.setattr(decode_mma, "AUTO_LONG_TILES", tiles)
    assert not decode_mma.walk_choice("auto", q1, mixed, fold_v=True, rebuild="words", on_gpu=True)
    monkeypatch.setattr(decode_mma, "AUTO_LONG_TILES", tiles // 2)
    assert decode_mma.walk_choice("auto", q1, mixed, fold_v=True, rebuild="words", on_gpu=True)
    sas = _layer(TurboConfig(exp="sas"), 1, 2, 128, [200, 1])[0]
    assert decode_mma.unsupported(q1, sas) == "the MMA decode walk needs exp='exp2' and pv='fp16'"


def test_walk_compiles_without_shared_memory(tmp_path):
    """The compiled walk (sm_90, static SASS, no GPU): its K/V tiles never pass through shared memory (the operand
    layouts are reached by register renaming: Gluon asserts those conversions move no data), at most 16 bytes on
    the stack (ptxas holds the walk at 168 registers, 12 programs per SM, by parking loop-invariant values there:
    the pair's 64-bit pool pointers),
    and its one warp runs fewer instructions per 64-key tile than each of the Triton kernel's two warps."""
    if triton.__version__.split(".")[:2] != ["3", "6"]:
        pytest.skip(f"the Gluon walk is written for Triton 3.6 (the GPU machine's), not {triton.__version__}")
    rows = decode_sass_rows(tmp_path, "4,2", "words,mma")
    for bits in (4, 2):
        walk = [r for r in rows if r["rebuild"] == "mma" and r["bits"] == bits]
        two_warps = [r for r in rows if r["rebuild"] == "words" and r["bits"] == bits and r["num_warps"] == 2]
        assert len(walk) == 1 and len(two_warps) == 1
        assert walk[0]["shared_bytes"] == 0 and walk[0]["stack_bytes"] <= 16 and walk[0]["registers"] <= 255
        assert walk[0]["loop_mma"] > 0
        assert walk[0]["loop_instructions"] < two_warps[0]["loop_instructions"]
