"""Head-wise mixed precision (spec §2): priority = gap x std per KV head, and the choice of low-bit heads.

For the KV head ``h`` with values ``X_h`` of shape ``[N, D]`` (all tokens of all sequences, one row each)::

    r_c       = max_n X_h[n, c] - min_n X_h[n, c]         per-channel range
    gap(h)    = max X_h - min X_h                          range of the whole head
    std(h)    = std_c(r_c)                                 population std (divide by D) of the channel ranges
    priority  = gap(h) * std(h)

A head with one outlier channel has a large gap *and* uneven channel ranges: it ranks high and keeps 4 bits. The
``n_low`` lowest-priority heads of each layer go to the low bit-width (ties: lower head index first), or, with a
model-wide choice (:func:`assign_model_head_bits`), the ``n_low`` lowest of all ``L x H`` heads, optionally after
dividing each layer's priorities by the layer's mean (``"layer_mean"``: gap x std scales with the square of the key
magnitude, which differs from layer to layer).
"""

from __future__ import annotations

import torch


def head_priority(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Priority per head.

    Args:
        x: ``[B, H, T, D]`` (or ``[H, T, D]``) keys or values.
        valid: optional bool ``[B, T]`` marking real tokens (left padding excluded from the statistics).

    Returns:
        float32 ``[H]``.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
        if valid is not None and valid.dim() == 1:
            valid = valid.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, T, D] or [H, T, D], got shape {tuple(x.shape)}")
    b, h, t, d = x.shape
    xf = x.float().permute(1, 0, 2, 3).reshape(h, b * t, d)
    if valid is not None:
        keep = valid.reshape(b * t).to(torch.bool)
        if not bool(keep.any()):
            raise ValueError("valid marks no token: cannot compute head priorities")
        xf = xf[:, keep.to(xf.device), :]
    hi = xf.amax(dim=1)  # [H, D]
    lo = xf.amin(dim=1)
    ranges = hi - lo
    gap = hi.amax(dim=1) - lo.amin(dim=1)
    std = ranges.std(dim=1, unbiased=False)
    return gap * std


def assign_head_bits(priority: torch.Tensor, n_low: int, bits: int = 4, low_bits: int = 2) -> torch.Tensor:
    """Bit-width per head: the ``n_low`` lowest-priority heads get ``low_bits``, the others ``bits``.

    Args:
        priority: ``[H]`` priorities (higher = more sensitive).
        n_low: number of low-bit heads, ``0 <= n_low <= H``.

    Returns:
        int64 ``[H]`` bit-widths.
    """
    h = priority.numel()
    if not 0 <= n_low <= h:
        raise ValueError(f"n_low must be in [0, {h}], got {n_low}")
    out = torch.full((h,), bits, dtype=torch.int64)
    if n_low:
        order = torch.sort(priority.detach().float().cpu(), stable=True).indices
        out[order[:n_low]] = low_bits
    return out


NORMALIZATIONS = ("none", "layer_mean")


def normalize_priorities(priorities: torch.Tensor, normalize: str = "none") -> torch.Tensor:
    """``[L, H]`` priorities made comparable across layers: "none" (as they are) or "layer_mean" (each row divided by
    its mean; a row whose mean is not positive is left as it is)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    pr = priorities.detach().float().cpu()
    if normalize == "layer_mean":
        mean = pr.mean(dim=-1, keepdim=True)
        pr = torch.where(mean > 0, pr / torch.where(mean > 0, mean, 1.0), pr)
    return pr


def assign_model_head_bits(priorities: torch.Tensor, n_low: int, bits: int = 4, low_bits: int = 2,
                           normalize: str = "none") -> torch.Tensor:
    """Bit-width per head with the low-bit heads chosen over the whole model.

    Args:
        priorities: ``[L, H]`` (higher = more sensitive).
        n_low: total number of low-bit heads, ``0 <= n_low <= L * H`` (the count per layer follows from the ranking).
        normalize: see :func:`normalize_priorities`.

    Returns:
        int64 ``[L, H]`` bit-widths (ties: lower layer, then lower head index first).
    """
    if priorities.dim() != 2:
        raise ValueError(f"priorities must be [L, H], got shape {tuple(priorities.shape)}")
    pr = normalize_priorities(priorities, normalize)
    return assign_head_bits(pr.flatten(), n_low, bits, low_bits).reshape(pr.shape)
