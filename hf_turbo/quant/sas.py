"""SAS: the sparsity-based softmax exponential of TurboAttention (spec §4), the reference.

For ``x >= 0`` (distance below the running row max, natural-log units)::

    base "e" (the paper):  e^-x ~= LUT[floor x] * POLY(x - floor x),   LUT[k] = e^-k in FP16, k = 0..n_r
                           POLY(u) = -0.1025 u^3 + 0.4626 u^2 - 0.9922 u + 0.9996   (Horner, every step in FP16)
    base "2" (kernels):    y = x * log2(e);  2^-y ~= 2^-floor(y) * POLY2(y - floor y)  (exponent bits, no table)
                           POLY2(u) = -0.03951 u^3 + 0.23059 u^2 - 0.69108 u + 0.99990  (least squares of 2^-u)
    both:                  exactly 0 where x > n_r

The result is FP16, as the kernels produce it. Error (see :func:`sas_error_bound`): at most e^-n_r beyond the
threshold, and the cubic's error (4.0e-4 base e, 1.0e-4 base 2) plus FP16 rounding of four Horner steps below it.
"""

from __future__ import annotations

import math

import torch

POLY_E = (-0.1025, 0.4626, -0.9922, 0.9996)  # highest degree first; the paper's coefficients
POLY_2 = (-0.03950995, 0.23059296, -0.69107549, 0.99989843)  # least-squares cubic of 2^-u on [0, 1]
POLY_E_MAX_ERR = 4.0e-4
POLY_2_MAX_ERR = 1.02e-4
FP16_UNIT_ROUNDOFF = 2.0**-11
LOG2E = math.log2(math.e)


def lut_e(n_r: float, device=None) -> torch.Tensor:
    """FP16 table ``e^-k`` for ``k = 0..floor(n_r)``."""
    k = torch.arange(int(math.floor(n_r)) + 1, dtype=torch.float64, device=device)
    return torch.exp(-k).to(torch.float16)


def _horner_fp16(u: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    c = [torch.tensor(v, dtype=torch.float16, device=u.device) for v in coeffs]
    acc = c[0] * u + c[1]
    acc = acc * u + c[2]
    return acc * u + c[3]


def sas_exp_neg(x: torch.Tensor, n_r: float = 6.0, base: str = "e") -> torch.Tensor:
    """SAS approximation of ``exp(-x)`` for ``x >= 0`` (any float dtype, any shape); returns FP16, same shape.

    ``+inf`` (masked scores) gives exactly 0.
    """
    if base not in ("e", "2"):
        raise ValueError(f"base must be 'e' or '2', got {base!r}")
    xf = x.float()
    beyond = ~(xf <= n_r)  # also catches +inf and NaN
    xf = torch.where(beyond, torch.zeros_like(xf), xf.clamp_min(0.0))
    if base == "e":
        xh = xf.to(torch.float16)
        k = torch.floor(xh)
        u = xh - k
        table = lut_e(n_r, device=x.device)
        p = table[k.long().clamp_(max=table.numel() - 1)] * _horner_fp16(u, POLY_E)
    else:
        y = (xf * LOG2E).to(torch.float16)
        k = torch.floor(y)
        u = y - k
        p = torch.ldexp(_horner_fp16(u, POLY_2).float(), -k.float()).to(torch.float16)
    return torch.where(beyond, torch.zeros_like(p), p)


def exp_neg(x: torch.Tensor, exp: str = "sas", n_r: float = 6.0, base: str = "e") -> torch.Tensor:
    """``exp(-x)`` as the attention evaluates it: SAS (FP16 result) or the hardware exponential (FP32 result)."""
    if exp == "sas":
        return sas_exp_neg(x, n_r=n_r, base=base)
    if exp == "exp2":
        return torch.exp2(-x.float() * LOG2E)
    raise ValueError(f"exp must be 'sas' or 'exp2', got {exp!r}")


def sas_error_bound(n_r: float, base: str = "e") -> float:
    """Analytical bound on ``|sas_exp_neg(x) - exp(-x)|`` over ``x >= 0``.

    Beyond the threshold the value dropped is at most ``e^-n_r``. Below it: the cubic's own error (times the table
    entry, <= 1); rounding the argument to FP16 moves ``e^-x`` by at most ``x e^-x u <= u / e``; the six Horner
    operations round values of magnitude <= 0.10, 0.46, 0.46, 0.99, 0.99, 1.0 (sum < 4 u, none amplified later since
    |u| < 1); the table entry and the final product add ``2 u`` relative on values <= 1. ``u = 2^-11``.
    """
    u = FP16_UNIT_ROUNDOFF
    poly = POLY_E_MAX_ERR if base == "e" else POLY_2_MAX_ERR
    below = poly + (4.0 + 2.0 + 1.0 / math.e) * u
    return max(math.exp(-n_r), below)
