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
    pv "fp16":  l = alpha l + sum(p);  O = alpha O + p . fp16(V8 * s_V)
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

from .bpq import INT8_RANGE, quantize_int8_blocks, round_half_away
from .sas import exp_neg


class KVSegment(NamedTuple):
    """A run of consecutive keys/values.

    k, v: ``[B, Hkv, T, D]``; either int8 with ``k_scale``/``v_scale`` float32 ``[B, Hkv, T]`` (per-token view of the
    per-block scales), or floating point with scales ``None`` (read in FP16: ``buffer_attention="fp16"``).
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
) -> torch.Tensor:
    """TurboAttention forward (see module docstring).

    Args:
        q: ``[B, Hq, Sq, D]`` floating point (RoPE applied).
        segments: keys/values in position order; together they cover positions ``[0, S_kv)``.
        sm_scale: softmax scale (usually ``D ** -0.5``).
        causal: bottom-right causal mask.
        q_start: absolute position of query 0; default ``S_kv - Sq``.
        key_mask: optional bool ``[B, S_kv]``, True where a key may be attended (left padding is False).
        sliding_window: optional window (Phi3, Qwen2 sliding layers).

    Returns:
        float32 ``[B, Hq, Sq, D]``.
    """
    b, hq, sq, d = q.shape
    if not segments:
        raise ValueError("segments is empty: attention needs at least one key")
    hkv = segments[0].k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    group = hq // hkv
    s_kv = segments[-1].start + segments[-1].k.shape[2]
    if q_start is None:
        q_start = s_kv - sq
    dev = q.device
    q8, q_scale = quantize_q(q, block_m, sm_scale)
    q8d = q8.double()
    q_half = q.to(torch.float16).double() * sm_scale
    q_pos = torch.arange(q_start, q_start + sq, device=dev)

    m = torch.full((b, hq, sq), -math.inf, dtype=torch.float32, device=dev)
    l = torch.zeros((b, hq, sq), dtype=torch.float32, device=dev)
    acc = torch.zeros((b, hq, sq, d), dtype=torch.float32, device=dev)

    for seg in segments:
        t_seg = seg.k.shape[2]
        quantized = seg.k.dtype == torch.int8
        for t0 in range(0, t_seg, block_n):
            t1 = min(t0 + block_n, t_seg)
            k_pos = torch.arange(seg.start + t0, seg.start + t1, device=dev)
            vis = _visible(q_pos, k_pos, causal, sliding_window, key_mask)
            if not bool(vis.any()):
                continue
            kt = seg.k[:, :, t0:t1].repeat_interleave(group, dim=1)
            vt = seg.v[:, :, t0:t1].repeat_interleave(group, dim=1)
            if quantized:
                ks = seg.k_scale[:, :, t0:t1].repeat_interleave(group, dim=1)
                vs = seg.v_scale[:, :, t0:t1].repeat_interleave(group, dim=1)
                s_int = q8d @ kt.double().transpose(-1, -2)  # exact INT32 products
                s = (s_int.float() * q_scale[..., None]) * ks[..., None, :]
            else:
                s = (q_half @ kt.to(torch.float16).double().transpose(-1, -2)).float()
            s = s.masked_fill(~vis, -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.where(torch.isinf(m), torch.zeros_like(m), torch.exp(m - m_safe))
            p = exp_neg(m_safe[..., None] - s, exp=exp, n_r=n_r, base=sas_base)
            p = p.masked_fill(~vis, 0)
            if quantized:
                v_real = vt.double() * vs.double()[..., None]
            else:
                v_real = vt.double()
            if pv == "int8":
                p8 = round_half_away(p.float() * 127.0).clamp_(0, 127)
                l_add = p8.sum(-1) / 127.0
                o_add = (p8.double() @ v_real / 127.0).float()
            elif pv == "fp16":
                ph = p.to(torch.float16).double()
                l_add = ph.sum(-1).float()
                o_add = (ph @ v_real.to(torch.float16).double()).float()
            elif pv == "fp8":
                pf8 = (p.float() * 448.0).to(torch.float8_e4m3fn).double()
                v8 = vt.to(torch.float8_e4m3fn).double() if quantized else v_real.to(torch.float8_e4m3fn).double()
                vscale = vs.double()[..., None] if quantized else 1.0
                l_add = (pf8.sum(-1) / 448.0).float()
                o_add = (pf8 @ (v8 * vscale) / 448.0).float()
            else:
                raise ValueError(f"pv must be 'int8', 'fp16' or 'fp8', got {pv!r}")
            l = alpha * l + l_add
            acc = alpha[..., None] * acc + o_add
            m = m_new
    out = torch.where(l[..., None] > 0, acc / l.clamp_min(1e-30)[..., None], torch.zeros_like(acc))
    return out


def int8_segments(
    k: torch.Tensor, v: torch.Tensor, start: int = 0, block_size: int = 64
) -> list[KVSegment]:
    """Stage-1 quantize float ``k, v [B, Hkv, T, D]`` per block (from ``start``) into one INT8 segment."""
    k8, ks = quantize_int8_blocks(k, block_size)
    v8, vs = quantize_int8_blocks(v, block_size)
    t = k.shape[-2]
    per_tok = lambda s: s.repeat_interleave(block_size, dim=-1)[..., :t]  # noqa: E731
    return [KVSegment(k8, v8, per_tok(ks), per_tok(vs), start)]


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


__all__ = ["INT8_RANGE", "KVSegment", "exact_attention", "int8_segments", "quantize_q", "turbo_attention_reference"]
