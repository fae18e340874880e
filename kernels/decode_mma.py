"""Decode attention over the compressed blocks with the packed K/V codes unpacked straight into the registers of the
tensor-core MMA (``mma.sync``): no shared-memory round trip of the K/V tiles.

The Triton decode kernel (:mod:`.decode`) loads a tile's packed words in a blocked layout and lets Triton convert
the rebuilt FP16 tile to the MMA operand layout through shared memory, twice per tile (K and V), with barriers; on the
H100 that round trip, not the rebuild arithmetic, bounds it (``kernels/NOTES.md``). Here the layouts are explicit
(Triton's Gluon dialect): each lane loads exactly the code words whose channels (K) or keys (V) its MMA fragment
holds, and the unpacked codes are arranged by ``join``/``reshape``/``permute`` so that their layout *is* the operand
layout (the conversion is asserted to move no data). The reduction index of ``K . Q^T`` is a permutation of the
channels (Q is read in the same order) and the output rows of ``V^T . P^T`` a permutation of V's channels (undone by
the store): a dot does not depend on the order of its reduction index.

The products are transposed, keys in the MMA's M dimension and the ``G <= 16`` query heads of a KV head in N (8 or
16): an ``m16n8k16`` MMA then wastes at most half its N columns on padding heads instead of 12 of its 16 M rows,
which halves the MMAs, the accumulators and the softmax work per key. One program is one warp: the query heads of a
(sequence, KV head) pair, one context split, its own running max / sum / accumulator with no cross-warp reductions.
It walks compressed tiles only and writes the split's partial ``(acc, m, l)``; the Triton kernel then attends to the
FP16 tail and merges every partial (:func:`.decode.decode_layer`). Math: the Triton kernel's ``_walk_compressed``
with ``rebuild="words"``, FP16 P.V on the INT8 codes (``fold_v``) and the hardware exp2 (the default
configuration). Scores are exact integers (FP16 operands holding integers times powers of two, FP32 accumulation),
so they are bit-identical to the integer rebuild; P.V differs from the Triton kernel's only in where P is rounded
to FP16 (``p s2`` instead of ``p``, see :func:`_walk_kernel`).

Under ``TRITON_INTERPRET=1`` (CI, CPU) the same source runs as plain Triton: Gluon does not run in the interpreter,
so :data:`gl` is then a stand-in that ignores layouts (:class:`_PlainTriton`) and the packed PTX is replaced by its
plain-Triton twin (``ASM``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET
from ._launch import CachedLauncher
from ._tiles import _plane


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


# The PTX below works on registers of two FP16 values: each output ``$i`` is one 32-bit register whose halves are
# two elements of the operand the MMA wants in one register (``inline_asm_elementwise(..., pack=2)`` on a tensor
# whose last axis of size 2 is that pair), so that ptxas can place it straight into the MMA's operand registers.

def _k_subnormal_asm() -> str:
    """4-bit K: one int32 word of 8 codes (inputs ``$4``, ``$5``: the word twice) -> 4 registers, register ``p``
    holding channels ``p`` and ``p + 4`` as the FP16 subnormals ``code * 2^(4 (p % 2)) * 2^-24`` (one AND each, no
    FP16 arithmetic; the query absorbs the ``2^(4 (p % 2))``)."""
    return ("{\n.reg .b32 u;\nand.b32 $0, $4, 0x000F000F;\nand.b32 $1, $4, 0x00F000F0;\nshr.b32 u, $4, 8;\n"
            "and.b32 $2, u, 0x000F000F;\nand.b32 $3, u, 0x00F000F0;\n}")


def _k_rebuild_asm_2() -> str:
    """2-bit K: one int32 word of 16 codes (inputs ``$8``, ``$9``: the word twice) -> 8 registers, register ``m``
    holding codes ``2 m`` and ``2 m + 1`` as the FP16 values ``1024 + code * 4^(j % 4)`` (``_tiles``'s rebuild
    values; the 2-bit K operand is rebuilt in FP16). Per byte one PRMT, per register one LOP3."""
    lines = ["{", ".reg .b32 u;"]
    for byte in range(4):
        lines.append(f"prmt.b32 u, $8, 0, {0x4040 | byte | byte << 8:#06x};")
        for p in (0, 2):
            keep = (3 << 2 * p) | (3 << 2 * (p + 1)) << 16
            lines.append(f"lop3.b32 ${2 * byte + p // 2}, u, {keep:#010x}, 0x64006400, 0xea;")
    lines.append("}")
    return "\n".join(lines)


def _v_pair_asm(bits: int) -> str:
    """V: two int32 words (inputs ``$n``, ``$n + 1``: the same channels of two neighbouring keys ``a``, ``b``) ->
    one register per code ``j`` holding code ``j`` of ``a`` and of ``b`` as the FP16 subnormals ``code * 2^(bits (j %
    (8 / bits))) * 2^-24``: the key pair the P.V operand wants. Per byte one PRMT (byte i of ``a`` and of ``b`` in the
    two halves), per code one AND (no FP16 arithmetic: V's scale and zero point are applied to P and to the output,
    see :func:`_walk_kernel`)."""
    ppb, mask, n = 8 // bits, (1 << bits) - 1, 32 // bits
    lines = ["{", ".reg .b32 u;"]
    for byte in range(4):
        lines.append(f"prmt.b32 u, ${n}, ${n + 1}, {byte | byte << 4 | (4 + byte) << 8 | (4 + byte) << 12:#06x};")
        for p in range(ppb):
            lines.append(f"and.b32 ${byte * ppb + p}, u, {(mask << bits * p) * 0x10001:#010x};")
    lines.append("}")
    return "\n".join(lines)


def _channel_bytes_asm(fold: bool, xor: int, orr: int) -> str:
    """K's per-channel bytes (s2 or zero point): two int32 words (inputs ``$4``, ``$5``: channels ``8 w .. 8 w + 7``)
    -> 4 registers, register ``i`` holding the FP16 bit patterns ``(byte ^ xor) | orr`` of the channel pair the K
    operand holds in one register: ``(i, i + 4)`` with ``fold`` (:func:`_k_subnormal_asm`'s order), else ``(2 i,
    2 i + 1)``. Per register one PRMT and one LOP3 (``mask ? a ^ c : c``)."""
    c = (xor | orr) * 0x10001
    lines = ["{", ".reg .b32 u;"]
    for i in range(4):
        lo, hi = (i, 4 + i) if fold else (2 * i, 2 * i + 1)
        lines.append(f"prmt.b32 u, $4, $5, {lo | lo << 4 | hi << 8 | hi << 12:#06x};")
        lines.append(f"lop3.b32 ${i}, u, 0x00FF00FF, {c:#010x}, 0x6a;")
    lines.append("}")
    return "\n".join(lines)


K_SUB_ASM = tl.constexpr(_k_subnormal_asm())
K_REBUILD_ASM_2 = tl.constexpr(_k_rebuild_asm_2())
V_PAIR_ASM_4 = tl.constexpr(_v_pair_asm(4))
V_PAIR_ASM_2 = tl.constexpr(_v_pair_asm(2))
S2_SUB_ASM = tl.constexpr(_channel_bytes_asm(True, 0, 0))  # 4-bit K's s2 as FP16 subnormals s2 * 2^-24
Z_SUB_ASM = tl.constexpr(_channel_bytes_asm(True, 0x80, 0))  # 4-bit K's zero point as (z + 128) * 2^-24
S2_F16_ASM = tl.constexpr(_channel_bytes_asm(False, 0, 0x6400))  # 2-bit K's s2 as 1024 + s2
Z_F16_ASM = tl.constexpr(_channel_bytes_asm(False, 0x80, 0x6400))  # 2-bit K's zero point as 1024 + z + 128
# one register of two FP16 values: the warp's 8x8 fragment transposed (lane 4 g + c holds row g, columns 2 c,
# 2 c + 1 before and after)
TRANSPOSE_ASM = tl.constexpr("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;")


@jit
def _stack8(y0, y1, y2, y3, y4, y5, y6, y7):
    """Eight ``[N, 2]`` tensors -> ``[N, 8, 2]`` (``y[j]`` at ``[:, j]``)."""
    t = gl.join(gl.join(gl.join(y0, y4), gl.join(y2, y6)), gl.join(gl.join(y1, y5), gl.join(y3, y7)))
    return gl.reshape(gl.permute(t, [0, 2, 3, 4, 1]), [y0.shape[0], 8, 2])


@jit
def _stack4(y0, y1, y2, y3):
    """Four ``[N, 2]`` tensors -> ``[N, 4, 2]`` (``y[i]`` at ``[:, i]``)."""
    t = gl.join(gl.join(y0, y2), gl.join(y1, y3))
    return gl.reshape(gl.permute(t, [0, 2, 3, 1]), [y0.shape[0], 4, 2])


@jit
def _half_pair(lo, hi):
    """Two int16 tensors of FP16 bit patterns -> FP16 ``[..., 2]`` (the plain-Triton twin of one output register)."""
    return gl.join(lo, hi).to(gl.float16, bitcast=True)


@jit
def _code_bits(w, j: tl.constexpr, BITS: tl.constexpr):
    """Code ``j`` of every int32 word of ``w`` kept at its bit position inside its byte, as int16: the FP16 bits of
    the subnormal ``code * 2^(BITS * (j % (8 / BITS))) * 2^-24``."""
    PPB: tl.constexpr = 8 // BITS
    return ((w >> (8 * (j // PPB))) & (((1 << BITS) - 1) << (BITS * (j % PPB)))).to(tl.int16)


@jit
def _k_codes(w, BITS: tl.constexpr, ASM: tl.constexpr):
    """K code words ``[N]`` (int32) -> FP16 ``[N, PPW]``: code pairs in the order of :func:`_k_channel`'s
    reduction index within a word (4-bit: channels ``p, p + 4`` as subnormals, :func:`_k_subnormal_asm`; 2-bit:
    neighbouring codes as ``1024 + code * 4^(j % 4)``, :func:`_k_rebuild_asm_2`)."""
    if BITS == 4:
        if ASM:
            ys = gl.inline_asm_elementwise(K_SUB_ASM, "=r," * 4 + "r,r", [gl.join(w, w)], dtype=(gl.float16,) * 4,
                                           is_pure=True, pack=2)
        else:
            ys = (_half_pair(_code_bits(w, 0, 4), _code_bits(w, 4, 4)),
                  _half_pair(_code_bits(w, 1, 4), _code_bits(w, 5, 4)),
                  _half_pair(_code_bits(w, 2, 4), _code_bits(w, 6, 4)),
                  _half_pair(_code_bits(w, 3, 4), _code_bits(w, 7, 4)))
        return gl.reshape(_stack4(ys[0], ys[1], ys[2], ys[3]), [w.shape[0], 8])
    else:
        if ASM:
            ys = gl.inline_asm_elementwise(K_REBUILD_ASM_2, "=r," * 8 + "r,r", [gl.join(w, w)],
                                           dtype=(gl.float16,) * 8, is_pure=True, pack=2)
        else:
            ys = (_half_pair(_plane(w, 0, 2), _plane(w, 1, 2)), _half_pair(_plane(w, 2, 2), _plane(w, 3, 2)),
                  _half_pair(_plane(w, 4, 2), _plane(w, 5, 2)), _half_pair(_plane(w, 6, 2), _plane(w, 7, 2)),
                  _half_pair(_plane(w, 8, 2), _plane(w, 9, 2)), _half_pair(_plane(w, 10, 2), _plane(w, 11, 2)),
                  _half_pair(_plane(w, 12, 2), _plane(w, 13, 2)), _half_pair(_plane(w, 14, 2), _plane(w, 15, 2)))
        return gl.reshape(_stack8(ys[0], ys[1], ys[2], ys[3], ys[4], ys[5], ys[6], ys[7]), [w.shape[0], 16])


@jit
def _v_pair(wa, wb, j: tl.constexpr, BITS: tl.constexpr):
    """Plain-Triton twin of :func:`_v_pair_asm`'s register ``j``."""
    return _half_pair(_code_bits(wa, j, BITS), _code_bits(wb, j, BITS))


