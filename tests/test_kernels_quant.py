# ruff: noqa: E741
"""Interpreted (CPU) tests of kernels/quantize_pack.py against hf_turbo.quant.bpq: bit-exact.

Fresh random inputs each run (conftest seeds), outputs poisoned before every kernel run."""

import os

import pytest
import torch
import triton
import triton.language as tl
from hf_turbo.kernels._common import e4m3_grid, to_e4m3
from hf_turbo.kernels._tiles import fp8_probs, prep_v

from hf_turbo.cache import TurboLayer
from hf_turbo.config import TurboConfig
from hf_turbo.quant.bpq import quantize_int8_blocks

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs the Triton interpreter (CPU) or CUDA",
)

DEV = "cuda" if os.environ.get("HF_TURBO_GPU_TESTS") == "1" else "cpu"


def _inputs(b, h, t, d, dtype=torch.float16, outlier=True):
    x = torch.randn(b, h, t, d, device=DEV) * torch.rand(1, h, 1, d, device=DEV) * 3
    if outlier:
        x[..., 3] *= 8  # a channel outlier, like real keys
    return x.to(dtype)


@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_stage1_bit_exact(d, dtype):
    from hf_turbo.kernels.quantize_pack import stage1

    x = _inputs(2, 3, 150, d, dtype)  # partial last block
    ref8, refs = quantize_int8_blocks(x.cpu(), 64, scale_mult=0.125)
    ref8, refs = ref8.to(DEV), refs.to(DEV)
    x8, s = stage1(x, 64, scale_mult=0.125)
    assert torch.equal(x8, ref8)
    assert torch.equal(s, refs)
    xt, st = stage1(x, 64, transpose=True)
    assert torch.equal(xt.transpose(-1, -2), ref8)
    xd, _ = stage1(x, 64, dequant_fp16=True)
    ref_deq = (ref8.float() * refs.repeat_interleave(64, -1)[..., :150, None] / 0.125).half()
    assert torch.equal(xd, ref_deq)


# bfloat16 compiled only: the interpreter rounds float32 -> bfloat16 toward zero (torch and the GPU: to nearest even)
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_stage1_subtracts_the_mean(dtype):
    """K smoothing fused into stage 1: the codes and scales of ``x - mu`` (torch's subtraction in x's dtype)."""
    from hf_turbo.kernels.quantize_pack import stage1

    from hf_turbo.quant.attention import key_mean

    x = (_inputs(2, 3, 150, 64, torch.float32) + 5 * torch.randn(1, 3, 1, 64, device=DEV)).to(dtype)
    mu = key_mean(x)
    ref8, refs = quantize_int8_blocks((x - mu).cpu(), 64)
    x8, s = stage1(x, 64, mean=mu)
    assert torch.equal(x8, ref8.to(DEV)) and torch.equal(s, refs.to(DEV))
    plain8, _ = stage1(x, 64)
    assert not torch.equal(plain8, x8)  # the mean was applied
    with pytest.raises(ValueError, match=r"mean must be \[B, H, 1, D\]"):
        stage1(x, 64, mean=mu[:, :2])


def _poison(layer):
    for pool in layer.pools.values():
        for _name, t in pool.items():
            if t.dtype.is_floating_point:
                t.fill_(float("nan"))
            else:
                t.view(torch.uint8).fill_(0xAA)


@pytest.mark.parametrize(
    "d,bits,low,frac,k_axis,v_axis",
    [
        (64, 4, 2, 0.5, "channel", "token"),
        (96, 4, 2, 0.25, "channel", "token"),
        (128, 4, 2, 0.0, "token", "channel"),
        (64, 8, 2, 0.5, "channel", "channel"),
    ],
)
def test_compress_into_bit_exact(d, bits, low, frac, k_axis, v_axis):
    from hf_turbo.kernels.quantize_pack import compress_into

    cfg = TurboConfig(bits=bits, low_bits=low, int2_fraction=frac, k_axis=k_axis, v_axis=v_axis, k_smooth=False)
    h = 4
    k = _inputs(2, h, 64 * 3 + 5, d)
    v = _inputs(2, h, 64 * 3 + 5, d, outlier=False)
    ref = TurboLayer(cfg)
    k, v = k.cpu(), v.cpu()
    ref.update(k[:, :, :70], v[:, :, :70])  # one block, through the reference path on CPU
    ref.update(k[:, :, 70:], v[:, :, 70:])  # two more blocks
    assert ref.n_blocks == 3
    expect = {b: {n: t.clone() for n, t in p.items()} for b, p in ref.pools.items()}
    for pool in ref.pools.values():
        for name in list(pool):
            pool[name] = pool[name].to(DEV)
    # the same blocks through the kernel, after poisoning, in two flushes like the reference
    _poison(ref)
    ref.n_blocks = 0
    for lo, hi in ((0, 64), (64, 192)):
        compress_into(ref, k[:, :, lo:hi].to(DEV), v[:, :, lo:hi].to(DEV))
        ref.n_blocks += (hi - lo) // 64
    for b, pool in ref.pools.items():
        for name, t in pool.items():
            got, exp = t[:, :, :3].cpu(), expect[b][name][:, :, :3]
            assert torch.equal(got, exp), (b, name)


