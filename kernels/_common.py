"""Triton helpers shared by the kernels: stage-1 rounding, SAS exponentials, packed-code unpacking.

Every helper reproduces a function of :mod:`hf_turbo.quant` (named in its docstring) with the same floating-point
operations where that is possible, so integer outputs match bit for bit and float outputs to within FP16 rounding.
Only plain Triton arithmetic: these run under ``TRITON_INTERPRET=1`` (no libdevice, no inline asm).
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl

LOG2E = math.log2(math.e)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read at import, as @triton.jit reads it
_ROUND_E4M3 = tl.constexpr(INTERPRET)
INT8_RANGE = 119.0

# exp modes (constexpr EXP_MODE)
EXP_EXP2 = 0  # hardware exp2 in FP32 (scores in log2 units)
EXP_SAS_E = 1  # SAS base e: LUT[floor x] * cubic(frac), FP16 (scores in natural units)
EXP_SAS_2 = 2  # SAS base 2: 2^-floor(y) * cubic2(frac), FP16 (scores in log2 units)
# PV modes (constexpr PV_MODE)
PV_INT8 = 0
PV_FP16 = 1
PV_FP8 = 2


@triton.jit
def round_half_away(x):
    """``quant.bpq.round_half_away``: sign(x) * floor(|x| + 0.5)."""
    a = tl.floor(tl.abs(x) + 0.5)
    return tl.where(x < 0, -a, a)


@triton.jit
def stage1_inv(amax):
    """``119 / amax`` exactly as torch evaluates ``scalar / tensor`` (``119 * (1 / amax)``, both correctly rounded)."""
    one = tl.full(amax.shape, 1.0, tl.float32)
    return 119.0 * tl.math.div_rn(one, amax)


@triton.jit
def stage1_scale(amax):
    """``amax / 119`` as torch evaluates ``tensor / scalar`` (correctly rounded division)."""
    return tl.math.div_rn(amax, tl.full(amax.shape, 119.0, tl.float32))


@triton.jit
def stage1_codes(x, inv):
    """INT8 codes (as int32) of ``x`` (fp32) with per-element/broadcast ``inv`` = 119 / amax; clamp to +-119."""
    c = round_half_away(x * inv)
    c = tl.minimum(tl.maximum(c, -119.0), 119.0)
    return c.to(tl.int32)


@triton.jit
def e4m3_grid(x):
    """fp32 ``x`` rounded to nearest even onto the e4m3 grid and saturated at +-448, still in fp32: what
    ``x.to(torch.float8_e4m3fn).float()`` gives for ``|x| <= 464`` (exact: the grid step ``2^(max(e, -6) - 3)`` is a
    power of two, so are its reciprocal and both products; ``(y + 1.5 * 2^23) - 1.5 * 2^23`` rounds ``|y| < 2^22``
    to an even integer)."""
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # unbiased exponent (-127 for 0 and subnormals)
    k = tl.maximum(e, -6) - 3
    step = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - k) << 23).to(tl.float32, bitcast=True)
    y = (x * inv_step + 12582912.0) - 12582912.0
    return tl.where(x == 0.0, x, tl.minimum(tl.maximum(y * step, -448.0), 448.0))  # -0.0 keeps its sign


@triton.jit
def to_e4m3(x):
    """fp32 ``x`` (``|x| <= 448``: ``448 p`` and INT8 values) -> float8e4nv, rounded to nearest even like the
    reference's ``x.to(torch.float8_e4m3fn)`` and the GPU's ``cvt.rn.satfinite``. Interpreted, ``x`` is first
    rounded onto the grid (:func:`e4m3_grid`): Triton's interpreter (3.6 to 3.9) rounds this conversion wrongly
    (31.4 -> 16, 100 -> 104, subnormals to 0) but converts values on the grid exactly."""
    if _ROUND_E4M3:
        x = e4m3_grid(x)
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def horner3(u, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """Cubic ``C0 u^3 + C1 u^2 + C2 u + C3`` in FP16 (``quant.sas._horner_fp16``); ``u`` is fp16."""
    acc = u * C0 + C1
    acc = (acc * u + C2).to(tl.float16)
    acc = (acc * u + C3).to(tl.float16)
    return acc


@triton.jit
def sas_exp_e(x, N_R: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr,
              L5: tl.constexpr, L6: tl.constexpr, L7: tl.constexpr, L8: tl.constexpr):
    """``quant.sas.sas_exp_neg(x, n_r, base="e")`` for fp32 ``x`` (+inf allowed): FP16 result.

    LUT[k] = e^-k in FP16 (L1..L8 as constexpr; k <= 8 so n_r <= 8) selected by a chain of compares."""
    beyond = ~(x <= N_R)
    xs = tl.where(beyond, 0.0, tl.maximum(x, 0.0))
    xh = xs.to(tl.float16)
    k = tl.floor(xh.to(tl.float32))
    u = (xh.to(tl.float32) - k).to(tl.float16)
    lut = tl.where(k >= 1.0, L1, 1.0)
    lut = tl.where(k >= 2.0, L2, lut)
    lut = tl.where(k >= 3.0, L3, lut)
    lut = tl.where(k >= 4.0, L4, lut)
    lut = tl.where(k >= 5.0, L5, lut)
    lut = tl.where(k >= 6.0, L6, lut)
    lut = tl.where(k >= 7.0, L7, lut)
    lut = tl.where(k >= 8.0, L8, lut)
    poly = horner3(u, -0.1025, 0.4626, -0.9922, 0.9996)
    p = (lut.to(tl.float16) * poly).to(tl.float16)
    return tl.where(beyond, 0.0, p.to(tl.float32)).to(tl.float16)


@triton.jit
def sas_exp_2(y, Y_R: tl.constexpr):
    """``quant.sas.sas_exp_neg(x, n_r, base="2")`` with ``y = x log2 e`` already in log2 units (fp32, +inf allowed),
    threshold ``Y_R = n_r log2 e``: ``2^-floor(y)`` from exponent bits times the cubic of ``2^-frac``; FP16."""
    beyond = ~(y <= Y_R)
    ys = tl.where(beyond, 0.0, tl.maximum(y, 0.0))
    yh = ys.to(tl.float16).to(tl.float32)
    k = tl.floor(yh)
    u = (yh - k).to(tl.float16)
    poly = horner3(u, -0.03950995, 0.23059296, -0.69107549, 0.99989843)
    pow2 = ((127 - k.to(tl.int32)) << 23).to(tl.float32, bitcast=True)
    p = (poly.to(tl.float32) * pow2).to(tl.float16)
    return tl.where(beyond, 0.0, p.to(tl.float32)).to(tl.float16)


def lut_constants(n_r: float) -> dict:
    """FP16 values of e^-k, k = 1..8, as Python floats (exactly representable in FP16) for :func:`sas_exp_e`."""
    import torch

    if math.floor(n_r) > 8:
        raise NotImplementedError(f"the SAS base-e kernel table holds e^-k for k <= 8; n_r={n_r} needs more")
    vals = torch.exp(-torch.arange(1, 9, dtype=torch.float64)).to(torch.float16).tolist()
    return {f"L{i + 1}": float(v) for i, v in enumerate(vals)}


def next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()