@jit
def _v_codes(wa, wb, BITS: tl.constexpr, ASM: tl.constexpr):
    """V code words ``[N]`` (int32) of two neighbouring keys -> FP16 ``[N, PPW, 2]``: code ``j`` of each key
    (:func:`_v_pair_asm`'s subnormals), the key on the last axis."""
    if BITS == 4:
        if ASM:
            ys = gl.inline_asm_elementwise(V_PAIR_ASM_4, "=r," * 8 + "r,r", [gl.join(wa, wb)],
                                           dtype=(gl.float16,) * 8, is_pure=True, pack=2)
        else:
            ys = (_v_pair(wa, wb, 0, 4), _v_pair(wa, wb, 1, 4), _v_pair(wa, wb, 2, 4), _v_pair(wa, wb, 3, 4),
                  _v_pair(wa, wb, 4, 4), _v_pair(wa, wb, 5, 4), _v_pair(wa, wb, 6, 4), _v_pair(wa, wb, 7, 4))
        return _stack8(ys[0], ys[1], ys[2], ys[3], ys[4], ys[5], ys[6], ys[7])
    else:
        if ASM:
            ys = gl.inline_asm_elementwise(V_PAIR_ASM_2, "=r," * 16 + "r,r", [gl.join(wa, wb)],
                                           dtype=(gl.float16,) * 16, is_pure=True, pack=2)
        else:
            ys = (_v_pair(wa, wb, 0, 2), _v_pair(wa, wb, 1, 2), _v_pair(wa, wb, 2, 2), _v_pair(wa, wb, 3, 2),
                  _v_pair(wa, wb, 4, 2), _v_pair(wa, wb, 5, 2), _v_pair(wa, wb, 6, 2), _v_pair(wa, wb, 7, 2),
                  _v_pair(wa, wb, 8, 2), _v_pair(wa, wb, 9, 2), _v_pair(wa, wb, 10, 2), _v_pair(wa, wb, 11, 2),
                  _v_pair(wa, wb, 12, 2), _v_pair(wa, wb, 13, 2), _v_pair(wa, wb, 14, 2), _v_pair(wa, wb, 15, 2))
        lo = _stack8(ys[0], ys[2], ys[4], ys[6], ys[8], ys[10], ys[12], ys[14])  # even codes
        hi = _stack8(ys[1], ys[3], ys[5], ys[7], ys[9], ys[11], ys[13], ys[15])  # odd codes
        return gl.reshape(gl.permute(gl.join(lo, hi), [0, 1, 3, 2]), [wa.shape[0], 16, 2])


