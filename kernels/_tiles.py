# ruff: noqa: E741
"""Tile-level pieces shared by the prefill and decode attention kernels.

* :func:`load_packed_tile`: ``BLOCK_N`` rows of a compressed block, unpacked from INT4/INT2 (or INT8) codes and
  rebuilt to INT8 with integer ops (``quant.bpq.unpack_bits`` + ``rebuild_stage2``), returned as int32.
* :func:`online_update`: one softmax tile of ``quant.attention.turbo_attention_reference``: running max, SAS or exp2,
  alpha = exact exponential, P at 1/127 (INT8 PV), FP16 or FP8 PV; masked scores never contribute.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import sas_exp_2, sas_exp_e

LOG2E_C = tl.constexpr(1.4426950408889634)


@triton.jit
def load_packed_raw(codes_ptr, s2_ptr, z_ptr, slot, r0, d, D,
                    BS: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, CHANNEL: tl.constexpr):
    """The HBM reads of :func:`load_packed_tile`, nothing else: ``(codes, s2, z)`` of rows ``r0 .. r0 + BLOCK_N`` of
    pool block ``slot``. ``codes``: the packed bytes ``[BLOCK_N, DP / (8 / BITS)]`` (``[BLOCK_N, DP]`` for 8 bits);
    ``s2, z``: ``[DP]`` per channel or ``[BLOCK_N]`` per token. Split from :func:`rebuild_packed` so that a loop can
    issue the next tile's reads before it computes on this one (software prefetch)."""
    PPB: tl.constexpr = 8 // BITS
    DP: tl.constexpr = d.shape[0]
    DPB: tl.constexpr = DP // PPB
    rows = r0 + tl.arange(0, BLOCK_N)
    DB = D // PPB
    jb = tl.arange(0, DPB)
    codes = tl.load(codes_ptr + slot * (BS * DB) + rows[:, None] * DB + jb[None, :], mask=(jb < DB)[None, :], other=0)
    if CHANNEL:
        dm = d < D
        s2 = tl.load(s2_ptr + slot * D + d, mask=dm, other=0)
        z = tl.load(z_ptr + slot * D + d, mask=dm, other=0)
    else:
        s2 = tl.load(s2_ptr + slot * BS + rows)
        z = tl.load(z_ptr + slot * BS + rows)
    return codes, s2, z


@triton.jit
def rebuild_packed(codes, s2, z, d, D, BLOCK_N: tl.constexpr, BITS: tl.constexpr, CHANNEL: tl.constexpr):
    """INT8 values (int32 ``[BLOCK_N, DP]``) from :func:`load_packed_raw`'s reads: unpack (``quant.bpq.unpack_bits``)
    and ``code * s2 + z`` (``rebuild_stage2``), integer ops only; padded channels are 0."""
    DP: tl.constexpr = d.shape[0]
    byte = codes.to(tl.int32)
    if BITS == 8:
        c = byte
    elif BITS == 4:
        # byte jb holds elements jb * PPB + i at bits i * BITS (quant/bpq.py layout): interleave with join/reshape
        c = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, DP))
    else:
        # join(join(c0, c2), join(c1, c3))[..., a, o] = c_{2a + o}: element order c0, c1, c2, c3
        c02 = tl.join(byte & 3, (byte >> 4) & 3)
        c13 = tl.join((byte >> 2) & 3, (byte >> 6) & 3)
        c = tl.reshape(tl.join(c02, c13), (BLOCK_N, DP))
    if CHANNEL:
        x = c * s2.to(tl.int32)[None, :] + z.to(tl.int32)[None, :]
    else:
        x = c * s2.to(tl.int32)[:, None] + z.to(tl.int32)[:, None]
    return tl.where((d < D)[None, :], x, 0)


@triton.jit
def load_packed_tile(codes_ptr, s2_ptr, z_ptr, slot, r0, d, D,
                     BS: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, CHANNEL: tl.constexpr):
    """Rows ``r0 .. r0 + BLOCK_N`` of pool block ``slot`` rebuilt to INT8 values (int32 ``[BLOCK_N, DP]``)."""
    codes, s2, z = load_packed_raw(codes_ptr, s2_ptr, z_ptr, slot, r0, d, D, BS, BLOCK_N, BITS, CHANNEL)
    return rebuild_packed(codes, s2, z, d, D, BLOCK_N, BITS, CHANNEL)


