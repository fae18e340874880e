"""BPQ quantize + pack kernels (the reference is :mod:`hf_turbo.quant.bpq`).

``stage1(x, block)``: symmetric INT8 per (batch, head, block of ``block`` rows), scale ``amax / 119``::

    x    [B, H, T, D]  float16 / bfloat16 / float32, any strides (minus K smoothing's mu first, ``mean=``)
    ->   x8 int8 [B, H, T, D] (or V^T layout [B, H, D, T], ``transpose=True``), scale float32 [B, H, ceil(T/block)]
         or, ``dequant_fp16=True``, fp16(x8 * scale) [B, H, T, D] (what the FP16-PV path multiplies by P)

``compress_into(layer, k, v)``: stage 1 then stage 2 (integer asymmetric codes, integer ``s2``/``zero``) and packing,
written straight into ``layer.pools[bits]`` at blocks ``layer.n_blocks ..``; one launch per bit-width pool (K and V
in the same program). Layout of the pools: :mod:`hf_turbo.cache`.

Exactness: ``119 / amax`` is formed as torch forms it (``119 * (1 / amax)``, both IEEE-rounded via ``div_rn``) and
the scale as ``amax / 119`` (``div_rn``), so the stage-1 codes and scales equal the reference bit for bit (tested);
stage 2 and packing are integer arithmetic and equal bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, round_half_away, stage1_codes, stage1_inv, stage1_scale  # noqa: F401


@triton.jit
def _stage1_kernel(
    x_ptr, sxb, sxh, sxt, sxd,
    o_ptr, sob, soh, sot, sod,
    s_ptr, ssb, ssh, ssn,
    mu_ptr, smb, smh, smd,
    H, T, D, scale_mult,
    BLOCK: tl.constexpr, DP: tl.constexpr, DEQUANT: tl.constexpr, SUB_MEAN: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: a [B, H, T, D] tensor can pass 2^31 elements
    h = bh % H
    t = blk * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, DP)
    msk = (t[:, None] < T) & (d[None, :] < D)
    x = tl.load(x_ptr + b * sxb + h * sxh + t[:, None] * sxt + d[None, :] * sxd, mask=msk, other=0.0)
    if SUB_MEAN:  # x - mu in FP32, rounded to x's dtype: torch.sub on two tensors of that dtype
        mu = tl.load(mu_ptr + b * smb + h * smh + d * smd, mask=d < D, other=0.0)
        x = tl.where(msk, x.to(tl.float32) - mu.to(tl.float32)[None, :], 0.0).to(x_ptr.dtype.element_ty)
    x = x.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    amax = tl.where(amax > 0, amax, 1.0)
    x8 = stage1_codes(x, stage1_inv(amax))
    scale = stage1_scale(amax)
    optr = o_ptr + b * sob + h * soh + t[:, None] * sot + d[None, :] * sod
    if DEQUANT:
        tl.store(optr, (x8.to(tl.float32) * scale).to(tl.float16), mask=msk)
    else:
        tl.store(optr, x8.to(tl.int8), mask=msk)
    tl.store(s_ptr + b * ssb + h * ssh + blk * ssn, scale * scale_mult)


def stage1(x: torch.Tensor, block: int, *, scale_mult: float = 1.0, transpose: bool = False,
           dequant_fp16: bool = False, mean: torch.Tensor | None = None, num_warps: int = 4):
    """Stage-1 INT8 of ``x [B, H, T, D]`` per block of ``block`` rows (see module docstring).

    ``mean``: optional ``[B, H, 1, D]`` (K smoothing's mu, ``x``'s dtype) subtracted first, as ``x - mean`` in
    torch. Returns ``(x8, scale)``; ``x8`` is int8 ``[B, H, T, D]`` (``[B, H, D, T]`` contiguous if ``transpose``)
    or fp16 dequantized values (``dequant_fp16``); ``scale`` float32 ``[B, H, nblk]`` times ``scale_mult``."""
    bsz, h, t, d = x.shape
    nblk = triton.cdiv(t, block)
    if transpose:
        out = torch.empty(bsz, h, d, t, dtype=torch.int8, device=x.device)
        so = (out.stride(0), out.stride(1), out.stride(3), out.stride(2))
    else:
        out = torch.empty(bsz, h, t, d, dtype=torch.float16 if dequant_fp16 else torch.int8, device=x.device)
        so = out.stride()
    scale = torch.empty(bsz, h, nblk, dtype=torch.float32, device=x.device)
    if mean is not None:
        if mean.shape != (bsz, h, 1, d) or mean.dtype != x.dtype:
            raise ValueError(f"stage1: mean must be [B, H, 1, D] = {(bsz, h, 1, d)} in {x.dtype}, got "
                             f"{tuple(mean.shape)} {mean.dtype}")
        mp = (mean, mean.stride(0), mean.stride(1), mean.stride(3))
    else:
        mp = (scale, 0, 0, 0)
    _stage1_kernel[(nblk, bsz * h)](
        x, *x.stride(), out, *so, scale, *scale.stride(), *mp, h, t, d, float(scale_mult),
        BLOCK=block, DP=next_pow2(d), DEQUANT=dequant_fp16, SUB_MEAN=mean is not None, num_warps=num_warps,
    )
    return out, scale


@triton.jit
def _stage2_pack_store(
    x8, valid, code_base, rows, d, s2_base, z_base,
    D, BITS: tl.constexpr, AXIS_CHANNEL: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Stage 2 of one block ``x8 [BLOCK, DP]`` (int32) and packed store (``quant.bpq.quantize_stage2``/``pack_bits``)."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PPB: tl.constexpr = 8 // BITS
    BIG: tl.constexpr = 1 << 20
    if AXIS_CHANNEL:
        lo = tl.min(tl.where(valid, x8, BIG), axis=0)
        hi = tl.max(tl.where(valid, x8, -BIG), axis=0)
        s2 = tl.maximum((hi - lo + LEVELS - 1) // LEVELS, 1)
        q = (2 * (x8 - lo[None, :]) + s2[None, :]) // (2 * s2[None, :])
        tl.store(s2_base + d, s2.to(tl.uint8), mask=d < D)
        tl.store(z_base + d, lo.to(tl.int8), mask=d < D)
    else:
        lo = tl.min(tl.where(valid, x8, BIG), axis=1)
        hi = tl.max(tl.where(valid, x8, -BIG), axis=1)
        s2 = tl.maximum((hi - lo + LEVELS - 1) // LEVELS, 1)
        q = (2 * (x8 - lo[:, None]) + s2[:, None]) // (2 * s2[:, None])
        tl.store(s2_base + rows, s2.to(tl.uint8))
        tl.store(z_base + rows, lo.to(tl.int8))
    q = tl.where(valid, q, 0)
    if PPB == 1:
        tl.store(code_base + rows[:, None] * D + d[None, :], q.to(tl.uint8), mask=valid)
    else:
        NB: tl.constexpr = DP // PPB
        q3 = tl.reshape(q, (BLOCK, NB, PPB))
        sh = (tl.arange(0, PPB) * BITS)[None, None, :]
        packed = tl.sum(q3 << sh, axis=2)
        j = tl.arange(0, NB)
        tl.store(code_base + rows[:, None] * (D // PPB) + j[None, :], packed.to(tl.uint8), mask=j[None, :] < D // PPB)


@triton.jit
def _compress_kernel(
    k_ptr, v_ptr, sxb, sxh, sxt, sxd,
    hmap_ptr, n0,
    kc_ptr, ks_ptr, ks2_ptr, kz_ptr,
    vc_ptr, vs_ptr, vs2_ptr, vz_ptr,
    HB, CAP, D,
    BLOCK: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr,
    K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr,
):
    blk = tl.program_id(0)
    bj = tl.program_id(1)
    b = (bj // HB).to(tl.int64)  # 64-bit offsets: a pool passes 2^31 bytes at B=64, 128k, 8 heads
    j = bj % HB
    h = tl.load(hmap_ptr + j)
    rows = tl.arange(0, BLOCK)
    d = tl.arange(0, DP)
    valid = (rows[:, None] < BLOCK) & (d[None, :] < D)
    t = blk * BLOCK + rows
    src = b * sxb + h * sxh + t[:, None] * sxt + d[None, :] * sxd
    slot = (b * HB + j) * CAP + n0 + blk  # pool block index (pools are contiguous [B, HB, CAP, ...])
    PPB: tl.constexpr = 8 // BITS
    code_stride = BLOCK * (D // PPB)
    kg = D if K_CHANNEL else BLOCK
    vg = D if V_CHANNEL else BLOCK
    for which in tl.static_range(2):
        if which == 0:
            x = tl.load(k_ptr + src, mask=valid, other=0.0).to(tl.float32)
        else:
            x = tl.load(v_ptr + src, mask=valid, other=0.0).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        amax = tl.where(amax > 0, amax, 1.0)
        x8 = stage1_codes(x, stage1_inv(amax))
        scale = stage1_scale(amax)
        if which == 0:
            tl.store(ks_ptr + slot, scale)
            _stage2_pack_store(x8, valid, kc_ptr + slot * code_stride, rows, d, ks2_ptr + slot * kg,
                               kz_ptr + slot * kg, D, BITS, K_CHANNEL, DP, BLOCK)
        else:
            tl.store(vs_ptr + slot, scale)
            _stage2_pack_store(x8, valid, vc_ptr + slot * code_stride, rows, d, vs2_ptr + slot * vg,
                               vz_ptr + slot * vg, D, BITS, V_CHANNEL, DP, BLOCK)


def compress_into(layer, k: torch.Tensor, v: torch.Tensor) -> None:
    """BPQ of ``k, v [B, H, nb * block_size, D]`` into ``layer.pools`` at blocks ``layer.n_blocks ..`` (the caller
    advances ``n_blocks``). One launch per bit-width pool."""
    t = layer.turbo
    bs = t.block_size
    bsz, h, tok, d = k.shape
    nb = tok // bs
    if nb == 0:
        return
    if v.stride() != k.stride():
        v = v.contiguous()
        k = k.contiguous()
    for bits, idx in layer.groups.items():
        pool = layer.pools[bits]
        hb = idx.numel()
        if hb == 0:
            continue
        for name in ("k_codes", "v_codes", "k_scale", "v_scale", "k_s2", "k_zero", "v_s2", "v_zero"):
            if not pool[name].is_contiguous():
                raise ValueError(f"pool tensor {name} must be contiguous")
        cap = pool["k_scale"].shape[2]
        hmap = idx.to(device=k.device, dtype=torch.int32)
        _compress_kernel[(nb, bsz * hb)](
            k, v, *k.stride(), hmap, layer.n_blocks,
            pool["k_codes"], pool["k_scale"], pool["k_s2"], pool["k_zero"],
            pool["v_codes"], pool["v_scale"], pool["v_s2"], pool["v_zero"],
            hb, cap, d,
            BLOCK=bs, DP=next_pow2(d), BITS=bits,
            K_CHANNEL=t.k_axis == "channel", V_CHANNEL=t.v_axis == "channel", num_warps=4,
        )
