"""Quantized attention with online SAS softmax (FlashQ), the reference for prefill and decode.

The keys and values come as a list of :class:`KVSegment` in position order (e.g. the cache's compressed blocks
rebuilt to INT8, then the FP16 buffer and new tokens quantized to INT8 on the fly). Each segment is cut into softmax
tiles of ``block_n`` keys from its own start, exactly as the kernels walk it. Per tile (spec §4, "integration with
online softmax")::

    S     = (Q8 . K8^T) * s_Q * s_K            INT8 x INT8 -> exact INT32, then FP32; s_Q holds the softmax scale
    m_new = max(m, rowmax S)                   masked scores are -inf
    p     = exp_neg(m_new - S)                 SAS in FP16 (or the FP32 exponential)
    alpha = exp(m - m_new)                     FP32 (inferred choice: the rescale never uses the truncated SAS)
    pv "int8":  P8 = round(127 p);  l = alpha l + sum(P8) / 127;  O = alpha O + (P8 . V8) * s_V / 127
    pv "fp16":  l = alpha l + sum(p);  O = alpha O + fp16(p) . fp16(V8 * s_V)     (l on the FP32 p; V as stored
                with tail_v="fp16")
    pv "fp8":   P = e4m3(448 p); V = e4m3(V8);  l = alpha l + sum(P) / 448;  O = alpha O + (P . V) * s_V / 448
    out   = O / l   (0 for a row that sees no key)

Tiles whose probabilities are all zero contribute nothing (the kernels skip them; the result is the same). Q is
INT8 per (batch, head, block of ``block_m`` rows), scale ``amax / 119``. Masking: causal aligned bottom-right
(query ``i`` sits at absolute position ``q_start + i``), an optional key padding mask, and a sliding window
(key visible iff ``q_pos - k_pos < window``). GQA: query head ``h`` reads KV head ``h // (Hq / Hkv)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .bpq import INT8_RANGE, quantize_int8_blocks
from .sas import exp_neg


class KVSegment(NamedTuple):
    """A run of consecutive keys/values.

    k, v: ``[B, Hkv, T, D]``; each either int8 with its scale (``k_scale``/``v_scale`` float32 ``[B, Hkv, T]``, a
    per-token view of the per-block scales) or floating point with scale ``None``, read in FP16 (keys with
    ``buffer_attention="fp16"``, values also with ``tail_v="fp16"``).
    start: absolute position of the first token.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    start: int


def quantize_q(q: torch.Tensor, block_m: int, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Q to INT8 per (b, h, block of ``block_m`` rows); returns ``(q8 [B,H,S,D], scale [B,H,S])`` where the
    per-row scale already includes ``sm_scale``."""
    q8, scale = quantize_int8_blocks(q, block_m, scale_mult=sm_scale)
    per_row = scale.repeat_interleave(block_m, dim=-1)[..., : q.shape[-2]]
    return q8, per_row


def _visible(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    sliding_window: int | None,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Bool ``[B or 1, 1, Sq, T]`` visibility of keys at ``k_pos`` for queries at ``q_pos``."""
    vis = torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)
    if causal:
        vis &= k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        vis &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
    vis = vis[None, None]
    if key_mask is not None:
        vis = vis & key_mask[:, k_pos][:, None, None, :]
    return vis