@triton.jit
def scores_int8(q8, k8, qs, ks):
    """``(Q8 . K8^T)`` exact in INT32, then ``(s * s_Q) * s_K`` in FP32. ``k8`` is ``[BLOCK_N, DP]`` int8."""
    s = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32)
    return (s.to(tl.float32) * qs[:, None]) * ks


@triton.jit
def online_update(acc, m_i, l_i, s, vis, v, v_scale,
                  EXP_MODE: tl.constexpr, PV_MODE: tl.constexpr, N_R: tl.constexpr, Y_R: tl.constexpr,
                  L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr,
                  L5: tl.constexpr, L6: tl.constexpr, L7: tl.constexpr, L8: tl.constexpr,
                  SKIP_EMPTY: tl.constexpr, MASKED: tl.constexpr = True, FOLD_V: tl.constexpr = False):
    """One tile of online softmax + PV. Scores ``s`` are in natural units for SAS base e (EXP_MODE 1), log2 units
    otherwise. ``v``: int8 ``[N, DP]`` (PV_MODE 0), fp16 already scaled (1), fp8 e4m3 of the INT8 codes (2);
    ``v_scale``: the tile's stage-1 V scale (unused for fp16 unless ``FOLD_V``). ``MASKED=False``: every key of the
    tile is visible to every row (``vis`` ignored). ``FOLD_V`` (fp16 PV): ``v`` holds the INT8 codes in fp16 (exact)
    and ``v_scale`` multiplies the FP32 product, instead of rounding ``V8 * s_V`` to fp16 first (one conversion per
    element less; the same function to within FP16 rounding of V)."""
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    x = m_safe[:, None] - s
    if EXP_MODE == 0:
        p = tl.exp2(-x)
        alpha = tl.exp2(m_i - m_safe)
    elif EXP_MODE == 1:
        p = sas_exp_e(x, N_R, L1, L2, L3, L4, L5, L6, L7, L8).to(tl.float32)
        alpha = tl.exp2((m_i - m_safe) * LOG2E_C)
    else:
        p = sas_exp_2(x, Y_R).to(tl.float32)
        alpha = tl.exp2(m_i - m_safe)
    alpha = tl.where(m_i == float("-inf"), 0.0, alpha)
    if MASKED:
        p = tl.where(vis, p, 0.0)
    if SKIP_EMPTY:
        any_p = tl.max(tl.max(p, axis=1), axis=0) > 0
    else:
        any_p = True
    if any_p:
        if PV_MODE == 0:
            p8 = tl.minimum(tl.floor(p * 127.0 + 0.5), 127.0)
            l_add = tl.sum(p8, axis=1) / 127.0
            o = tl.dot(p8.to(tl.int8), v, out_dtype=tl.int32).to(tl.float32) * (v_scale / 127.0)
        elif PV_MODE == 1:
            ph = p.to(tl.float16)
            l_add = tl.sum(ph.to(tl.float32), axis=1)
            o = tl.dot(ph, v, out_dtype=tl.float32)
            if FOLD_V:
                o = o * v_scale
        else:
            pf = (p * 448.0).to(tl.float8e4nv)
            l_add = tl.sum(pf.to(tl.float32), axis=1) / 448.0
            o = tl.dot(pf, v, out_dtype=tl.float32) * (v_scale / 448.0)
        l_i = alpha * l_i + l_add
        acc = alpha[:, None] * acc + o
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def prep_v(v8, v_scale, PV_MODE: tl.constexpr, FOLD_V: tl.constexpr = False):
    """INT8 V values (int32) -> the PV operand: int8, fp16(v8 * s_V) (fp16(v8) with ``FOLD_V``), or e4m3(v8)."""
    if PV_MODE == 0:
        return v8.to(tl.int8)
    elif PV_MODE == 1:
        if FOLD_V:
            return v8.to(tl.float16)
        return (v8.to(tl.float32) * v_scale).to(tl.float16)
    else:
        return v8.to(tl.float32).to(tl.float8e4nv)
