# ruff: noqa: E741
"""Tile-level pieces shared by the prefill and decode attention kernels.

* :func:`load_packed_tile`: ``BLOCK_N`` rows of a compressed block, unpacked from INT4/INT2 (or INT8) codes and
  rebuilt to INT8 with integer ops (``quant.bpq.unpack_bits`` + ``rebuild_stage2``), returned as int32.
* :func:`rebuild_packed_f16`: the same INT8 values built in FP16 arithmetic (decode: no int->float conversion).
* :func:`qk_dot`: a tile's exact ``Q . K^T`` (int32, or fp32 of fp16 integer operands), unscaled.
* :func:`online_update`: one softmax tile of ``quant.attention.turbo_attention_reference``: running max, SAS or exp2,
  alpha = exact exponential, P at 1/127 (INT8 PV), FP16 or FP8 PV; masked scores never contribute.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import e4m3_grid, sas_exp_2, sas_exp_e, to_e4m3

LOG2E_C = tl.constexpr(1.4426950408889634)


@triton.jit
def load_packed_raw(codes_ptr, s2_ptr, z_ptr, slot, r0, d, D,
                    BS: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, CHANNEL: tl.constexpr,
                    WORDS: tl.constexpr = False):
    """The HBM reads of :func:`load_packed_tile`, nothing else: ``(codes, s2, z)`` of rows ``r0 .. r0 + BLOCK_N`` of
    pool block ``slot``. ``codes``: the packed bytes ``[BLOCK_N, DP / (8 / BITS)]`` (``[BLOCK_N, DP]`` for 8 bits), or
    with ``WORDS`` the same bytes as little-endian int32 words ``[BLOCK_N, DP / (32 / BITS)]`` (needs ``D * BITS``
    divisible by 32 and a 4-byte aligned pool); ``s2, z``: ``[DP]`` per channel or ``[BLOCK_N]`` per token. Split from
    the rebuild so that a loop can issue the next tile's reads before it computes on this one (software prefetch)."""
    UNIT: tl.constexpr = 32 if WORDS else 8
    PPU: tl.constexpr = UNIT // BITS
    DP: tl.constexpr = d.shape[0]
    DPU: tl.constexpr = DP // PPU
    rows = r0 + tl.arange(0, BLOCK_N)
    DU = D // PPU
    ju = tl.arange(0, DPU)
    if WORDS:
        codes_ptr = codes_ptr.to(tl.pointer_type(tl.int32))
    codes = tl.load(codes_ptr + slot * (BS * DU) + rows[:, None] * DU + ju[None, :], mask=(ju < DU)[None, :], other=0)
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
def rebuild_packed_f16(codes, s2, z, BLOCK_N: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr,
                       CHANNEL: tl.constexpr, WORDS: tl.constexpr = False, ASM: tl.constexpr = False):
    """:func:`rebuild_packed` in FP16 arithmetic for 4- and 2-bit codes: the same INT8 values, exactly, as fp16
    ``[BLOCK_N, DP]`` (the operand of an FP16 dot, with no int->float conversion). A code ``c`` OR-ed into the
    mantissa of 1024.0 (fp16 bits 0x6400 | c) is the number 1024 + c; ``(x - 1024) * s2 + z`` then runs in FP16, two
    FMAs per pair of elements, and every value on the way is an integer of magnitude < 2048, so nothing rounds.
    ``codes``: bytes, or int32 words (``WORDS``, see :func:`word_codes_f16`). Padded channels (``d >= D``) are not
    zeroed: the query is 0 there and no output column beyond ``D`` is stored."""
    tl.static_assert(BITS == 4 or BITS == 2, "FP16 rebuild: 4- or 2-bit codes")
    if WORDS:
        # 1024 + code * 2^e (word_codes_f16) -> code: one FP16 FMA with 2^-e and -1024 * 2^-e (exact: powers of two)
        PPB: tl.constexpr = 8 // BITS
        inv = tl.exp2(-(BITS * (tl.arange(0, DP) % PPB)).to(tl.float32))
        x = word_codes_f16(codes, BLOCK_N, DP, BITS, ASM)
        x = x * inv.to(tl.float16)[None, :] + (-1024.0 * inv).to(tl.float16)[None, :]
    else:
        byte = codes.to(tl.int32)
        if BITS == 4:
            c = tl.reshape(tl.join((byte & 15) | 0x6400, (byte >> 4) | 0x6400), (BLOCK_N, DP))
        else:
            c02 = tl.join((byte & 3) | 0x6400, ((byte >> 4) & 3) | 0x6400)
            c13 = tl.join(((byte >> 2) & 3) | 0x6400, (byte >> 6) | 0x6400)
            c = tl.reshape(tl.join(c02, c13), (BLOCK_N, DP))
        x = c.to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    if CHANNEL:
        v = x * s2.to(tl.float16)[None, :] + z.to(tl.float16)[None, :]
    else:
        v = x * s2.to(tl.float16)[:, None] + z.to(tl.float16)[:, None]
    return v


