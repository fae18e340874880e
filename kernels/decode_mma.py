"""Decode attention over the compressed blocks with the packed K/V codes unpacked straight into the registers of the
tensor-core MMA (``mma.sync``): no shared-memory round trip of the K/V tiles.

The Triton decode kernel (:mod:`.decode`) loads a tile's packed words in a blocked layout and lets Triton convert
the rebuilt FP16 tile to the MMA operand layout through shared memory, twice per tile (K and V), with barriers; on the
H100 that round trip, not the rebuild arithmetic, bounds it (``kernels/NOTES.md``). Here the layouts are explicit
(Triton's Gluon dialect): each lane loads exactly the code words whose channels (K) or keys (V) its MMA fragment
holds, and the unpacked codes are arranged by ``join``/``reshape``/``permute`` so that their layout *is* the operand
layout (the conversion is asserted to move no data). The reduction index of ``Q . K^T`` is a permutation of the
channels (Q is read in the same order) and the output columns of ``P . V`` a permutation of V's channels (undone by
the stores): a dot does not depend on the order of its reduction index.

One program is one warp: the ``G * Sq <= 16`` query rows of a (sequence, KV head) pair, one context split, its own
running max / sum / accumulator with no cross-warp reductions. It walks compressed tiles only and writes the split's
partial ``(acc, m, l)``; the Triton kernel then attends to the FP16 tail and merges every partial
(:func:`.decode.decode_layer`). Math: the Triton kernel's ``_walk_compressed`` with ``rebuild="words"``, FP16 P.V
on the INT8 codes (``fold_v``) and the hardware exp2 (the default configuration); scores are exact integers (FP16
operands holding the INT8 values, FP32 accumulation), so they are bit-identical to the integer rebuild.

Under ``TRITON_INTERPRET=1`` (CI, CPU) the same source runs as plain Triton: Gluon does not run in the interpreter,
so :data:`gl` is then a stand-in that ignores layouts (:class:`_PlainTriton`) and the packed PTX is replaced by its
plain-Triton twin (``ASM``).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ._launch import CachedLauncher
from ._tiles import _plane, _planes_asm

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _no_layout(*args, **kwargs):
    return None


class _PlainTriton:
    """``gl`` for the interpreter: Gluon's names as plain Triton; layouts are None, layout conversions the identity,
    the MMA ``tl.dot``. Looked up at call time (the interpreter patches ``tl`` while a kernel runs)."""

    DotOperandLayout = SliceLayout = staticmethod(_no_layout)

    def __getattr__(self, name):
        return getattr(tl, name)

    @staticmethod
    def arange(start, end, layout=None):
        return tl.arange(start, end)

    @staticmethod
    def convert_layout(value, layout, assert_trivial=False):
        return value

    @staticmethod
    def zeros(shape, dtype, layout=None):
        return tl.zeros(shape, dtype)

    @staticmethod
    def full(shape, value, dtype, layout=None):
        return tl.full(shape, value, dtype)


GLUON_ERROR = None  # why the compiled walk is unavailable (None: it is available)
if INTERPRET:
    gl = _PlainTriton()
    jit = triton.jit

    def mma_v2(a, b, acc):
        return tl.dot(a, b, acc)
else:
    try:  # Gluon, Triton's explicit-layout dialect: checked with Triton 3.6 (the GPU machine's version)
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import mma_v2

        jit = gluon.jit
    except Exception as exc:  # pragma: no cover - another Triton; decode_layer then keeps the Triton walk
        GLUON_ERROR = f"Gluon is not importable from Triton {triton.__version__} ({exc!r})"
        gl = _PlainTriton()
        jit = triton.jit

        def mma_v2(a, b, acc):
            return tl.dot(a, b, acc)


def _pair_asm(bits: int) -> str:
    """PTX: two int32 words ``a``, ``b`` of ``32 / bits`` codes (the same channels of two neighbouring keys) -> for
    each code j, the fp16 bits of ``1024 + code * 2^(bits * (j % (8 / bits)))`` of ``a`` and of ``b`` (outputs
    ``2j``, ``2j + 1``), the two keys in one register, the order the P.V operand wants. Per byte: one PRMT puts
    byte i of ``a`` and of ``b`` into the two 16-bit halves, one LOP3 per code keeps its bits and ORs in 0x6400."""
    ppb, mask = 8 // bits, (1 << bits) - 1
    n = 2 * (32 // bits)
    lines = ["{", ".reg .b32 t, u;"]
    out = 0
    for byte in range(4):
        lines.append(f"prmt.b32 u, ${n}, ${n + 1}, {byte | byte << 4 | (4 + byte) << 8 | (4 + byte) << 12:#06x};")
        for p in range(ppb):
            keep = (mask << bits * p) | (mask << bits * p) << 16
            lines.append(f"lop3.b32 t, u, {keep:#010x}, 0x64006400, 0xea;")
            lines.append(f"mov.b32 {{${out}, ${out + 1}}}, t;")
            out += 2
    lines.append("}")
    return "\n".join(lines)


# one int32 word of 8 codes -> channels (p, p + 4) as fp16 subnormals code * 2^(4 (p % 2)) * 2^-24, p = 0..3
# (outputs 2p, 2p + 1): two codes per AND, no FP16 arithmetic (the folded K operand of _walk_kernel)
SUBNORMAL_ASM_4 = tl.constexpr("""{
.reg .b32 t, u;
and.b32 t, $8, 0x000F000F;
mov.b32 {$0, $1}, t;
and.b32 t, $8, 0x00F000F0;
mov.b32 {$2, $3}, t;
shr.b32 u, $8, 8;
and.b32 t, u, 0x000F000F;
mov.b32 {$4, $5}, t;
and.b32 t, u, 0x00F000F0;
mov.b32 {$6, $7}, t;
}""")
PAIR_ASM_4 = tl.constexpr(_pair_asm(4))
PAIR_ASM_2 = tl.constexpr(_pair_asm(2))
WORD_ASM_4 = tl.constexpr(_planes_asm(4))
WORD_ASM_2 = tl.constexpr(_planes_asm(2))


@jit
def _stack8(y0, y1, y2, y3, y4, y5, y6, y7):
    """Eight tensors of one shape stacked along three new trailing axes of size 2: element ``[..., a, b, c]`` is
    ``y[4a + 2b + c]`` (so a reshape of the three axes into one of size 8 gives ``y[j]`` at ``j``)."""
    return gl.join(gl.join(gl.join(y0, y4), gl.join(y2, y6)), gl.join(gl.join(y1, y5), gl.join(y3, y7)))


@jit
def _word_codes(w, BITS: tl.constexpr, ASM: tl.constexpr):
    """int32 words ``[R, W]`` -> int16 ``[R, W, 2, 2, 2(, 2)]`` (:func:`_stack8` order, ``32 / BITS`` codes): code j of each word as the fp16 bits of
    ``1024 + code * 2^(BITS * (j % (8 / BITS)))`` (``_tiles.word_codes_f16``'s values, in code order)."""
    if BITS == 4:
        if ASM:
            ys = gl.inline_asm_elementwise(WORD_ASM_4, "=h," * 8 + "r", [w], dtype=(gl.int16,) * 8, is_pure=True,
                                           pack=1)
        else:
            ys = (_plane(w, 0, 4), _plane(w, 1, 4), _plane(w, 2, 4), _plane(w, 3, 4),
                  _plane(w, 4, 4), _plane(w, 5, 4), _plane(w, 6, 4), _plane(w, 7, 4))
        return _stack8(ys[0], ys[1], ys[2], ys[3], ys[4], ys[5], ys[6], ys[7])
    else:
        if ASM:
            ys = gl.inline_asm_elementwise(WORD_ASM_2, "=h," * 16 + "r", [w], dtype=(gl.int16,) * 16, is_pure=True,
                                           pack=1)
        else:
            ys = (_plane(w, 0, 2), _plane(w, 1, 2), _plane(w, 2, 2), _plane(w, 3, 2),
                  _plane(w, 4, 2), _plane(w, 5, 2), _plane(w, 6, 2), _plane(w, 7, 2),
                  _plane(w, 8, 2), _plane(w, 9, 2), _plane(w, 10, 2), _plane(w, 11, 2),
                  _plane(w, 12, 2), _plane(w, 13, 2), _plane(w, 14, 2), _plane(w, 15, 2))
        return gl.join(_stack8(ys[0], ys[2], ys[4], ys[6], ys[8], ys[10], ys[12], ys[14]),
                       _stack8(ys[1], ys[3], ys[5], ys[7], ys[9], ys[11], ys[13], ys[15]))


@jit
def _sub_plane(w, o: tl.constexpr):
    """Output ``o`` of :data:`SUBNORMAL_ASM_4` in plain Triton: channel ``o // 2 + 4 (o % 2)`` of each word kept at
    bit ``4 ((o // 2) % 2)`` of its 16-bit half, as int16 (the fp16 bits of a subnormal)."""
    p: tl.constexpr = o // 2
    half: tl.constexpr = o % 2
    return ((w >> (16 * half + 8 * (p // 2))) & (15 << (4 * (p % 2)))).to(tl.int16)


@jit
def _subnormal_codes(w, ASM: tl.constexpr):
    """int32 words ``[R, W]`` of 4-bit codes -> int16 ``[R, W, 2, 2, 2]`` (:func:`_stack8` order of the outputs
    ``o``): channel ``o // 2 + 4 (o % 2)`` of each word as the fp16 subnormal ``code * 2^(4 ((o // 2) % 2)) *
    2^-24``."""
    if ASM:
        ys = gl.inline_asm_elementwise(SUBNORMAL_ASM_4, "=h," * 8 + "r", [w], dtype=(gl.int16,) * 8, is_pure=True,
                                       pack=1)
    else:
        ys = (_sub_plane(w, 0), _sub_plane(w, 1), _sub_plane(w, 2), _sub_plane(w, 3),
              _sub_plane(w, 4), _sub_plane(w, 5), _sub_plane(w, 6), _sub_plane(w, 7))
    return _stack8(ys[0], ys[1], ys[2], ys[3], ys[4], ys[5], ys[6], ys[7])


@jit
def _pair_codes(wa, wb, BITS: tl.constexpr, ASM: tl.constexpr):
    """int32 words ``wa``, ``wb`` ``[R, W]`` of two keys -> int16 ``[R, W, 2, 2, 2(, 2), 2]``: the codes of each word
    in :func:`_stack8` order, then the key (``wa``, ``wb``) on the last axis; values as :func:`_word_codes`."""
    if not ASM:
        return gl.join(_word_codes(wa, BITS, False), _word_codes(wb, BITS, False))
    elif BITS == 4:
        ys = gl.inline_asm_elementwise(PAIR_ASM_4, "=h," * 16 + "r,r", [wa, wb], dtype=(gl.int16,) * 16,
                                       is_pure=True, pack=1)
        a = _stack8(ys[0], ys[2], ys[4], ys[6], ys[8], ys[10], ys[12], ys[14])
        b = _stack8(ys[1], ys[3], ys[5], ys[7], ys[9], ys[11], ys[13], ys[15])
    else:
        ys = gl.inline_asm_elementwise(PAIR_ASM_2, "=h," * 32 + "r,r", [wa, wb], dtype=(gl.int16,) * 32,
                                       is_pure=True, pack=1)
        a = gl.join(_stack8(ys[0], ys[4], ys[8], ys[12], ys[16], ys[20], ys[24], ys[28]),
                    _stack8(ys[2], ys[6], ys[10], ys[14], ys[18], ys[22], ys[26], ys[30]))
        b = gl.join(_stack8(ys[1], ys[5], ys[9], ys[13], ys[17], ys[21], ys[25], ys[29]),
                    _stack8(ys[3], ys[7], ys[11], ys[15], ys[19], ys[23], ys[27], ys[31]))
    return gl.join(a, b)


@jit
def _k_channel(k, PPW: tl.constexpr, WPL: tl.constexpr, FOLD_K: tl.constexpr):
    """Physical channel of reduction index ``k`` of the K operand (and of Q): lane ``c = (k // 2) % 4`` holds the
    ``WPL`` words ``c * WPL ..`` of each key row; the two codes of one register (``k % 2``) are neighbouring
    channels, or with ``FOLD_K`` channels ``p`` and ``p + 4`` of a word (:data:`SUBNORMAL_ASM_4`)."""
    j0 = k % 2
    c = (k // 2) % 4
    jh = (k // 8) % (PPW // 2)
    ww = k // (4 * PPW)
    if FOLD_K:
        return PPW * (c * WPL + ww) + jh + 4 * j0
    else:
        return PPW * (c * WPL + ww) + 2 * jh + j0


@jit
def _v_channel(n, PPW: tl.constexpr, WPG: tl.constexpr):
    """Physical channel of output column ``n`` of the P.V product: lane group ``g = n % 8`` holds the ``WPG`` words
    ``g * WPG ..`` of each key row."""
    g = n % 8
    j = (n // 8) % PPW
    wl = n // (8 * PPW)
    return PPW * (g * WPG + wl) + j


@jit
def _tile_base(bh, ti, CAP, TPB: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, DU: tl.constexpr):
    """Word offset of compressed tile ``ti`` of pool row ``bh`` in a code pool (``[rows, CAP, BS, DU]`` words)."""
    return (bh * CAP + ti // TPB) * (BS * DU) + (ti % TPB) * BLOCK_N * DU


@jit
def _load_k_words(kcw, base, kn, kwi, DU: tl.constexpr):
    """K code words ``[BLOCK_N, DU]`` of the tile at word offset ``base`` (in the KW layout of ``kn``/``kwi``)."""
    return gl.load(kcw + base + kn[:, None] * DU + kwi[None, :])


@jit
def _load_v_words(vcw, base, vkp, vwi, DU: tl.constexpr):
    """V code words of the tile at word offset ``base``: ``(even keys, odd keys)``, each ``[BLOCK_N / 2, DU]``."""
    wa = gl.load(vcw + base + (2 * vkp)[:, None] * DU + vwi[None, :])
    wb = gl.load(vcw + base + (2 * vkp + 1)[:, None] * DU + vwi[None, :])
    return wa, wb


def layouts(bits: int, dp: int, block_n: int = 64) -> dict:
    """The constexpr layouts of :func:`_walk_kernel` (one warp): the MMA accumulator and the layouts in which K's
    and V's code words are loaded, chosen so that the unpacked codes land in the MMA operand layouts (None under
    the interpreter, which ignores layouts)."""
    if INTERPRET or GLUON_ERROR:
        return dict(MMA=None, KW=None, VW=None)
    from triton.experimental.gluon import language as g

    ppw = 32 // bits
    du = dp // ppw
    wpl, wpg = du // 4, du // 8
    lg = lambda x: x.bit_length() - 1  # noqa: E731
    kw = g.DistributedLinearLayout(
        reg_bases=[[0, 1 << i] for i in range(lg(wpl))] + [[8 << i, 0] for i in range(lg(block_n // 8))],
        lane_bases=[[0, wpl], [0, 2 * wpl], [1, 0], [2, 0], [4, 0]], warp_bases=[], block_bases=[],
        shape=[block_n, du])
    vw = g.DistributedLinearLayout(
        reg_bases=[[0, 1 << i] for i in range(lg(wpg))] + [[4 << i, 0] for i in range(lg(block_n // 8))],
        lane_bases=[[1, 0], [2, 0], [0, wpg], [0, 2 * wpg], [0, 4 * wpg]], warp_bases=[], block_bases=[],
        shape=[block_n // 2, du])
    mma = g.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    return dict(MMA=mma, KW=kw, VW=vw)


@jit(do_not_specialize=["NSPLIT", "CAP", "n_comp", "q_start"])
def _walk_kernel(q_ptr, sqb, sqh, sqd, q_mult, Hq,
                 acc_ptr, m_ptr, l_ptr, NSPLIT, NPART,
                 hmap_ptr, pad_ptr,
                 kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, HB, CAP, n_comp,
                 q_start, D, window,
                 G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DP: tl.constexpr, BITS: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
                 MMA: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr):
    A_OP: tl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: tl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    PPW: tl.constexpr = 32 // BITS
    PPB: tl.constexpr = 8 // BITS
    DU: tl.constexpr = DP // PPW
    WPL: tl.constexpr = DU // 4
    WPG: tl.constexpr = DU // 8
    TPB: tl.constexpr = BS // BLOCK_N
    # 4-bit K: s2 (<= 16) folded into the query, |q s2| <= 119 * 16 < 2048 stays exact in FP16; the codes enter the
    # MMA as FP16 subnormals and the zero point as the accumulator's initial value (scores scaled by 2^-24, exact)
    FOLD_K: tl.constexpr = BITS == 4
    sp = gl.program_id(0)
    pid = gl.program_id(1)
    b = pid // HB
    j = pid % HB
    h = gl.load(hmap_ptr + j)

    # Q (one query token: row r is query head h * G + r), stage 1 in registers, in the A operand layout with the
    # channels in the K operand's order
    r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, A_OP))
    kq = _k_channel(gl.arange(0, DP, layout=gl.SliceLayout(0, A_OP)), PPW, WPL, FOLD_K)
    qf = gl.load(q_ptr + b * sqb + (h * G + r)[:, None] * sqh + kq[None, :] * sqd,
                 mask=(r < G)[:, None] & (kq < D)[None, :], other=0.0).to(gl.float32)
    q_amax = gl.max(gl.abs(qf), axis=1)
    q_amax = gl.where(q_amax > 0, q_amax, 1.0)
    inv = 119.0 * gl.div_rn(gl.full([BLOCK_M], 1.0, gl.float32, gl.SliceLayout(1, A_OP)), q_amax)
    qc = gl.floor(gl.abs(qf * inv[:, None]) + 0.5)
    qc = gl.minimum(gl.where(qf < 0, -qc, qc), 119.0)
    qc = gl.maximum(qc, -119.0)
    q16 = qc.to(gl.float16)
    qs = gl.div_rn(q_amax, gl.full([BLOCK_M], 119.0, gl.float32, gl.SliceLayout(1, A_OP))) * q_mult
    qs = gl.convert_layout(qs, gl.SliceLayout(1, MMA), assert_trivial=True)

    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, MMA))
    rvalid = rows < G
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA))
    qpos = q_start
    if HAS_PAD:
        pad_b = gl.load(pad_ptr + b)
    else:
        pad_b = 0

    # constant index vectors of the tile loads and the rebuild
    kn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, KW))
    kwi = gl.arange(0, DU, layout=gl.SliceLayout(0, KW))
    vkp = gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(1, VW))
    vwi = gl.arange(0, DU, layout=gl.SliceLayout(0, VW))
    if FOLD_K:
        q_pow = gl.exp2(-(4 * (kq % 2)).to(gl.float32)).to(gl.float16)  # undoes the code's position in its byte
    else:
        kch = _k_channel(gl.arange(0, DP, layout=gl.SliceLayout(1, B_OP)), PPW, WPL, FOLD_K)
        k_inv = gl.exp2(-(BITS * (kch % PPB)).to(gl.float32))
        k_mul = k_inv.to(gl.float16)
        k_add = (-1024.0 * k_inv).to(gl.float16)
    vch = _v_channel(gl.arange(0, DP, layout=gl.SliceLayout(0, B_OP)), PPW, WPG)
    v_inv = gl.exp2(-(BITS * (vch % PPB)).to(gl.float32))
    v_mul = v_inv.to(gl.float16)
    v_add = (-1024.0 * v_inv).to(gl.float16)
    vkey = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, B_OP))
    kcw = kc_ptr.to(gl.pointer_type(gl.int32))
    vcw = vc_ptr.to(gl.pointer_type(gl.int32))

    n_ct = n_comp * TPB
    tps = (n_ct + NSPLIT - 1) // NSPLIT
    t_begin = sp * tps
    t_end = gl.minimum(t_begin + tps, n_ct)
    bh = b * HB + j
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, MMA))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, MMA))
    acc = gl.zeros([BLOCK_M, DP], gl.float32, MMA)
    # software prefetch: the next tile's K words (PREFETCH >= 1) and V words (PREFETCH 2) are read while this tile
    # is computed; without it a tile's words are read at the top of its iteration
    t0 = _tile_base(bh, gl.minimum(t_begin, n_ct - 1), CAP, TPB, BS, BLOCK_N, DU)
    if PREFETCH >= 1:
        kwd_next = _load_k_words(kcw, t0, kn, kwi, DU)
    if PREFETCH >= 2:
        wa_next, wb_next = _load_v_words(vcw, t0, vkp, vwi, DU)
    for ti in range(t_begin, t_end):
        slot = bh * CAP + ti // TPB
        r0 = (ti % TPB) * BLOCK_N
        base = _tile_base(bh, ti, CAP, TPB, BS, BLOCK_N, DU)
        nxt = _tile_base(bh, gl.minimum(ti + 1, t_end - 1), CAP, TPB, BS, BLOCK_N, DU)
        if PREFETCH >= 1:
            kwd = kwd_next
            kwd_next = _load_k_words(kcw, nxt, kn, kwi, DU)
        else:
            kwd = _load_k_words(kcw, base, kn, kwi, DU)
        if PREFETCH >= 2:
            wa, wb = wa_next, wb_next
            wa_next, wb_next = _load_v_words(vcw, nxt, vkp, vwi, DU)
        else:
            wa, wb = _load_v_words(vcw, base, vkp, vwi, DU)
        vs2 = gl.load(vs2_ptr + slot * BS + r0 + vkey).to(gl.float16)
        vz = gl.load(vz_ptr + slot * BS + r0 + vkey).to(gl.float16)
        ksc = gl.load(ks_ptr + slot)
        vsc = gl.load(vs_ptr + slot)

        # K^T [DP, BLOCK_N]: codes -> (key, word group c, word, code pair, code) -> reduction index order
        if FOLD_K:
            kx = _subnormal_codes(kwd, ASM)
        else:
            kx = _word_codes(kwd, BITS, ASM)
        kx = gl.reshape(kx, [BLOCK_N, 4, WPL, PPW // 2, 2])
        kx = gl.reshape(gl.permute(kx, [0, 2, 3, 1, 4]), [BLOCK_N, DP])
        kt = gl.convert_layout(gl.permute(kx, [1, 0]).to(gl.float16, bitcast=True), B_OP, assert_trivial=True)
        if FOLD_K:
            ks2 = gl.load(ks2_ptr + slot * D + kq, mask=kq < D, other=0).to(gl.float16)
            kz = gl.load(kz_ptr + slot * D + kq, mask=kq < D, other=0).to(gl.float32)
            zq = gl.sum(qc * kz[None, :], axis=1) * 5.9604644775390625e-08  # sum_c q z * 2^-24, exact
            s0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, MMA) + gl.convert_layout(
                zq, gl.SliceLayout(1, MMA), assert_trivial=True)[:, None]
            s = mma_v2(q16 * (ks2 * q_pow)[None, :], kt, s0)
            c = qs * ksc * 16777216.0
        else:
            ks2 = gl.load(ks2_ptr + slot * D + kch, mask=kch < D, other=0).to(gl.float16)
            kz = gl.load(kz_ptr + slot * D + kch, mask=kch < D, other=0).to(gl.float16)
            kt = kt * k_mul[:, None] + k_add[:, None]
            kt = kt * ks2[:, None] + kz[:, None]
            s = mma_v2(q16, kt, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, MMA))
            c = qs * ksc
        kpos = ti * BLOCK_N + cols
        vis = rvalid[:, None] & (kpos >= pad_b)[None, :]
        if CAUSAL:
            vis = vis & (kpos <= qpos)[None, :]
        if HAS_WINDOW:
            vis = vis & (qpos - kpos < window)[None, :]
        s_max = gl.max(gl.where(vis, s, float("-inf")), axis=1)
        m_tile = gl.where(s_max > float("-inf"), s_max * c, float("-inf"))
        m_new = gl.maximum(m_i, m_tile)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * c[:, None] - m_safe[:, None])
        alpha = gl.where(m_i == float("-inf"), 0.0, gl.exp2(m_i - m_safe))
        p = gl.where(vis, p, 0.0)

        # V [BLOCK_N, DP]: (key pair, word group g, word, code, key) -> keys in order, columns permuted
        vx = gl.reshape(_pair_codes(wa, wb, BITS, ASM), [BLOCK_N // 2, 8, WPG, PPW, 2])
        vx = gl.reshape(gl.permute(vx, [0, 4, 2, 3, 1]), [BLOCK_N, DP])
        v = gl.convert_layout(vx.to(gl.float16, bitcast=True), B_OP)
        v = v * v_mul[None, :] + v_add[None, :]
        v = v * vs2[:, None] + vz[:, None]
        ph = gl.convert_layout(p.to(gl.float16), A_OP, assert_trivial=True)
        o = mma_v2(ph, v, gl.zeros([BLOCK_M, DP], gl.float32, MMA))
        l_i = alpha * l_i + gl.sum(p, axis=1)
        acc = alpha[:, None] * acc + o * vsc
        m_i = m_new

    # the split's partial, columns back in channel order
    prow = ((b * Hq + h * G + rows) * NPART + sp)
    gl.store(m_ptr + prow, m_i, mask=rvalid)
    gl.store(l_ptr + prow, l_i, mask=rvalid)
    och = _v_channel(gl.arange(0, DP, layout=gl.SliceLayout(0, MMA)), PPW, WPG)
    gl.store(acc_ptr + prow[:, None] * DP + och[None, :], acc, mask=rvalid[:, None])


# "auto" runs the walk with at least this many (sequence, KV head) pairs and (pairs x compressed tiles): its
# one-warp programs need many pairs to fill the GPU within 32 splits, and the second launch must pay (H100,
# eager calls, 32 q / 8 kv heads, hd 128, 4-bit: B=16 4k 75 vs 83 us, B=1 32k 97 vs 67 us; kernels/NOTES.md)
AUTO_MIN_PAIRS = 64
AUTO_MIN_TILES = 4096


def unsupported(query, layer, fold_v: bool = True, rebuild: str = "words") -> str | None:
    """Why :func:`_walk_kernel` does not compute this decode step (None when it does): one query token, head dim 64
    or 128, 4- or 2-bit pools (2-bit needs 128), 64-key tiles, K grouped per channel and V per token, the hardware
    exp2, FP16 P.V on the INT8 codes (``fold_v``, ``rebuild="words"``), at most 16 query heads per KV head."""
    turbo = layer.turbo
    bsz, hq, sq, d = query.shape
    g = hq // layer.num_heads
    checks = (
        (sq == 1, f"one query token per step (got {sq})"),
        (d in (64, 128), f"head dim 64 or 128 (got {d})"),
        (g <= 16, f"at most 16 query heads per KV head (got {g})"),
        (turbo.block_n == 64 and turbo.block_size % 64 == 0, "block_n = 64 dividing block_size"),
        (turbo.k_axis == "channel" and turbo.v_axis == "token", "k_axis='channel', v_axis='token'"),
        (turbo.exp == "exp2" and turbo.pv == "fp16", "exp='exp2' and pv='fp16'"),
        (fold_v and rebuild == "words", "fold_v=True and rebuild='words'"),
        (all(b in (2, 4) and d * b // 32 >= 8 for b, idx in layer.groups.items() if idx.numel()),
         f"4-bit pools, or 2-bit pools at head dim 128 (pools: {sorted(layer.groups)})"),
    )
    if GLUON_ERROR:
        return GLUON_ERROR
    for ok, need in checks:
        if not ok:
            return f"the MMA decode walk needs {need}"
    if any(layer.pools[b][f].data_ptr() % 16 for b, idx in layer.groups.items() if idx.numel()
           for f in ("k_codes", "v_codes")):
        return "the MMA decode walk needs 16-byte aligned code pools"
    return None


def walk_choice(walk: str, query, layer, *, fold_v: bool, rebuild: str, on_gpu: bool) -> bool:
    """Whether :func:`.decode.decode_layer` runs the walk (``walk``: "mma", "triton" or "auto", see there). What
    does not change from step to step is decided once per layer storage and query shape (``layer.kernel_cache``)."""
    if walk == "triton":
        return False
    if walk not in ("mma", "auto"):
        raise ValueError(f"decode_layer: walk must be 'auto', 'mma' or 'triton', got {walk!r}")
    key = ("walk_unsupported", query.shape, query.dtype, fold_v, rebuild)
    reason = layer.kernel_cache.get(key, False)
    if reason is False:
        reason = layer.kernel_cache[key] = unsupported(query, layer, fold_v, rebuild)
    if walk == "mma":
        if reason is not None:
            raise NotImplementedError(f"decode_layer(walk='mma'): {reason}")
        return True
    pairs = query.shape[0] * layer.num_heads
    tiles = pairs * layer.blocks_before * (layer.turbo.block_size // layer.turbo.block_n)
    return on_gpu and reason is None and pairs >= AUTO_MIN_PAIRS and tiles >= AUTO_MIN_TILES


PREFETCH = 1  # software prefetch of the next tile's words: 0 none, 1 K, 2 K and V (H100 A/B: kernels/NOTES.md)
_WALK = CachedLauncher(_walk_kernel)  # launched once per layer and pool per token: see _launch.py
# runtime arguments of _walk_kernel that change from step to step (the rest are fixed for a layer's pools)
_WALK_VARYING = ("q_ptr", "sqb", "sqh", "sqd", "NSPLIT", "NPART", "pad_ptr", "n_comp", "q_start")


def walk_constants(*, g: int, block_size: int, d: int, bits: int, causal: bool, has_pad: bool, has_window: bool,
                   on_gpu: bool) -> dict:
    """The constexprs and launch options of :func:`_walk_kernel` (the bound launch and eval/decode_sass's static
    compile use the same): ``ASM`` (packed PTX) when compiled, the module's :data:`PREFETCH`, one warp."""
    return dict(G=g, BS=block_size, BLOCK_M=16, BLOCK_N=64, DP=d, BITS=bits, CAUSAL=bool(causal), HAS_PAD=has_pad,
                HAS_WINDOW=has_window, ASM=on_gpu, PREFETCH=PREFETCH, **layouts(bits, d), num_warps=1)


def bind_walk(pool, hmap, partials, *, hq, d, q_mult, turbo, causal, has_pad, window, bits, g, on_gpu):
    """A :class:`~._launch.BoundLaunch` of :func:`_walk_kernel` over the heads ``hmap`` (int32) of one bit-width
    ``pool`` (``g`` query heads per KV head), writing split partials ``(acc, m, l)`` into ``partials``
    (``[B, Hq, 1, >= npart, DP]``, ``[B, Hq, 1, >= npart]`` x2, float32). Called as ``bound((nsplit, B * len(hmap)),
    query, sqb, sqh, sqd, nsplit, npart, pad, n_comp, q_start)``: ``nsplit`` splits of the ``n_comp`` compressed
    blocks, partials ``0 .. nsplit - 1`` of ``npart`` per row."""
    acc, m, l = partials
    fixed = dict(q_mult=q_mult, Hq=hq, acc_ptr=acc, m_ptr=m, l_ptr=l, hmap_ptr=hmap, kc_ptr=pool["k_codes"],
                 ks_ptr=pool["k_scale"], ks2_ptr=pool["k_s2"], kz_ptr=pool["k_zero"], vc_ptr=pool["v_codes"],
                 vs_ptr=pool["v_scale"], vs2_ptr=pool["v_s2"], vz_ptr=pool["v_zero"], HB=hmap.numel(),
                 CAP=pool["k_scale"].shape[2], D=d, window=window or 0)
    kwargs = walk_constants(g=g, block_size=turbo.block_size, d=d, bits=bits, causal=causal, has_pad=has_pad,
                            has_window=window is not None, on_gpu=on_gpu)
    return _WALK.bind(fixed, kwargs, _WALK_VARYING)