@triton.jit
def _e4m3_bits(x_ptr, out_ptr, grid_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(out_ptr + i, to_e4m3(x).to(tl.uint8, bitcast=True))
    tl.store(grid_ptr + i, e4m3_grid(x))


def test_e4m3_rounding_is_torch():
    """``_common.to_e4m3`` (the FP8 PV operands, ``448 p`` and INT8 values) gives torch's float8_e4m3fn bits, and
    ``_common.e4m3_grid`` (the same rounding in fp32, whose row sums the FP8 PV takes) torch's e4m3 values: every
    finite e4m3 value, the midpoints between neighbours (ties to even), random values across the range, subnormals,
    zero and the clamp at 448."""
    grid = torch.arange(256, dtype=torch.uint8)
    grid = grid[(grid & 0x7F) != 0x7F].view(torch.float8_e4m3fn).float()  # the 254 finite values
    pos = grid[grid > 0].unique()
    mids = (pos[1:] + pos[:-1]) / 2
    rand = torch.rand(2048) * 448 * torch.where(torch.rand(2048) < 0.5, -1.0, 1.0)
    tiny = torch.rand(256) * 2.0**-6  # the subnormal range
    x = torch.cat([grid, mids, -mids, rand, tiny, torch.tensor([0.0, 448.0, -448.0, 447.9, 300.0, 0.4])])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.rand(n - x.numel())]).to(DEV)
    out = torch.full((n,), 0x7F, dtype=torch.uint8, device=DEV)  # poisoned: 0x7F is e4m3's NaN
    on_grid = torch.full((n,), float("nan"), device=DEV)
    _e4m3_bits[(1,)](x, out, on_grid, N=n)
    want = x.cpu().to(torch.float8_e4m3fn)
    bad = (out.cpu() != want.view(torch.uint8)).nonzero().flatten()[:5]
    assert bad.numel() == 0, [(x[i].item(), hex(out[i].item()), hex(want[i].item())) for i in bad.tolist()]
    bad = (on_grid.cpu().view(torch.int32) != want.float().view(torch.int32)).nonzero().flatten()[:5]  # -0.0 too
    assert bad.numel() == 0, [(x[i].item(), on_grid[i].item(), want[i].item()) for i in bad.tolist()]


@triton.jit
def _fp8_pv_tile(a_ptr, b_ptr, vt_ptr, o_ptr, l_ptr, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """The FP8 PV data path of one prefill tile, alone: probabilities in a score accumulator's layout (``s / 1152`` of
    an exact integer dot ``s``) through the kernels' :func:`_tiles.fp8_probs` (e4m3 and row sums), V's INT8 codes
    read from ``[D, N]`` storage and transposed, to e4m3 by the kernels' :func:`_tiles.prep_v`, one FP8 dot."""
    m, n, d = tl.arange(0, M), tl.arange(0, N), tl.arange(0, D)
    s = tl.dot(tl.load(a_ptr + m[:, None] * D + d[None, :]), tl.trans(tl.load(b_ptr + n[:, None] * D + d[None, :])))
    p = s * (1.0 / 1152.0)
    v = tl.trans(tl.load(vt_ptr + d[:, None] * N + n[None, :]))
    pf, l = fp8_probs(p)
    o = tl.dot(pf, prep_v(v.to(tl.int32), 1.0, 2), out_dtype=tl.float32)  # PV_MODE 2: e4m3 of the INT8 codes
    tl.store(o_ptr + m[:, None] * D + d[None, :], o)
    tl.store(l_ptr + m, l)


def test_fp8_pv_tile_is_torch():
    """:func:`_fp8_pv_tile` against torch on the same e4m3 operands: isolates the FP8 dot of the attention kernels'
    PV step (compiled on the GPU). The scores are exact integers (codes 0..3, 128 channels: at most 1152) and p and
    448 p single FP32 products, so both sides round the same values to e4m3; e4m3 x e4m3 products are exact in FP32
    and only the sums of 64 may round: Hopper keeps about 14 bits when it accumulates FP8 products inside an MMA
    (2^-14 = 6e-5 per sum), hence 1e-3; a wrong rounding of the operands gives 0.15 (the interpreter's own). The row
    sums of e4m3(448 p) / 448 (the softmax denominator's share) are sums of 64 FP32 values on the e4m3 grid: within
    1e-6 of torch's; the e4m3 -> fp32 conversion they once used gave 1.8 compiled on the H200."""
    m, n, d = 128, 64, 128
    a = torch.randint(0, 4, (m, d), device=DEV).half()
    b = torch.randint(0, 4, (n, d), device=DEV).half()
    vt = torch.randint(-119, 120, (d, n), dtype=torch.int8, device=DEV)
    out = torch.full((m, d), float("nan"), device=DEV)
    rows = torch.full((m,), float("nan"), device=DEV)
    _fp8_pv_tile[(1,)](a, b, vt, out, rows, M=m, N=n, D=d, num_warps=8)
    p = (a.cpu().float() @ b.cpu().float().T) * torch.tensor(1.0 / 1152.0)
    e4m3 = lambda x: x.to(torch.float8_e4m3fn).float()  # noqa: E731
    want = e4m3(p * 448.0) @ e4m3(vt.cpu().float().T)
    got = out.cpu()
    assert not got.isnan().any()
    assert (got - want).norm() / want.norm() < 1e-3, ((got - want).norm() / want.norm()).item()
    want_l = e4m3(p * 448.0).sum(1) / 448.0
    assert ((rows.cpu() - want_l).abs() <= 1e-6 * want_l).all(), ((rows.cpu() - want_l).abs() / want_l).max().item()