def _planes_asm(bits: int) -> str:
    """PTX: one int32 word of ``32 / bits`` codes (bits 4 or 2) -> code k as the fp16 bits of ``1024 + code *
    2^(bits * (k % (8 / bits)))`` (int16 outputs ``$0 ..``, code k in output k). Per pair of neighbouring codes of one
    byte: a PRMT puts the byte into both 16-bit halves and a LOP3 keeps one code's bits in each half and ORs in 0x6400
    (1024.0), so the pair lands in one register in channel order (the FP16 dot takes neighbouring channels as one
    register)."""
    ppb, mask = 8 // bits, (1 << bits) - 1
    lines = ["{", ".reg .b32 t, u;"]
    out = 0
    for byte in range(4):
        lines.append(f"prmt.b32 u, ${32 // bits}, 0, {0x4040 | byte | byte << 8:#06x};")
        for p in range(0, ppb, 2):
            keep = (mask << bits * p) | (mask << bits * (p + 1)) << 16
            lines.append(f"lop3.b32 t, u, {keep:#010x}, 0x64006400, 0xea;")
            lines.append(f"mov.b32 {{${out}, ${out + 1}}}, t;")
            out += 2
    lines.append("}")
    return "\n".join(lines)


PLANES_ASM_2 = tl.constexpr(_planes_asm(2))
PLANES_ASM_4 = tl.constexpr(_planes_asm(4))