def turbo_attention_reference(
    q: torch.Tensor,
    segments: list[KVSegment],
    *,
    sm_scale: float,
    causal: bool = True,
    q_start: int | None = None,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    exp: str = "sas",
    n_r: float = 6.0,
    sas_base: str = "e",
    pv: str = "int8",
    block_m: int = 64,
    block_n: int = 64,
    q_chunk: int = 128,
) -> torch.Tensor:
    """TurboAttention forward (see module docstring).

    The tile recurrence is evaluated in closed form: the running max after tile ``j`` is the cumulative max
    ``m_j`` of the tile maxima, ``p`` of tile ``j`` is taken against ``m_j`` (as the kernels do), and the product of
    the rescale factors after tile ``j`` telescopes to ``exp(m_j - m_final)`` (equal up to FP32 rounding).
    INT8 x INT8 products are exact in FP32 (|sum| <= 119^2 * 256 < 2^24).

    Args:
        q: ``[B, Hq, Sq, D]`` floating point (RoPE applied).
        segments: keys/values in position order; together they cover positions ``[0, S_kv)``.
        sm_scale: softmax scale (usually ``D ** -0.5``).
        causal: bottom-right causal mask.
        q_start: absolute position of query 0; default ``S_kv - Sq``.
        key_mask: optional bool ``[B, S_kv]``, True where a key may be attended (left padding is False).
        sliding_window: optional window (Phi3, Qwen2 sliding layers).
        q_chunk: query rows processed at once (memory bound only; does not change the result).

    Returns:
        float32 ``[B, Hq, Sq, D]``.
    """
    if pv not in ("int8", "fp16", "fp8"):
        raise ValueError(f"pv must be 'int8', 'fp16' or 'fp8', got {pv!r}")
    b, hq, sq, d = q.shape
    if not segments:
        raise ValueError("segments is empty: attention needs at least one key")
    hkv = segments[0].k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    group = hq // hkv
    s_kv = segments[-1].start + segments[-1].k.shape[2]
    q_start = s_kv - sq if q_start is None else q_start
    dev = q.device
    q8, q_scale = quantize_q(q, block_m, sm_scale)
    q_half = q.to(torch.float16).float() * sm_scale

    # keys/values of every segment padded to whole tiles; padding positions are -1 (never visible)
    k_pos, v_eff, parts = [], [], []
    for seg in segments:
        t = seg.k.shape[2]
        pad = (-t) % block_n
        pos = torch.arange(seg.start, seg.start + t, device=dev)
        k_pos.append(torch.nn.functional.pad(pos, (0, pad), value=-1))
        parts.append((seg, pad))
        v_eff.append(torch.nn.functional.pad(_value_operand(seg, pv), (0, 0, 0, pad)))
    k_pos = torch.cat(k_pos)
    v_eff = torch.cat(v_eff, dim=2).repeat_interleave(group, dim=1)  # [B, Hq, T, D]

    out = torch.empty((b, hq, sq, d), dtype=torch.float32, device=dev)
    for r0 in range(0, sq, q_chunk):
        r1 = min(r0 + q_chunk, sq)
        # causal: tiles that start after the chunk's last query are invisible to every row of the chunk
        last_pos = q_start + r1 - 1 if causal else math.inf
        scores, n_cols = [], 0
        for seg, pad in parts:
            t = seg.k.shape[2]
            t_keep = min(t, max(0, int(min(last_pos - seg.start + 1, t))))
            if t_keep == 0:
                break
            cols = min(-(-t_keep // block_n) * block_n, t + pad)
            if seg.k.dtype == torch.int8:
                kt = seg.k[:, :, :t_keep].float().repeat_interleave(group, dim=1)
                ks = seg.k_scale[:, :, :t_keep].repeat_interleave(group, dim=1)
                s = (q8[:, :, r0:r1].float() @ kt.transpose(-1, -2)) * q_scale[:, :, r0:r1, None] * ks[:, :, None, :]
            else:
                kt = seg.k[:, :, :t_keep].to(torch.float16).float().repeat_interleave(group, dim=1)
                s = q_half[:, :, r0:r1] @ kt.transpose(-1, -2)
            scores.append(torch.nn.functional.pad(s, (0, cols - t_keep), value=-math.inf))
            n_cols += cols
            if cols < t + pad:
                break
        s = torch.cat(scores, dim=-1)
        pos = k_pos[:n_cols]
        tiles = n_cols // block_n
        q_pos = torch.arange(q_start + r0, q_start + r1, device=dev)
        vis = _visible(q_pos, pos.clamp_min(0), causal, sliding_window, key_mask) & (pos >= 0)
        s = s.masked_fill(~vis, -math.inf).view(b, hq, r1 - r0, tiles, block_n)
        m_run = torch.cummax(s.amax(dim=-1), dim=-1).values  # running max after each tile
        m_safe = torch.where(torch.isinf(m_run), torch.zeros_like(m_run), m_run)
        p = exp_neg(m_safe[..., None] - s, exp=exp, n_r=n_r, base=sas_base).float()
        p_mm = _probability_operand(p, pv)
        p_sum = p if pv == "fp16" else p_mm  # FP16 PV sums the FP32 p, before its FP16 rounding
        w = torch.where(torch.isinf(m_run), torch.zeros_like(m_run), torch.exp(m_run - m_safe[..., -1:]))[..., None]
        l = (p_sum * w).reshape(b, hq, r1 - r0, n_cols).sum(-1)
        acc = (p_mm * w).reshape(b, hq, r1 - r0, n_cols) @ v_eff[:, :, :n_cols]
        out[:, :, r0:r1] = torch.where(l[..., None] > 0, acc / l.clamp_min(1e-30)[..., None], torch.zeros_like(acc))
    return out


def _value_operand(seg: KVSegment, pv: str) -> torch.Tensor:
    """The values as the PV product sees them, in FP32 ``[B, Hkv, T, D]``."""
    if seg.v.dtype == torch.int8:
        scale = seg.v_scale[..., None]
        if pv == "fp16":
            return (seg.v.float() * scale).to(torch.float16).float()
        if pv == "fp8":
            return seg.v.float().to(torch.float8_e4m3fn).float() * scale
        return seg.v.float() * scale
    if pv == "fp8":
        return seg.v.float().to(torch.float8_e4m3fn).float()
    return seg.v.to(torch.float16).float()


def _probability_operand(p: torch.Tensor, pv: str) -> torch.Tensor:
    """The probabilities as the PV product sees them (int8: round(127 p) / 127; fp16; fp8: e4m3(448 p) / 448)."""
    if pv == "int8":  # p >= 0: round half away from zero is floor(x + 0.5)
        return torch.floor(p * 127.0 + 0.5).clamp_(max=127) / 127.0
    if pv == "fp8":
        return (p * 448.0).to(torch.float8_e4m3fn).float() / 448.0
    return p.to(torch.float16).float()


def int8_segments(
    k: torch.Tensor, v: torch.Tensor, start: int = 0, block_size: int = 64, *, tail_v: str = "int8"
) -> list[KVSegment]:
    """Stage-1 quantize float ``k, v [B, Hkv, T, D]`` per block (from ``start``) into one INT8 segment; with
    ``tail_v="fp16"`` (``TurboConfig.tail_v_precision``) the values stay as they are (read in FP16)."""
    k8, ks = quantize_int8_blocks(k, block_size)
    t = k.shape[-2]
    per_tok = lambda s: s.repeat_interleave(block_size, dim=-1)[..., :t]  # noqa: E731
    if tail_v == "fp16":
        return [KVSegment(k8, v, per_tok(ks), None, start)]
    v8, vs = quantize_int8_blocks(v, block_size)
    return [KVSegment(k8, v8, per_tok(ks), per_tok(vs), start)]


KEY_MEAN_SAMPLES = 256


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """K smoothing's mu: the channel mean of ``k [B, H, T, D]`` over every ``T // 256``-th token (every token when
    ``T < 512``; padding included), ``[B, H, 1, D]`` in ``k``'s dtype, accumulated in float32. Any mu keeps
    attention exact (a constant shift of each query row's scores); it only decides how well the shifted keys
    quantize, and a channel's constant offset, which is what smoothing removes, shows in a few hundred evenly spaced
    tokens as well as in all of them: reading 1/64 of a 16k-token K instead of all of it."""
    step = max(1, k.shape[-2] // KEY_MEAN_SAMPLES)
    return torch.mean(k[..., ::step, :], dim=-2, keepdim=True, dtype=torch.float32).to(k.dtype)


def no_cache_segments(k: torch.Tensor, v: torch.Tensor, turbo) -> list[KVSegment]:
    """What attention without a cache reads (``TurboConfig`` ``turbo``): ``k, v [B, Hkv, S, D]`` as one segment,
    keys minus their own :func:`key_mean` under ``k_smooth`` (exact for softmax, as in the cache), then stage-1
    INT8 per block (values per ``tail_v``), or as they are with ``buffer_attention="fp16"``."""
    if turbo.k_smooth:
        k = k - key_mean(k)
    if turbo.buffer_attention == "fp16":
        return [KVSegment(k, v, None, None, 0)]
    return int8_segments(k, v, 0, turbo.block_size, tail_v=turbo.tail_v_precision)


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: float | None = None,
    causal: bool = True,
    q_start: int | None = None,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Exact softmax attention in float64: ``q [B,Hq,Sq,D]``, ``k, v [B,Hkv,Skv,D]`` -> ``[B,Hq,Sq,D]`` float64."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    sm_scale = d**-0.5 if sm_scale is None else sm_scale
    q_start = skv - sq if q_start is None else q_start
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    s = (q.double() @ kk.transpose(-1, -2)) * sm_scale
    q_pos = torch.arange(q_start, q_start + sq, device=q.device)
    k_pos = torch.arange(skv, device=q.device)
    vis = _visible(q_pos, k_pos, causal, sliding_window, key_mask)
    s = s.masked_fill(~vis, -math.inf)
    has_key = vis.any(dim=-1, keepdim=True)
    w = torch.softmax(s.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return w @ vv


__all__ = [
    "INT8_RANGE", "KVSegment", "exact_attention", "int8_segments", "key_mean", "no_cache_segments", "quantize_q",
    "turbo_attention_reference",
]
