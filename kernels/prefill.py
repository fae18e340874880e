# ruff: noqa: E741
"""FlashQ + SAS attention for query blocks (prefill, chunked prefill); reference:
:func:`hf_turbo.quant.attention.turbo_attention_reference`.

One program per (``BLOCK_M`` query rows, batch, query head). Q is loaded in its own dtype and quantized in the
program to INT8 per ``QB`` (= ``TurboConfig.block_m``) rows, ``scale = amax / 119 * sm_scale`` (× log2 e for the
exp2 and SAS base-2 paths, so scores come out in log2 units). Keys/values come from up to two segments, walked in
position order in tiles of ``BLOCK_N`` (= ``TurboConfig.block_n``) from each segment's start, like the reference:

1. compressed blocks ``[0, n_comp)`` of one bit-width pool (INT4/INT2/INT8 codes + integer ``s2``/``zero``),
   unpacked and rebuilt to INT8 in registers (``HAS_COMP``);
2. an INT8 segment (stage-1 codes + per-block scales from :func:`quantize_pack.stage1`: new tokens or the FP16 tail),
   starting at absolute position ``seg_start``; for FP16 PV its V comes as FP16 values (``tail_v="fp16"``: the
   tail's own, no V pass) or dequantized to FP16 by the same stage-1 pass (``tail_v="int8"``).

QK^T is ``tl.dot(int8, int8, out_dtype=int32)``; online softmax with SAS (base e or 2, plain Triton arithmetic) or
exp2; PV in INT8 (P·127), FP16 or FP8. Masks: bottom-right causal, left padding ``pad[B]``, sliding window, and
tiles entirely outside them are skipped by the loop bounds. GQA: the program's query head reads KV head
``hmap[j]`` (``j`` a head of the launch's pool).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import lut_constants, next_pow2, stage1_codes, stage1_inv, stage1_scale
from ._tiles import load_packed_tile, online_update, prep_v, qk_dot

LOG2E = math.log2(math.e)


@triton.jit
def _full_tiles(lo, hi, seg_start, T_seg, pad_b, first_q, last_q, window,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Split tiles ``[lo, hi)`` of a segment into ``[lo, lo_full)`` (pad / window edge), ``[lo_full, mid)`` (every
    key visible to every row of the block: no masking) and ``[mid, hi)`` (causal diagonal, partial last tile); the
    three ranges are walked in this order, so tiles stay in position order like the reference."""
    lo_full = lo
    if HAS_PAD:
        lo_full = tl.maximum(lo_full, (pad_b - seg_start + BLOCK_N - 1) // BLOCK_N)
    if HAS_WINDOW:
        lo_full = tl.maximum(lo_full, (last_q - window + 1 - seg_start + BLOCK_N - 1) // BLOCK_N)
    lo_full = tl.minimum(lo_full, hi)
    mid = tl.minimum(hi, T_seg // BLOCK_N)
    if CAUSAL:
        mid = tl.minimum(mid, (first_q + 1 - seg_start) // BLOCK_N)
    mid = tl.maximum(mid, lo_full)
    return lo_full, mid


@triton.jit
def _prefill_kernel(
    q_ptr, sqb, sqh, sqs, sqd,
    o_ptr, sob, soh, sos, sod,
    hmap_ptr, pad_ptr,
    # compressed pool (contiguous [B, HB, CAP, BS, D*bits/8] etc.)
    kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, HB, CAP, n_comp,
    # INT8 segment (K contiguous [B, HKV, T, D]; V any strides, element (b, h, t, d) at v8_ptr + b*svb + h*svh +
    # t*svt + d*svd: INT8 codes, [D, T]-major when V_TRANS, or FP16 values for FP16 PV)
    k8_ptr, k8s_ptr, v8_ptr, svb, svh, svt, svd, v8s_ptr, HKV, T_seg, NBLK_seg, seg_start,
    Sq, q_start, D, qk_scale, window,
    G: tl.constexpr, QB: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
    BITS: tl.constexpr, K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr,
    HAS_COMP: tl.constexpr, HAS_SEG: tl.constexpr, V_TRANS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
    EXP_MODE: tl.constexpr, PV_MODE: tl.constexpr, N_R: tl.constexpr, Y_R: tl.constexpr,
    L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr,
    L5: tl.constexpr, L6: tl.constexpr, L7: tl.constexpr, L8: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
):
    # heaviest query blocks first (causal: the last rows see the most keys), so the last wave is made of short ones
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid = tl.program_id(1)
    hq_local = pid % (HB * G)
    b = (pid // (HB * G)).to(tl.int64)  # 64-bit offsets: Q, the output and a pool can pass 2^31 elements
    j = hq_local // G
    g = hq_local % G
    h = tl.load(hmap_ptr + j)  # global KV head
    hq = h * G + g
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    dm = d < D
    qmask = (offs_m[:, None] < Sq) & dm[None, :]
    q = tl.load(q_ptr + b * sqb + hq * sqh + offs_m[:, None] * sqs + d[None, :] * sqd, mask=qmask, other=0.0)
    q = q.to(tl.float32)
    # INT8 per QB rows: amax per group of QB rows
    NQB: tl.constexpr = BLOCK_M // QB
    qa = tl.reshape(tl.abs(q), (NQB, QB, DP))
    amax = tl.max(tl.max(qa, axis=2), axis=1)
    amax = tl.where(amax > 0, amax, 1.0)
    inv = tl.reshape(tl.broadcast_to(stage1_inv(amax)[:, None], (NQB, QB)), (BLOCK_M,))
    qs = tl.reshape(tl.broadcast_to(stage1_scale(amax)[:, None], (NQB, QB)), (BLOCK_M,)) * qk_scale
    q8 = stage1_codes(q, inv[:, None]).to(tl.int8)

    qpos = q_start + offs_m
    m_end = tl.minimum(m0 + BLOCK_M, Sq)
    last_q = q_start + m_end - 1  # highest query position of this block
    first_q = q_start + m0
    if HAS_PAD:
        pad_b = tl.load(pad_ptr + b)
    else:
        pad_b = 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    TPB: tl.constexpr = BS // BLOCK_N

    if HAS_COMP:
        # segment 1: compressed blocks, positions [0, n_comp * BS)
        t_hi = n_comp * BS
        if CAUSAL:
            t_hi = tl.minimum(t_hi, last_q + 1)
        t_lo = pad_b
        if HAS_WINDOW:
            t_lo = tl.maximum(t_lo, first_q - window + 1)
        t_lo = tl.maximum(t_lo, 0)
        lo = t_lo // BLOCK_N
        hi = (t_hi + BLOCK_N - 1) // BLOCK_N
        lo_full, mid = _full_tiles(lo, hi, 0, n_comp * BS, pad_b, first_q, last_q, window,
                                   BLOCK_N, CAUSAL, HAS_PAD, HAS_WINDOW)
        for phase in tl.static_range(3):
            if phase == 0:
                p_lo, p_hi = lo, lo_full
            elif phase == 1:
                p_lo, p_hi = lo_full, mid
            else:
                p_lo, p_hi = mid, hi
            for ti in range(p_lo, p_hi):
                blk = ti // TPB
                r0 = (ti % TPB) * BLOCK_N
                slot = (b * HB + j) * CAP + blk
                k8 = load_packed_tile(kc_ptr, ks2_ptr, kz_ptr, slot, r0, d, D, BS, BLOCK_N, BITS, K_CHANNEL)
                s = qk_dot(q8, k8.to(tl.int8))
                c = qs * tl.load(ks_ptr + slot)
                kpos = ti * BLOCK_N + offs_n
                vis = (kpos[None, :] >= pad_b) & (kpos[None, :] < n_comp * BS)
                if CAUSAL:
                    vis = vis & (kpos[None, :] <= qpos[:, None])
                if HAS_WINDOW:
                    vis = vis & (qpos[:, None] - kpos[None, :] < window)
                v8 = load_packed_tile(vc_ptr, vs2_ptr, vz_ptr, slot, r0, d, D, BS, BLOCK_N, BITS, V_CHANNEL)
                vsc = tl.load(vs_ptr + slot)
                acc, m_i, l_i = online_update(acc, m_i, l_i, s, c, vis, prep_v(v8, vsc, PV_MODE), vsc,
                                              EXP_MODE, PV_MODE, N_R, Y_R, L1, L2, L3, L4, L5, L6, L7, L8,
                                              SKIP_EMPTY, phase != 1)

    if HAS_SEG:
        # segment 2: INT8 tokens at positions [seg_start, seg_start + T_seg)
        t_hi = T_seg
        if CAUSAL:
            t_hi = tl.minimum(t_hi, last_q + 1 - seg_start)
        t_lo = pad_b - seg_start
        if HAS_WINDOW:
            t_lo = tl.maximum(t_lo, first_q - window + 1 - seg_start)
        t_lo = tl.maximum(t_lo, 0)
        lo = t_lo // BLOCK_N
        hi = (t_hi + BLOCK_N - 1) // BLOCK_N
        base = (b * HKV + h) * T_seg * D
        v_bh = v8_ptr + b * svb + h * svh
        lo_full, mid = _full_tiles(lo, hi, seg_start, T_seg, pad_b, first_q, last_q, window,
                                   BLOCK_N, CAUSAL, HAS_PAD, HAS_WINDOW)
        for phase in tl.static_range(3):
            if phase == 0:
                p_lo, p_hi = lo, lo_full
            elif phase == 1:
                p_lo, p_hi = lo_full, mid
            else:
                p_lo, p_hi = mid, hi
            for ti in range(p_lo, p_hi):
                t = ti * BLOCK_N + offs_n
                tm = t < T_seg
                k8 = tl.load(k8_ptr + base + t[:, None] * D + d[None, :], mask=tm[:, None] & dm[None, :], other=0)
                sblk = (b * HKV + h) * NBLK_seg + (ti * BLOCK_N) // BS
                s = qk_dot(q8, k8)
                c = qs * tl.load(k8s_ptr + sblk)
                kpos = seg_start + t
                vis = tm[None, :] & (kpos[None, :] >= pad_b)
                if CAUSAL:
                    vis = vis & (kpos[None, :] <= qpos[:, None])
                if HAS_WINDOW:
                    vis = vis & (qpos[:, None] - kpos[None, :] < window)
                vsc = tl.load(v8s_ptr + sblk)
                if PV_MODE == 1:
                    # FP16 values: stage 1's fp16(v8 * s_V), or the tail's own values (tail_v="fp16")
                    v = tl.load(v_bh + t[:, None] * svt + d[None, :] * svd, mask=tm[:, None] & dm[None, :],
                                other=0.0)
                else:
                    if V_TRANS:
                        vt = tl.load(v_bh + d[:, None] * svd + t[None, :] * svt, mask=dm[:, None] & tm[None, :],
                                     other=0)
                        v8 = tl.trans(vt)
                    else:
                        v8 = tl.load(v_bh + t[:, None] * svt + d[None, :] * svd, mask=tm[:, None] & dm[None, :],
                                     other=0)
                    v = prep_v(v8, vsc, PV_MODE)
                acc, m_i, l_i = online_update(acc, m_i, l_i, s, c, vis, v, vsc,
                                              EXP_MODE, PV_MODE, N_R, Y_R, L1, L2, L3, L4, L5, L6, L7, L8,
                                              SKIP_EMPTY, phase != 1)

    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(o_ptr + b * sob + hq * soh + offs_m[:, None] * sos + d[None, :] * sod, out.to(o_ptr.dtype.element_ty),
             mask=qmask)


EXP_MODES = {("exp2", "e"): 0, ("exp2", "2"): 0, ("sas", "e"): 1, ("sas", "2"): 2}
PV_MODES = {"int8": 0, "fp16": 1, "fp8": 2}


def exp_constants(turbo) -> dict:
    """The softmax constexprs of a TurboConfig (EXP_MODE, thresholds, SAS table)."""
    return dict(_exp_constants(turbo.exp, turbo.sas_base, float(turbo.n_r)))


@functools.cache
def _exp_constants(exp: str, sas_base: str, n_r: float) -> tuple:
    mode = EXP_MODES[(exp, sas_base)]
    c = dict(EXP_MODE=mode, N_R=n_r, Y_R=n_r * LOG2E)
    c.update(lut_constants(n_r) if mode == 1 else {f"L{i}": 0.0 for i in range(1, 9)})
    return tuple(c.items())


def default_tiles(d: int, sq: int, block_m: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages). BLOCK_M is a multiple of block_m (Q's INT8 block)."""
    if not on_gpu:
        return block_m, 4, 1
    bm = 128 if (128 % block_m == 0 and sq > 64) else block_m
    return bm, (4 if d <= 64 else 8) if bm == 128 else 4, 3


def launch_prefill(q, out, *, turbo, sm_scale, causal, pad, sliding_window, hmap, g,
                   comp=None, seg=None, block_m_override=None, num_warps=None, num_stages=None):
    """Launch :func:`_prefill_kernel` for the query heads of KV heads ``hmap`` (int32, one pool).

    ``comp``: None or dict(pool=..., bits=..., n=blocks). ``seg``: None or dict(k8, ks, v8, vs, start, v_trans) from
    :func:`quantize_kv_segment` (``v8`` indexed ``[B, Hkv, T, D]``, a transposed view of V^T storage when
    ``v_trans``). ``q [B, Hq, Sq, D]``, ``out`` same shape (written for the launch's heads)."""
    bsz, hq_total, sq, d = q.shape
    hb = hmap.numel()
    bm, nw, ns = default_tiles(d, sq, turbo.block_m, q.is_cuda)
    if block_m_override:
        bm = block_m_override
    nw = num_warps or nw
    ns = num_stages or ns
    exp_c = exp_constants(turbo)
    log2_units = exp_c["EXP_MODE"] != 1
    dummy = hmap  # any tensor for unused pointers
    if comp is not None:
        pool = comp["pool"]
        cp = (pool["k_codes"], pool["k_scale"], pool["k_s2"], pool["k_zero"],
              pool["v_codes"], pool["v_scale"], pool["v_s2"], pool["v_zero"], hb, pool["k_scale"].shape[2], comp["n"])
        bits = comp["bits"]
    else:
        cp = (dummy,) * 8 + (hb, 1, 0)
        bits = 8
    if seg is not None:
        k8, v8 = seg["k8"], seg["v8"]
        v_trans = bool(seg.get("v_trans", False))
        vs = seg["vs"] if seg["vs"] is not None else seg["ks"]  # FP16 tail values: no scale is read
        sp = (k8, seg["ks"], v8, *v8.stride(), vs, k8.shape[1], k8.shape[2], seg["ks"].shape[2], seg["start"])
    else:
        sp = (dummy, dummy, dummy, 0, 0, 0, 0, dummy, 1, 0, 1, 0)
        v_trans = False
    s_kv = (comp["n"] * turbo.block_size if comp is not None else 0)
    if seg is not None:
        s_kv = seg["start"] + seg["k8"].shape[2]
    q_start = s_kv - sq
    grid = (triton.cdiv(sq, bm), bsz * hb * g)
    _prefill_kernel[grid](
        q, *q.stride(), out, *out.stride(), hmap, pad if pad is not None else dummy,
        *cp, *sp,
        sq, q_start, d, float(sm_scale) * (LOG2E if log2_units else 1.0),
        int(sliding_window) if sliding_window is not None else 0,
        G=g, QB=turbo.block_m, BS=turbo.block_size, BLOCK_M=bm, BLOCK_N=turbo.block_n, DP=next_pow2(d),
        BITS=bits, K_CHANNEL=turbo.k_axis == "channel", V_CHANNEL=turbo.v_axis == "channel",
        HAS_COMP=comp is not None and comp["n"] > 0, HAS_SEG=seg is not None and seg["k8"].shape[2] > 0,
        V_TRANS=v_trans, CAUSAL=bool(causal), HAS_PAD=pad is not None, HAS_WINDOW=sliding_window is not None,
        PV_MODE=PV_MODES[turbo.pv], SKIP_EMPTY=turbo.exp == "sas", **exp_c,
        num_warps=nw, num_stages=ns,
    )
    return out


def quantize_kv_segment(k, v, turbo, *, k_mean=None, v_trans: bool | None = None):
    """Stage-1 INT8 of float ``k, v [B, Hkv, T, D]`` per ``block_size`` block for the INT8 segment
    (:func:`hf_turbo.quant.attention.int8_segments`): ``k`` minus ``k_mean`` (``[B, Hkv, 1, D]``, K smoothing) if
    given. V by ``turbo.tail_v_precision``: "fp16" keeps the values (in FP16, any strides; ``vs`` None); "int8"
    with FP16 PV dequantizes stage 1 to FP16; INT8 PV gets the codes, stored as V^T on the GPU (``v_trans`` None),
    where the MMA wants the reduction dim contiguous, and returned as its ``[B, Hkv, T, D]`` view."""
    from .quantize_pack import stage1

    bs = turbo.block_size
    k8, ks = stage1(k, bs, mean=k_mean)
    vt = False
    if turbo.tail_v_precision == "fp16":
        v8, vs = (v if v.dtype == torch.float16 else v.to(torch.float16)), None
    elif turbo.pv == "fp16":
        v8, vs = stage1(v, bs, dequant_fp16=True)
    else:
        vt = bool(k.is_cuda) if v_trans is None else v_trans
        v8, vs = stage1(v, bs, transpose=vt)
        v8 = v8.transpose(-1, -2) if vt else v8  # indexed (b, h, t, d) either way; V_TRANS only orients the loads
    return dict(k8=k8, ks=ks, v8=v8, vs=vs, start=0, v_trans=vt)


def prefill(query, key, value, turbo, *, sm_scale, causal, pad=None, sliding_window=None, **launch):
    """No-cache INT8 + SAS attention: ``query [B, Hq, Sq, D]``, ``key/value [B, Hkv, S, D]`` -> ``[B, Hq, Sq, D]``
    in the query dtype; reads what :func:`hf_turbo.quant.attention.no_cache_segments` defines (keys minus their
    mean under ``k_smooth``, quantized per block first: quantization is part of the call)."""
    from hf_turbo.quant.attention import key_mean

    check_supported(turbo)
    bsz, hq, sq, d = query.shape
    hkv = key.shape[1]
    seg = quantize_kv_segment(key, value, turbo, k_mean=key_mean(key) if turbo.k_smooth else None)
    out = torch.empty_like(query)
    hmap = torch.arange(hkv, dtype=torch.int32, device=query.device)
    launch_prefill(query, out, turbo=turbo, sm_scale=sm_scale, causal=causal, pad=pad,
                   sliding_window=sliding_window, hmap=hmap, g=hq // hkv, seg=seg, **launch)
    return out


def check_supported(turbo) -> None:
    """Raise NotImplementedError for configurations the kernels do not compute (:func:`unsupported`)."""
    why = unsupported(turbo)
    if why:
        raise NotImplementedError(why)


def unsupported(turbo) -> str | None:
    """Why the kernels do not compute ``turbo`` (None: they do); ops then runs the reference, with a warning."""
    if turbo.buffer_attention != "int8":
        return "buffer_attention='fp16' (FP16 QK over the tail) is not implemented in the kernels"
    if turbo.block_size % turbo.block_n or turbo.block_n < 16:
        return "block_n must divide block_size"
    if turbo.exp == "sas" and turbo.sas_base == "e" and math.floor(turbo.n_r) > 8:
        return "SAS base e kernel table covers n_r <= 8"
    if turbo.block_m > 128 or 128 % turbo.block_m and turbo.block_m % 16:
        return "block_m must be a power of two <= 128"
    return None