@triton.jit
def _plane(w, k: tl.constexpr, BITS: tl.constexpr):
    """Code ``k`` of every word of ``w`` as the fp16 bits of 1024 + code * 2^(BITS * (k % (8 / BITS))) (int16): the
    code kept at its bit position inside its byte, as :func:`_planes_asm` computes it, in plain Triton arithmetic."""
    PPB: tl.constexpr = 8 // BITS
    keep: tl.constexpr = ((1 << BITS) - 1) << (BITS * (k % PPB))
    return (((w >> (8 * (k // PPB))) & keep) | 0x6400).to(tl.int16)


@triton.jit
def _interleave4(a0, a1, a2, a3):
    """``[..., W]`` x4 -> ``[..., W, 2, 2]`` whose flat order is a0, a1, a2, a3 per word."""
    return tl.join(tl.join(a0, a2), tl.join(a1, a3))


@triton.jit
def _interleave8(a0, a1, a2, a3, a4, a5, a6, a7):
    return _interleave4(tl.join(a0, a4), tl.join(a1, a5), tl.join(a2, a6), tl.join(a3, a7))


@triton.jit
def word_codes_f16(w, BLOCK_N: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """int32 words ``[BLOCK_N, DP * BITS / 32]`` of 4- or 2-bit codes (``quant.bpq.pack_bits`` bytes, little-endian)
    -> fp16 ``[BLOCK_N, DP]`` holding ``1024 + code * 2^(BITS * (d % (8 / BITS)))`` for channel ``d``: each code
    OR-ed into the mantissa of 1024.0 at its bit position inside its byte, no int->float conversion
    (:func:`rebuild_packed_f16` undoes the power of two). ``ASM``: packed PTX, two codes per instruction (GPU); else
    plain Triton (the interpreter; the same values). The joins put neighbouring channels next to each other, in
    channel order."""
    if BITS == 4:
        if ASM:
            y0, y1, y2, y3, y4, y5, y6, y7 = tl.inline_asm_elementwise(
                PLANES_ASM_4, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(tl.int16,) * 8, is_pure=True, pack=1)
        else:
            y0, y1, y2, y3 = _plane(w, 0, 4), _plane(w, 1, 4), _plane(w, 2, 4), _plane(w, 3, 4)
            y4, y5, y6, y7 = _plane(w, 4, 4), _plane(w, 5, 4), _plane(w, 6, 4), _plane(w, 7, 4)
        c = _interleave8(y0, y1, y2, y3, y4, y5, y6, y7)
    else:
        if ASM:
            (y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14,
             y15) = tl.inline_asm_elementwise(PLANES_ASM_2, "=h," * 16 + "r", [w], dtype=(tl.int16,) * 16,
                                              is_pure=True, pack=1)
        else:
            y0, y1, y2, y3 = _plane(w, 0, 2), _plane(w, 1, 2), _plane(w, 2, 2), _plane(w, 3, 2)
            y4, y5, y6, y7 = _plane(w, 4, 2), _plane(w, 5, 2), _plane(w, 6, 2), _plane(w, 7, 2)
            y8, y9, y10, y11 = _plane(w, 8, 2), _plane(w, 9, 2), _plane(w, 10, 2), _plane(w, 11, 2)
            y12, y13, y14, y15 = _plane(w, 12, 2), _plane(w, 13, 2), _plane(w, 14, 2), _plane(w, 15, 2)
        c = _interleave8(tl.join(y0, y8), tl.join(y1, y9), tl.join(y2, y10), tl.join(y3, y11),
                         tl.join(y4, y12), tl.join(y5, y13), tl.join(y6, y14), tl.join(y7, y15))
    return tl.reshape(c, (BLOCK_N, DP)).to(tl.float16, bitcast=True)


@triton.jit
def load_packed_tile(codes_ptr, s2_ptr, z_ptr, slot, r0, d, D,
                     BS: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, CHANNEL: tl.constexpr):
    """Rows ``r0 .. r0 + BLOCK_N`` of pool block ``slot`` rebuilt to INT8 values (int32 ``[BLOCK_N, DP]``)."""
    codes, s2, z = load_packed_raw(codes_ptr, s2_ptr, z_ptr, slot, r0, d, D, BS, BLOCK_N, BITS, CHANNEL)
    return rebuild_packed(codes, s2, z, d, D, BLOCK_N, BITS, CHANNEL)


@triton.jit
def qk_dot(q, k):
    """``Q . K^T`` of one tile, exact: int32 for int8 ``q [M, DP]``, ``k [BLOCK_N, DP]`` (INT32 dot), or fp32 for fp16
    operands holding the same integers (FP32 dot, also exact: every partial sum is an integer below 2^24). The scores
    are this times the per-row scale ``s_Q * s_K`` (:func:`online_update` applies it)."""
    if q.dtype == tl.int8:
        return tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    return tl.dot(q, tl.trans(k), out_dtype=tl.float32)


@triton.jit
def online_update(acc, m_i, l_i, s, c, vis, v, v_scale,
                  EXP_MODE: tl.constexpr, PV_MODE: tl.constexpr, N_R: tl.constexpr, Y_R: tl.constexpr,
                  L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr,
                  L5: tl.constexpr, L6: tl.constexpr, L7: tl.constexpr, L8: tl.constexpr,
                  SKIP_EMPTY: tl.constexpr, MASKED: tl.constexpr = True, FOLD_V: tl.constexpr = False):
    """One tile of online softmax + PV. ``s``: the tile's raw dot (:func:`qk_dot`, int32 or integer-valued fp32
    ``[M, N]``); ``c``: fp32 ``[M]``, the scale of each row (``s_Q * s_K``, softmax scale folded in), so the scores are
    ``s * c`` in natural units for SAS base e (EXP_MODE 1), log2 units otherwise. The row maximum is taken on the raw
    integers (``c > 0``) and ``s * c - m`` is one FMA per score, so no score is scaled twice. ``v``: int8 ``[N, DP]``
    (PV_MODE 0), fp16 already scaled (1), fp8 e4m3 of the INT8 codes (2); ``v_scale``: the tile's stage-1 V scale
    (unused for fp16 unless ``FOLD_V``). ``MASKED=False``: every key of the tile is visible to every row (``vis``
    ignored). ``FOLD_V`` (fp16 PV): ``v`` holds the INT8 codes in fp16 (exact) and ``v_scale`` multiplies the FP32
    product, instead of rounding ``V8 * s_V`` to fp16 first (one conversion per element less; the same function to
    within FP16 rounding of V)."""
    if MASKED:
        lowest = -2147483648 if s.dtype == tl.int32 else float("-inf")
        s_max = tl.max(tl.where(vis, s, lowest), axis=1)
        m_tile = tl.where(s_max > lowest, s_max.to(tl.float32) * c, float("-inf"))
    else:
        m_tile = tl.max(s, axis=1).to(tl.float32) * c
    m_new = tl.maximum(m_i, m_tile)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if EXP_MODE == 0:
        p = tl.exp2(s.to(tl.float32) * c[:, None] - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
    else:
        x = m_safe[:, None] - s.to(tl.float32) * c[:, None]
        if EXP_MODE == 1:
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
            l_add = tl.sum(p, axis=1)  # on the FP32 p, before its FP16 rounding: no conversion back
            ph = p.to(tl.float16)
            o = tl.dot(ph, v, out_dtype=tl.float32)
            if FOLD_V:
                o = o * v_scale
        else:
            pf, l_add = fp8_probs(p)
            o = tl.dot(pf, v, out_dtype=tl.float32) * (v_scale / 448.0)
        l_i = alpha * l_i + l_add
        acc = alpha[:, None] * acc + o
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def fp8_probs(p):
    """Probabilities ``p [M, N]`` (fp32) -> the FP8 PV's A operand ``e4m3(448 p)`` and its row sums / 448 (fp32
    ``[M]``). The sums are taken on the values rounded onto the e4m3 grid in fp32 (:func:`_common.e4m3_grid`), so
    the e4m3 tensor is never converted back: compiled (Triton 3.6, sm_90), e4m3 -> fp32 of a tensor in the MMA
    accumulator's layout gave wrong values (row sums off by 1.8 relative in a one-tile kernel whose FP8 dot of the
    same tensor was right; kernels/NOTES.md)."""
    pr = e4m3_grid(p * 448.0)
    return to_e4m3(pr), tl.sum(pr, axis=1) / 448.0


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
        return to_e4m3(v8.to(tl.float32))