@jit
def _byte_half(e, o, byte: tl.constexpr, XOR: tl.constexpr, OR: tl.constexpr):
    """Byte ``byte`` of the word pair ``(e, o)`` as the int16 ``(byte ^ XOR) | OR`` (plain twin of one half of
    :func:`_channel_bytes_asm`)."""
    if byte < 4:
        x = e >> (8 * byte)
    else:
        x = o >> (8 * (byte - 4))
    return (((x & 0xFF) ^ XOR) | OR).to(tl.int16)


@jit
def _byte_pair(e, o, i: tl.constexpr, FOLD: tl.constexpr, XOR: tl.constexpr, OR: tl.constexpr):
    """Plain-Triton twin of :func:`_channel_bytes_asm`'s register ``i``."""
    if FOLD:
        return _half_pair(_byte_half(e, o, i, XOR, OR), _byte_half(e, o, i + 4, XOR, OR))
    else:
        return _half_pair(_byte_half(e, o, 2 * i, XOR, OR), _byte_half(e, o, 2 * i + 1, XOR, OR))


@jit
def _channel_bytes(ptr, row, cw, ASM_TEXT: tl.constexpr, FOLD: tl.constexpr, XOR: tl.constexpr,
                   OR: tl.constexpr, DP: tl.constexpr, ASM: tl.constexpr):
    """One row of a per-channel byte array (K's s2 or zero point of one block: ``DP`` bytes at ``ptr + row * DP``)
    -> FP16 ``[DP]`` in the K operand's reduction order (:func:`_k_channel`), the bit patterns ``(byte ^ XOR) |
    OR``. Read as int32 words (``cw``: ``0 .. DP / 4`` in the layout that gives each lane its 32 channels), two
    channels per register by :func:`_channel_bytes_asm` (``ASM_TEXT``) on each even/odd word pair."""
    w = gl.reshape(gl.load(ptr.to(gl.pointer_type(gl.int32)) + row * (DP // 4) + cw), [DP // 8, 2])
    if ASM:
        ys = gl.inline_asm_elementwise(ASM_TEXT, "=r," * 4 + "r,r", [w], dtype=(gl.float16,) * 4, is_pure=True,
                                       pack=2)
    else:
        e, o = gl.split(w)
        ys = (_byte_pair(e, o, 0, FOLD, XOR, OR), _byte_pair(e, o, 1, FOLD, XOR, OR),
              _byte_pair(e, o, 2, FOLD, XOR, OR), _byte_pair(e, o, 3, FOLD, XOR, OR))
    t = _stack4(ys[0], ys[1], ys[2], ys[3])  # [DP / 8, 4, 2]: register i, half
    if FOLD:  # pair w = 4 c + ww (c: the lane's 32 channels) holds channels 8 w + i (+ 4)
        t = gl.permute(gl.reshape(t, [4, DP // 32, 4, 2]), [1, 2, 0, 3])
    else:  # pair w = 4 c + 2 ww + jhh holds channels 8 w + 2 i (+ 1)
        t = gl.permute(gl.reshape(t, [4, DP // 64, 2, 4, 2]), [1, 2, 3, 0, 4])
    return gl.reshape(t, [DP])


@jit
def _k_channel(k, PPW: tl.constexpr, WPL: tl.constexpr, FOLD_K: tl.constexpr):
    """Physical channel of reduction index ``k`` of the K operand (and of Q): lane ``c = (k // 2) % 4`` holds the
    ``WPL`` words ``c * WPL ..`` of each key row; the two codes of one register (``k % 2``) are neighbouring
    channels, or with ``FOLD_K`` channels ``p`` and ``p + 4`` of a word (:func:`_k_subnormal_asm`)."""
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
def _tile_base(ti, TPB: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, DU: tl.constexpr):
    """Word offset of compressed tile ``ti`` from the start of its pool row (``[CAP, BS, DU]`` words)."""
    return (ti // TPB) * (BS * DU) + (ti % TPB) * BLOCK_N * DU


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
    and V's code words (KW, VW) and K's per-channel bytes (CW) are loaded, chosen so that the unpacked values land in
    the MMA operand layouts (None under the interpreter, which ignores layouts)."""
    if INTERPRET or GLUON_ERROR:
        return dict(MMA=None, KW=None, VW=None, CW=None)
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
    wpc = dp // 16  # K's per-channel bytes as words: lane c = lane % 4 reads its 32 channels' words
    cw = g.DistributedLinearLayout(
        reg_bases=[[1 << i] for i in range(lg(wpc))], lane_bases=[[wpc], [2 * wpc], [0], [0], [0]],
        warp_bases=[], block_bases=[], shape=[dp // 4])
    mma = g.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    return dict(MMA=mma, KW=kw, VW=vw, CW=cw)


@jit
def _reciprocal(x, ASM: tl.constexpr):
    """``1 / x`` (FP32; the approximate reciprocal, 1 ulp, when compiled)."""
    if ASM:
        return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 / x


@jit
def _rows4(x):
    """``[16, H]`` -> ``[64, H]``: the rows repeated four times (row ``16 i + r`` is row ``r``)."""
    y = gl.join(gl.join(x, x), gl.join(x, x))
    return gl.reshape(gl.permute(y, [2, 3, 0, 1]), [4 * x.shape[0], x.shape[1]])


@jit
def _transpose_p(p, B_OP: tl.constexpr, ASM: tl.constexpr):
    """P ``[BLOCK_N, H]`` (fp16, in the MMA accumulator layout: keys in rows) -> the B operand ``[BLOCK_N, H]`` of
    ``V^T . P^T``. The accumulator gives lane ``4 g + c`` keys ``g + 8 i`` and heads ``2 c, 2 c + 1``; the operand
    wants keys ``2 c, 2 c + 1 (+ 8 i)`` and head ``g``: one ``movmatrix`` transposes each 8x8 fragment, and the
    result is relabelled (fragment ``(kb, hb)``'s element at row ``g``, column ``2 c + e`` is
    ``P[8 kb + 2 c + e, 8 hb + g]``) so that its layout is the operand's."""
    if ASM:
        t = gl.inline_asm_elementwise(TRANSPOSE_ASM, "=r,r", [p], dtype=gl.float16, is_pure=True, pack=2)
        t = gl.reshape(t, [p.shape[0] // 8, 8, p.shape[1] // 8, 4, 2])
        t = gl.reshape(gl.permute(t, [0, 3, 4, 2, 1]), [p.shape[0], p.shape[1]])
        return gl.convert_layout(t, B_OP, assert_trivial=True)
    else:
        return gl.convert_layout(p, B_OP)


@jit(do_not_specialize=["NSPLIT", "CAP", "n_comp", "q_start"])
def _walk_kernel(q_ptr, sqb, sqh, sqd, q_mult, Hq,
                 acc_ptr, m_ptr, l_ptr, NSPLIT, NPART,
                 hmap_ptr, pad_ptr,
                 kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, HB, CAP, n_comp,
                 q_start, D, window,
                 G: tl.constexpr, BS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                 DP: tl.constexpr, BITS: tl.constexpr, HAS_PAD: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
                 MMA: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr, CW: tl.constexpr):
    """One program: the ``G`` query heads of a (sequence, KV head) pair, one split of its compressed tiles.

    Transposed products, keys in the MMA's M dimension and heads in N (``BLOCK_H`` = 8 or 16 >= G):
    ``S^T [BLOCK_N, BLOCK_H] = K [BLOCK_N, DP] . Q^T [DP, BLOCK_H]`` and ``O^T [DP, BLOCK_H] = V^T [DP, BLOCK_N] .
    P^T [BLOCK_N, BLOCK_H]`` (P^T from the score accumulator by :func:`_transpose_p`). V's codes enter as FP16
    subnormals: its per-token scale ``s2`` is folded into P (``p s2`` rounded to FP16 once, as P alone is), its zero
    point is the per-head sum ``sum_n fp16(p_n s2_n) z_n / s2_n`` (the same rounded values: each key's rounding
    stays relative to its value ``s2 code + z``) added to every output row, and each channel's position in its byte
    (``2^(BITS j)``) with the subnormal unit ``2^-24`` is undone once, at the store. The query token sits after every
    compressed key (decode: no causal mask inside the compressed blocks)."""
    A_OP: tl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: tl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    PPW: tl.constexpr = 32 // BITS
    PPB: tl.constexpr = 8 // BITS
    DU: tl.constexpr = DP // PPW
    WPL: tl.constexpr = DU // 4
    WPG: tl.constexpr = DU // 8
    TPB: tl.constexpr = BS // BLOCK_N
    MASKED: tl.constexpr = HAS_PAD or HAS_WINDOW
    # 4-bit K: s2 (<= 16) folded into the query, |q s2| <= 119 * 16 < 2048 stays exact in FP16; the codes enter the
    # MMA as FP16 subnormals and the zero point as the accumulator's initial value (scores scaled by 2^-39, exact)
    FOLD_K: tl.constexpr = BITS == 4
    sp = gl.program_id(0)
    pid = gl.program_id(1)
    b = pid // HB
    j = pid % HB
    h = gl.load(hmap_ptr + j)

    # Q^T (one query token: column r is query head h * G + r), stage 1 in registers, in the B operand layout with
    # the channels in the K operand's order
    hq = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, B_OP))
    kq = _k_channel(gl.arange(0, DP, layout=gl.SliceLayout(1, B_OP)), PPW, WPL, FOLD_K)
    qf = gl.load(q_ptr + b * sqb + (h * G + hq)[None, :] * sqh + kq[:, None] * sqd, mask=(hq < G)[None, :],
                 other=0.0).to(gl.float32)
    q_amax = gl.max(gl.abs(qf), axis=0)
    q_amax = gl.where(q_amax > 0, q_amax, 1.0)
    inv = 119.0 * gl.div_rn(gl.full([BLOCK_H], 1.0, gl.float32, gl.SliceLayout(0, B_OP)), q_amax)
    qc = gl.floor(gl.abs(qf * inv[None, :]) + 0.5)
    qc = gl.minimum(gl.where(qf < 0, -qc, qc), 119.0)
    qc = gl.maximum(qc, -119.0)
    q16 = qc.to(gl.float16)
    qs = gl.div_rn(q_amax, gl.full([BLOCK_H], 119.0, gl.float32, gl.SliceLayout(0, B_OP))) * q_mult
    qs = gl.convert_layout(qs, gl.SliceLayout(0, MMA))

    heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, MMA))
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
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
    cw = gl.arange(0, DP // 4, layout=CW)
    if FOLD_K:
        # scores in units of 2^-39: Q^T times 2^9 (and 2^-4 on the channels whose code sits in a byte's high
        # nibble) times s2 * 2^-24 stays exact in FP16 (q s2 < 2048); the zero point's dot uses Q^T times 2^-15
        # against (z + 128) * 2^-24, its -128 sum_c q folded into that MMA's initial value
        q_k = q16 * gl.exp2((9 - 4 * (kq % 2)).to(gl.float32)).to(gl.float16)[:, None]
        q_z = q16 * 3.0517578125e-05
        z_init = gl.zeros([16, BLOCK_H], gl.float32, MMA) + gl.convert_layout(
            gl.sum(qc, axis=0) * -2.3283064365386963e-10, gl.SliceLayout(0, MMA))[None, :]
        z_rows = gl.zeros([16, DP], gl.float16, A_OP)
    else:
        ka = _k_channel(gl.arange(0, DP, layout=gl.SliceLayout(0, A_OP)), PPW, WPL, FOLD_K)
        k_inv = gl.exp2(-(BITS * (ka % PPB)).to(gl.float32))
        k_mul = k_inv.to(gl.float16)
        k_add = (-1024.0 * k_inv).to(gl.float16)
    # the pair's pool row (blocks [row0, row0 + CAP)): its offsets in 64 bits, once (a pool passes 2^31 bytes at
    # B=64 128k), the tile offsets from there in 32 bits
    row0 = (b.to(gl.int64) * HB + j) * CAP
    kcw = kc_ptr.to(gl.pointer_type(gl.int32)) + row0 * (BS * DU)
    vcw = vc_ptr.to(gl.pointer_type(gl.int32)) + row0 * (BS * DU)
    ks_ptr += row0
    vs_ptr += row0
    ks2_ptr += row0 * DP
    kz_ptr += row0 * DP
    vs2_ptr += row0 * BS
    vz_ptr += row0 * BS

    n_ct = n_comp * TPB
    tps = (n_ct + NSPLIT - 1) // NSPLIT
    t_begin = sp * tps
    t_end = gl.minimum(t_begin + tps, n_ct)
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(0, MMA))
    l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(0, MMA))
    z_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(0, MMA))  # V's zero point: running sum_n fp16(p s2) z / s2 vsc
    acc = gl.zeros([DP, BLOCK_H], gl.float32, MMA)
    # software prefetch: the next tile's K words (PREFETCH >= 1) and V words (PREFETCH 2) are read while this tile
    # is computed; without it a tile's words are read at the top of its iteration
    t0 = _tile_base(gl.minimum(t_begin, n_ct - 1), TPB, BS, BLOCK_N, DU)
    if PREFETCH >= 1:
        kwd_next = _load_k_words(kcw, t0, kn, kwi, DU)
    if PREFETCH >= 2:
        wa_next, wb_next = _load_v_words(vcw, t0, vkp, vwi, DU)
    for ti in range(t_begin, t_end):
        slot = ti // TPB  # block within the pair's row
        r0 = (ti % TPB) * BLOCK_N
        base = _tile_base(ti, TPB, BS, BLOCK_N, DU)
        nxt = _tile_base(gl.minimum(ti + 1, t_end - 1), TPB, BS, BLOCK_N, DU)
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
        vs2 = gl.load(vs2_ptr + slot * BS + r0 + keys).to(gl.float32)
        vz = gl.load(vz_ptr + slot * BS + r0 + keys).to(gl.float32)
        ksc = gl.load(ks_ptr + slot)
        vsc = gl.load(vs_ptr + slot)

        # K [BLOCK_N, DP]: codes -> (key, word group c, word, code pair, code) -> reduction index order
        kx = gl.reshape(_k_codes(gl.reshape(kwd, [BLOCK_N * DU]), BITS, ASM), [BLOCK_N, 4, WPL, PPW // 2, 2])
        kx = gl.reshape(gl.permute(kx, [0, 2, 3, 1, 4]), [BLOCK_N, DP])
        ka_op = gl.convert_layout(kx, A_OP, assert_trivial=True)
        if FOLD_K:
            # Q^T scaled by K's per-channel s2; the zero point's dot sum_c q z (exact: FP16 integers, FP32 sums)
            # as one more MMA whose 16 rows all hold z, its result the score accumulator's initial value
            s2 = _channel_bytes(ks2_ptr, slot, cw, S2_SUB_ASM, True, 0, 0, DP, ASM)
            s2 = gl.convert_layout(s2, gl.SliceLayout(1, B_OP))
            z = _channel_bytes(kz_ptr, slot, cw, Z_SUB_ASM, True, 0x80, 0, DP, ASM)
            z = gl.convert_layout(z, gl.SliceLayout(0, A_OP))
            z_op, _ = gl.broadcast(z[None, :], z_rows)
            zq = mma_v2(z_op, q_z, z_init)
            s = mma_v2(ka_op, q_k * s2[:, None], gl.convert_layout(_rows4(zq), MMA))
            c = qs * ksc * 549755813888.0
        else:
            s2 = _channel_bytes(ks2_ptr, slot, cw, S2_F16_ASM, False, 0, 0x6400, DP, ASM)
            s2 = gl.convert_layout(s2, gl.SliceLayout(0, A_OP)) - 1024.0
            z = _channel_bytes(kz_ptr, slot, cw, Z_F16_ASM, False, 0x80, 0x6400, DP, ASM)
            z = gl.convert_layout(z, gl.SliceLayout(0, A_OP)) - 1152.0
            kt = ka_op * k_mul[None, :] + k_add[None, :]
            kt = kt * s2[None, :] + z[None, :]
            s = mma_v2(kt, q16, gl.zeros([BLOCK_N, BLOCK_H], gl.float32, MMA))
            c = qs * ksc
        if MASKED:
            kpos = ti * BLOCK_N + keys
            vis = kpos >= pad_b
            if HAS_WINDOW:
                vis = vis & (qpos - kpos < window)
            s_max = gl.max(gl.where(vis[:, None], s, float("-inf")), axis=0)
            m_tile = gl.where(s_max > float("-inf"), s_max * c, float("-inf"))
        else:
            m_tile = gl.max(s, axis=0) * c
        m_new = gl.maximum(m_i, m_tile)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * c[None, :] - m_safe[None, :])
        if MASKED:
            p = gl.where(vis[:, None], p, 0.0)
        alpha = gl.exp2(m_i - m_safe)

        # V^T [DP, BLOCK_N]: (key pair, word group g, word, code, key) -> rows permuted, keys in order
        vx = _v_codes(gl.reshape(wa, [BLOCK_N // 2 * DU]), gl.reshape(wb, [BLOCK_N // 2 * DU]), BITS, ASM)
        vx = gl.reshape(vx, [BLOCK_N // 2, 8, WPG, PPW, 2])
        vx = gl.reshape(gl.permute(vx, [2, 3, 1, 0, 4]), [DP, BLOCK_N])
        v_op = gl.convert_layout(vx, A_OP)
        # P s2 rounded to FP16 once (the operand); the zero point's sum uses those same rounded values times z / s2,
        # so that sum_n p_n (s2_n code_n + z_n) carries one rounding per key relative to the value s2 code + z (the
        # two terms cancel when the value is small)
        ps = (p * vs2[:, None]).to(gl.float16)
        p_op = _transpose_p(ps, B_OP, ASM)
        o = mma_v2(v_op, p_op, gl.zeros([DP, BLOCK_H], gl.float32, MMA))
        l_i = alpha * l_i + gl.sum(p, axis=0)
        z_i = alpha * z_i + gl.sum(ps.to(gl.float32) * (vz * _reciprocal(vs2, ASM))[:, None], axis=0) * vsc
        acc = alpha[None, :] * acc + o * vsc
        m_i = m_new

    # the split's partial: rows back in channel order, each channel's code position and 2^-24 undone, V's zero
    # point added
    hvalid = heads < G
    prow = (b * Hq + h * G + heads) * NPART + sp
    gl.store(m_ptr + prow, m_i, mask=hvalid)
    gl.store(l_ptr + prow, l_i, mask=hvalid)
    och = _v_channel(gl.arange(0, DP, layout=gl.SliceLayout(1, MMA)), PPW, WPG)
    out = acc * gl.exp2((24 - BITS * (och % PPB)).to(gl.float32))[:, None] + z_i[None, :]
    gl.store(acc_ptr + prow[None, :] * DP + och[:, None], out, mask=hvalid[None, :])


# "auto" runs the walk with at least AUTO_MIN_TILES (pairs x compressed tiles) and either AUTO_MIN_PAIRS (sequence,
# KV head) pairs or AUTO_LONG_TILES pair-tiles in one bit-width pool (the walk is one launch per pool, so a mixed
# layer's launches each get the pairs of their own pool): its one-warp programs need enough pairs, or enough tiles to
# split into many programs, to fill the GPU, and the second launch must pay. Measured (eager calls, 32 q / 8 kv
# heads, hd 128), walk vs Triton kernel: H100, 4-bit: B=1 32k 63 vs 61 us, B=1 128k 118 vs 176, B=2 32k 73 vs 94,
# B=4 4k 34 vs 34, B=4 32k 91 vs 165, B=8 4k 47 vs 52, B=16 4k 60 vs 83 (kernels/NOTES.md); H200, B=1
# (decode_walk_choice.json): 4-bit 32k 65 vs 59, 64k 77 vs 99, 128k 115 vs 178; mixed (4 pairs a pool) 64k 125 vs
# 98, 128k 182 vs 177
AUTO_MIN_PAIRS = 16
AUTO_LONG_TILES = 8192
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
    per_pair = layer.blocks_before * (layer.turbo.block_size // layer.turbo.block_n)
    pairs = query.shape[0] * layer.num_heads
    pool_pairs = query.shape[0] * max((idx.numel() for idx in layer.groups.values()), default=0)
    return (on_gpu and reason is None and pairs * per_pair >= AUTO_MIN_TILES
            and (pairs >= AUTO_MIN_PAIRS or pool_pairs * per_pair >= AUTO_LONG_TILES))


# the walk splits a context into at most this many programs per (sequence, KV head) (decode_layer's max_split, if
# larger, wins): at batch 1 its one-warp programs fill the GPU only with many splits (B=1 128k: 32 / 64 / 128 splits
# 178 / 123 / 118 us; the merge reads the partials four at a time)
WALK_MAX_SPLIT = 128
PREFETCH = 0  # software prefetch of the next tile's words: 0 none, 1 K, 2 K and V (none is fastest: kernels/NOTES.md)
_WALK = CachedLauncher(_walk_kernel)  # launched once per layer and pool per token: see _launch.py
# runtime arguments of _walk_kernel that change from step to step (the rest are fixed for a layer's pools)
_WALK_VARYING = ("q_ptr", "sqb", "sqh", "sqd", "NSPLIT", "NPART", "pad_ptr", "n_comp", "q_start")


def walk_constants(*, g: int, block_size: int, d: int, bits: int, has_pad: bool, has_window: bool,
                   on_gpu: bool) -> dict:
    """The constexprs and launch options of :func:`_walk_kernel` (the bound launch and eval/decode_sass's static
    compile use the same): ``ASM`` (packed PTX) when compiled, the module's :data:`PREFETCH`, one warp."""
    return dict(G=g, BS=block_size, BLOCK_H=8 if g <= 8 else 16, BLOCK_N=64, DP=d, BITS=bits, HAS_PAD=has_pad,
                HAS_WINDOW=has_window, ASM=on_gpu, PREFETCH=PREFETCH, **layouts(bits, d), num_warps=1)


def bind_walk(pool, hmap, partials, *, hq, d, q_mult, turbo, has_pad, window, bits, g, on_gpu):
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
    kwargs = walk_constants(g=g, block_size=turbo.block_size, d=d, bits=bits, has_pad=has_pad,
                            has_window=window is not None, on_gpu=on_gpu)
    return _WALK.bind(fixed, kwargs, _WALK_VARYING)
