"""Blockwise Progressive Quantization (BPQ), the reference.

Stage 1 (spec §1.2): symmetric INT8 per (batch, head, block of ``block_size`` tokens) with scale ``amax / 119``::

    s  = amax(|X_block|) / 119            float32, one per block (1/119 for an all-zero block)
    X8 = round_half_away(X * (119 / amax)) in [-119, 119]

Stage 2 (spec §1.2, [I] granularity): asymmetric ``bits``-bit codes computed on the INT8 values with integer
arithmetic only, per group (axis "channel": one group per channel over the block's tokens; "token": one group per
token over the head dim)::

    z  = min_g(X8)                                     int8
    s2 = max(1, ceil((max_g - min_g) / (2^bits - 1)))  uint8
    q  = floor((2 (X8 - z) + s2) / (2 s2))             = round half up of (X8 - z) / s2, in [0, 2^bits - 1]
    X8hat = q * s2 + z                                 exact, |X8hat - X8| <= s2 / 2, never outside [-119, 127]

``bits = 8`` gives s2 = 1: the codes are X8 - z and the rebuild is lossless, so INT8 storage shares the code path.

Packing (the cache's storage, and what the kernels read): codes along the last dim, ``8 // bits`` per byte, little
end first: byte j of a row holds elements ``j * ppb + i`` at bits ``[i * bits, (i + 1) * bits)``.

Rounding is half away from zero for stage 1 (cheap in a kernel, sign-symmetric), half up for stage 2 (codes >= 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK_SIZE = 64
INT8_RANGE = 119  # stage-1 codes live in [-119, 119]: the headroom keeps every stage-2 rebuild inside int8


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (what ``floor(|x| + 0.5) * sign(x)`` gives in a kernel)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16 or float32), got {x.dtype}")


def quantize_int8_blocks(x: torch.Tensor, block_size: int = BLOCK_SIZE, scale_mult: float = 1.0):
    """Stage 1: symmetric INT8 per block of ``block_size`` rows along dim -2.

    Args:
        x: ``[..., T, D]`` floating point; the last block may be partial.
        block_size: rows per block.
        scale_mult: folded into the returned scale (e.g. the softmax scale for Q); the codes do not depend on it.

    Returns:
        ``(x8, scale)``: ``x8`` int8 ``[..., T, D]`` in [-119, 119]; ``scale`` float32 ``[..., ceil(T / block_size)]``
        with ``x ~= x8 * scale / scale_mult`` per block.
    """
    _check_float("x", x)
    *lead, t, d = x.shape
    nblk = -(-t // block_size)
    pad = nblk * block_size - t
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    xb = xf.reshape(*lead, nblk, block_size, d)
    amax = xb.abs().amax(dim=(-2, -1))
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    inv = INT8_RANGE / amax
    x8 = round_half_away(xb * inv[..., None, None]).clamp_(-INT8_RANGE, INT8_RANGE)
    x8 = x8.reshape(*lead, nblk * block_size, d)[..., :t, :].to(torch.int8)
    scale = (amax / INT8_RANGE) * scale_mult
    return x8, scale.float()


def dequantize_int8(x8: torch.Tensor, scale: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Inverse of stage 1: ``x8 [..., T, D]`` int8, ``scale [..., nblk]`` -> float32 ``[..., T, D]``."""
    t = x8.shape[-2]
    per_row = scale.repeat_interleave(block_size, dim=-1)[..., :t]
    return x8.float() * per_row[..., None]


class Stage2(NamedTuple):
    """Stage-2 codes of one block (unpacked) with their integer parameters.

    codes: uint8 ``[..., T, D]`` in [0, 2^bits - 1]; scale: uint8, zero: int8, both ``[..., D]`` (axis "channel")
    or ``[..., T]`` (axis "token").
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def _reduce_dim(axis: str) -> int:
    if axis == "channel":
        return -2
    if axis == "token":
        return -1
    raise ValueError(f"axis must be 'channel' or 'token', got {axis!r}")


def quantize_stage2(x8: torch.Tensor, bits: int, axis: str) -> Stage2:
    """Stage 2: integer asymmetric quantization of INT8 values to ``bits`` bits (see module docstring).

    Args:
        x8: int8 ``[..., T, D]`` (one block of tokens per leading index).
        bits: 2, 4 or 8.
        axis: "channel" (group = the block's tokens, per channel) or "token" (group = the head dim, per token).
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be one of (2, 4, 8), got {bits!r}")
    if x8.dtype != torch.int8:
        raise TypeError(f"x8 must be int8, got {x8.dtype}")
    dim = _reduce_dim(axis)
    xi = x8.to(torch.int32)
    lo = xi.amin(dim=dim, keepdim=True)
    hi = xi.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    s2 = torch.clamp((hi - lo + levels - 1) // levels, min=1)
    q = (2 * (xi - lo) + s2) // (2 * s2)
    return Stage2(q.to(torch.uint8), s2.squeeze(dim).to(torch.uint8), lo.squeeze(dim).to(torch.int8))


def rebuild_stage2(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: str) -> torch.Tensor:
    """Exact integer rebuild ``codes * scale + zero`` -> int8 ``[..., T, D]``."""
    dim = _reduce_dim(axis)
    x = codes.to(torch.int32) * scale.to(torch.int32).unsqueeze(dim) + zero.to(torch.int32).unsqueeze(dim)
    return x.to(torch.int8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` (values < 2^bits) into uint8 ``[..., D * bits // 8]`` (little end first)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be one of (2, 4, 8), got {bits!r}")
    if bits == 8:
        return codes.to(torch.uint8)
    ppb = 8 // bits
    d = codes.shape[-1]
    if d % ppb:
        raise ValueError(f"last dim {d} must be a multiple of {ppb} to pack {bits}-bit codes")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], d // ppb, ppb)
    shifts = torch.arange(ppb, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., D * bits // 8]`` -> uint8 codes ``[..., D]``."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be one of (2, 4, 8), got {bits!r}")
    if bits == 8:
        return packed.to(torch.uint8)
    ppb = 8 // bits
    shifts = torch.arange(ppb, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * ppb).to(torch.uint8)
