# ruff: noqa: E741
"""Decode attention (one or a few query tokens) over the packed cache; reference:
:func:`hf_turbo.quant.attention.turbo_attention_reference` over ``TurboLayer.attention_segments()``.

* grid ``(split, batch × KV head of one bit-width pool)``; the ``G = Hq / Hkv`` query heads of the KV head and the
  ``Sq`` query rows are packed into the MMA's M dimension (rows ``r = g * Sq + i``, padded to >= 16), so each K/V
  tile is read once per KV head, not once per query head;
* K/V are read packed (INT4/INT2/INT8 codes + integer ``s2``/``zero``), unpacked and rebuilt to INT8 in registers;
  the FP16 tail comes as INT8 (stage-1 per block, :func:`quantize_pack.stage1`), as the reference quantizes it;
* the context (compressed tiles then tail tiles, in position order) is split over ``split`` programs; each writes its
  unnormalized ``acc``, running max ``m`` and sum ``l``; :func:`_merge_kernel` combines them by log-sum-exp.
* ragged batches: left padding ``pad[B]`` masks the first keys of each row.

Q is stage-1 INT8 per (head, ``block_m`` rows) like the reference (one row for Sq = 1).

Split semantics: SAS and P·127 are evaluated relative to the running max a split has seen, so a split run is a
(equally accurate) reordering of the reference's sequential tile walk; with ``split=1`` the tile walk, and so the
result, is the reference's to within FP32/FP16 rounding.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import next_pow2
from ._tiles import load_packed_tile, online_update, prep_v, scores_int8
from .prefill import LOG2E, PV_MODES, exp_constants


@triton.jit
def _decode_kernel(
    q8_ptr, qs_ptr, NQB, Hq,
    acc_ptr, m_ptr, l_ptr, NSPLIT,
    hmap_ptr, pad_ptr,
    kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, HB, CAP, n_comp,
    k8_ptr, k8s_ptr, v8_ptr, v8s_ptr, HKV, T_seg, NBLK_seg, seg_start,
    Sq, q_start, D, window,
    G: tl.constexpr, QB: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, TPS_HINT: tl.constexpr,
    BITS: tl.constexpr, K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr,
    HAS_COMP: tl.constexpr, HAS_SEG: tl.constexpr, V_TRANS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
    EXP_MODE: tl.constexpr, PV_MODE: tl.constexpr, N_R: tl.constexpr, Y_R: tl.constexpr,
    L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr,
    L5: tl.constexpr, L6: tl.constexpr, L7: tl.constexpr, L8: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
):
    sp = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // HB
    j = pid % HB
    h = tl.load(hmap_ptr + j)
    r = tl.arange(0, BLOCK_M)
    g = r // Sq
    i = r % Sq
    rvalid = r < G * Sq
    hq = h * G + g
    d = tl.arange(0, DP)
    dm = d < D
    row = (b * Hq + hq) * Sq + i  # row index into [B, Hq, Sq]
    q8 = tl.load(q8_ptr + row[:, None] * D + d[None, :], mask=rvalid[:, None] & dm[None, :], other=0)
    qs = tl.load(qs_ptr + (b * Hq + hq) * NQB + i // QB, mask=rvalid, other=0.0)
    qpos = q_start + i
    if HAS_PAD:
        pad_b = tl.load(pad_ptr + b)
    else:
        pad_b = 0

    TPB: tl.constexpr = BS // BLOCK_N
    n_ct = n_comp * TPB
    n_tt = (T_seg + BLOCK_N - 1) // BLOCK_N
    total = n_ct + n_tt
    tps = (total + NSPLIT - 1) // NSPLIT
    t_begin = sp * tps
    t_end = tl.minimum(t_begin + tps, total)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_COMP:
        for ti in range(t_begin, tl.minimum(t_end, n_ct)):
            blk = ti // TPB
            r0 = (ti % TPB) * BLOCK_N
            slot = (b * HB + j) * CAP + blk
            k8 = load_packed_tile(kc_ptr, ks2_ptr, kz_ptr, slot, r0, d, D, BS, BLOCK_N, BITS, K_CHANNEL)
            ksc = tl.load(ks_ptr + slot)
            s = scores_int8(q8, k8.to(tl.int8), qs, ksc)
            kpos = ti * BLOCK_N + offs_n
            vis = rvalid[:, None] & (kpos[None, :] >= pad_b)
            if CAUSAL:
                vis = vis & (kpos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                vis = vis & (qpos[:, None] - kpos[None, :] < window)
            v8 = load_packed_tile(vc_ptr, vs2_ptr, vz_ptr, slot, r0, d, D, BS, BLOCK_N, BITS, V_CHANNEL)
            vsc = tl.load(vs_ptr + slot)
            acc, m_i, l_i = online_update(acc, m_i, l_i, s, vis, prep_v(v8, vsc, PV_MODE), vsc,
                                          EXP_MODE, PV_MODE, N_R, Y_R, L1, L2, L3, L4, L5, L6, L7, L8, SKIP_EMPTY)
    if HAS_SEG:
        base = (b * HKV + h).to(tl.int64) * T_seg * D
        for ti in range(tl.maximum(t_begin, n_ct) - n_ct, t_end - n_ct):
            t = ti * BLOCK_N + offs_n
            tm = t < T_seg
            k8 = tl.load(k8_ptr + base + t[:, None] * D + d[None, :], mask=tm[:, None] & dm[None, :], other=0)
            sblk = (b * HKV + h) * NBLK_seg + (ti * BLOCK_N) // BS
            ksc = tl.load(k8s_ptr + sblk)
            s = scores_int8(q8, k8, qs, ksc)
            kpos = seg_start + t
            vis = rvalid[:, None] & tm[None, :] & (kpos[None, :] >= pad_b)
            if CAUSAL:
                vis = vis & (kpos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                vis = vis & (qpos[:, None] - kpos[None, :] < window)
            vsc = tl.load(v8s_ptr + sblk)
            if PV_MODE == 1:
                v = tl.load(v8_ptr + base + t[:, None] * D + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
            else:
                if V_TRANS:
                    v8 = tl.trans(tl.load(v8_ptr + base + d[:, None] * T_seg + t[None, :],
                                          mask=dm[:, None] & tm[None, :], other=0))
                else:
                    v8 = tl.load(v8_ptr + base + t[:, None] * D + d[None, :], mask=tm[:, None] & dm[None, :],
                                 other=0)
                if PV_MODE == 0:
                    v = v8
                else:
                    v = v8.to(tl.float32).to(tl.float8e4nv)
            acc, m_i, l_i = online_update(acc, m_i, l_i, s, vis, v, vsc,
                                          EXP_MODE, PV_MODE, N_R, Y_R, L1, L2, L3, L4, L5, L6, L7, L8, SKIP_EMPTY)
    prow = row * NSPLIT + sp
    tl.store(m_ptr + prow, m_i, mask=rvalid)
    tl.store(l_ptr + prow, l_i, mask=rvalid)
    tl.store(acc_ptr + prow[:, None] * DP + d[None, :], acc, mask=rvalid[:, None])


@triton.jit
def _merge_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, sob, soh, sos, sod, Hq, Sq, NSPLIT, D, m_to_log2,
                  NSP: tl.constexpr, DP: tl.constexpr):
    row = tl.program_id(0)
    i = row % Sq
    hq = (row // Sq) % Hq
    b = row // (Sq * Hq)
    s = tl.arange(0, NSP)
    sm = s < NSPLIT
    m = tl.load(m_ptr + row * NSPLIT + s, mask=sm, other=float("-inf"))
    l = tl.load(l_ptr + row * NSPLIT + s, mask=sm, other=0.0)
    mx = tl.max(m, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2((m - mx_safe) * m_to_log2))
    d = tl.arange(0, DP)
    acc = tl.load(acc_ptr + (row * NSPLIT + s)[:, None] * DP + d[None, :], mask=sm[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l * w, axis=0)
    out = tl.where(den > 0, num / tl.maximum(den, 1e-30), 0.0)
    tl.store(o_ptr + b * sob + hq * soh + i * sos + d * sod, out.to(o_ptr.dtype.element_ty), mask=d < D)


def use_decode(sq: int, g: int, split) -> bool:
    """Short queries go to the decode kernel (GQA rows packed); longer ones to the prefill kernel."""
    return sq * g <= 64 and sq <= 16


def choose_split(bsz: int, hkv: int, total_tiles: int, on_gpu: bool) -> int:
    if not on_gpu:
        return 1
    n_sm = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = math.ceil(2 * n_sm / max(1, bsz * hkv))
    return max(1, min(want, total_tiles // 4 if total_tiles >= 8 else 1, 64))


def decode_layer(query, layer, seg, *, sm_scale, causal, pad=None, sliding_window=None, split=None,
                 num_warps=4, num_stages=2):
    """Decode attention of ``query [B, Hq, Sq, D]`` over ``layer`` (compressed blocks before this step + ``seg``, the
    stage-1 INT8 tail from :func:`prefill.quantize_kv_segment`)."""
    from .quantize_pack import stage1

    turbo = layer.turbo
    bsz, hq, sq, d = query.shape
    hkv = layer.num_heads
    g = hq // hkv
    exp_c = exp_constants(turbo)
    log2_units = exp_c["EXP_MODE"] != 1
    q8, qs = stage1(query, turbo.block_m, scale_mult=float(sm_scale) * (LOG2E if log2_units else 1.0))
    n_comp = layer.blocks_before
    bs = turbo.block_size
    t_seg = seg["k8"].shape[2] if seg is not None else 0
    total_tiles = n_comp * (bs // turbo.block_n) + triton.cdiv(t_seg, turbo.block_n)
    nsplit = split or choose_split(bsz, hkv, total_tiles, query.is_cuda)
    dp = next_pow2(d)
    dev = query.device
    acc = torch.empty(bsz, hq, sq, nsplit, dp, dtype=torch.float32, device=dev)
    m = torch.empty(bsz, hq, sq, nsplit, dtype=torch.float32, device=dev)
    l = torch.empty(bsz, hq, sq, nsplit, dtype=torch.float32, device=dev)
    s_kv = n_comp * bs + t_seg
    block_m = max(16, next_pow2(g * sq))
    for bits, idx in layer.groups.items():
        hb = idx.numel()
        if hb == 0:
            continue
        hmap = idx.to(device=dev, dtype=torch.int32)
        if n_comp:
            pool = layer.pools[bits]
            cp = (pool["k_codes"], pool["k_scale"], pool["k_s2"], pool["k_zero"],
                  pool["v_codes"], pool["v_scale"], pool["v_s2"], pool["v_zero"], hb, pool["k_scale"].shape[2], n_comp)
        else:
            cp = (hmap,) * 8 + (hb, 1, 0)
        if seg is not None:
            sp = (seg["k8"], seg["ks"], seg["v8"], seg["vs"], hkv, t_seg, seg["ks"].shape[2], seg["start"])
        else:
            sp = (hmap,) * 4 + (hkv, 0, 1, 0)
        _decode_kernel[(nsplit, bsz * hb)](
            q8, qs, qs.shape[2], hq, acc, m, l, nsplit, hmap, pad if pad is not None else hmap,
            *cp, *sp, sq, s_kv - sq, d, int(sliding_window) if sliding_window is not None else 0,
            G=g, QB=turbo.block_m, BS=bs, BLOCK_M=block_m, BLOCK_N=turbo.block_n, DP=dp, TPS_HINT=0,
            BITS=bits, K_CHANNEL=turbo.k_axis == "channel", V_CHANNEL=turbo.v_axis == "channel",
            HAS_COMP=n_comp > 0, HAS_SEG=t_seg > 0, V_TRANS=bool(seg is not None and seg.get("v_trans")),
            CAUSAL=bool(causal), HAS_PAD=pad is not None, HAS_WINDOW=sliding_window is not None,
            PV_MODE=PV_MODES[turbo.pv], SKIP_EMPTY=turbo.exp == "sas", **exp_c,
            num_warps=num_warps, num_stages=num_stages,
        )
    out = torch.empty_like(query)
    _merge_kernel[(bsz * hq * sq,)](
        acc, m, l, out, *out.stride(), hq, sq, nsplit, d, 1.0 if log2_units else LOG2E,
        NSP=max(2, next_pow2(nsplit)), DP=dp, num_warps=4,
    )
    return out
