# ruff: noqa: E741
"""Decode attention (one or a few query tokens) over the packed cache; reference:
:func:`hf_turbo.quant.attention.turbo_attention_reference` over ``TurboLayer.attention_segments()``.

* grid ``(split, batch × KV head)``: the programs of the first bit-width pool's heads, then those of the second
  (mixed precision: INT4 and INT2 heads in one launch, each program walking its pool with its constexpr bit-width);
  the ``G = Hq / Hkv`` query heads of the KV head and the
  ``Sq`` query rows are packed into the MMA's M dimension (rows ``r = g * Sq + i``, padded to >= 16), so each K/V
  tile is read once per KV head, not once per query head;
* K/V are read packed (INT4/INT2/INT8 codes + integer ``s2``/``zero``), unpacked and rebuilt to INT8 in registers;
  the next tile's packed reads are issued before this tile is computed (software prefetch);
* the FP16 tail (old buffer + this step's tokens) is read as FP16 and quantized to INT8 per block in registers with
  the stage-1 helpers of :mod:`.quantize_pack`, as the reference quantizes it (same codes and scales);
* the context (compressed tiles then tail tiles, in position order) is split over ``split`` programs; each writes its
  unnormalized ``acc``, running max ``m`` and sum ``l``, and the last program of a (sequence, KV head) to finish
  combines them by log-sum-exp (:func:`_merge_splits`; an arrival counter per program, reset by the merger).
* ragged batches: left padding ``pad[B]`` masks the first keys of each row;
* a decode step's own tokens may still be pending (``TurboLayer.pending``: the cache update left them unwritten):
  the program whose tail rows they are reads them from the step's K/V, writes them into the buffer (K smoothing's
  mu subtracted) and attends to the stored values, which saves the update's two copy launches.

Q is read in its own dtype and quantized in the kernel, stage-1 INT8 per (head, ``block_m`` rows) like the reference
(one row for Sq = 1). Per step and layer that is one launch in all: no cache-append, quantization or merge
launches (a launch costs more host time than the GPU time of a decode at batch 1). Step-varying integers
(context length, tail length, splits) are not specialized by Triton, so generation does not recompile as the
context grows.

Split semantics: SAS and P·127 are evaluated relative to the running max a split has seen, so a split run is a
(equally accurate) reordering of the reference's sequential tile walk; with ``split=1`` the tile walk, and so the
result, is the reference's to within FP32/FP16 rounding.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import next_pow2, stage1_codes, stage1_inv, stage1_scale
from ._launch import CachedLauncher, resident_per_sm
from ._tiles import load_packed_raw, online_update, prep_v, qk_dot, rebuild_packed, rebuild_packed_f16
from .decode_mma import WALK_MAX_SPLIT, bind_walk, walk_choice
from .prefill import LOG2E, PV_MODES, exp_constants


@triton.jit
def _load_comp_tile(kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, bh, CAP, ti, d, D,
                    BS: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
                    K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr, WORDS: tl.constexpr):
    """Every HBM read of compressed tile ``ti`` of pool row ``bh`` (packed K and V, their s2/zero and stage-1
    scales): ``(k codes, k s2, k zero, k scale, v codes, v s2, v zero, v scale)``."""
    TPB: tl.constexpr = BS // BLOCK_N
    slot = bh * CAP + ti // TPB
    r0 = (ti % TPB) * BLOCK_N
    kc, ks2, kz = load_packed_raw(kc_ptr, ks2_ptr, kz_ptr, slot, r0, d, D, BS, BLOCK_N, BITS, K_CHANNEL, WORDS)
    vc, vs2, vz = load_packed_raw(vc_ptr, vs2_ptr, vz_ptr, slot, r0, d, D, BS, BLOCK_N, BITS, V_CHANNEL, WORDS)
    return kc, ks2, kz, tl.load(ks_ptr + slot), vc, vs2, vz, tl.load(vs_ptr + slot)


@triton.jit
def _walk_compressed(acc, m_i, l_i, q8, q16, qs, rvalid, qpos, pad_b, d, D, window, t_begin, c_end, n_ct,
                     kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, bh, CAP,
                     BS: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr,
                     K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     EXP_MODE: tl.constexpr, PV_MODE: tl.constexpr, N_R: tl.constexpr, Y_R: tl.constexpr,
                     L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr,
                     L5: tl.constexpr, L6: tl.constexpr, L7: tl.constexpr, L8: tl.constexpr,
                     SKIP_EMPTY: tl.constexpr, PREFETCH: tl.constexpr, FOLD_V: tl.constexpr, REBUILD: tl.constexpr,
                     ASM: tl.constexpr):
    """The compressed tiles ``[t_begin, c_end)`` of pool row ``bh`` (one bit-width pool) folded into the online
    softmax state ``(acc, m_i, l_i)``, which is returned."""
    WORDS: tl.constexpr = REBUILD == 2
    offs_n = tl.arange(0, BLOCK_N)
    # software prefetch: the packed reads of tile ti + 1 are issued before tile ti is rebuilt and attended, so
    # the HBM latency of one tile hides behind the arithmetic of the previous one (the loop is latency-bound
    # otherwise: few programs fit an SM next to the unpacked INT8 tiles)
    kc, ks2, kz, ksc, vc, vs2, vz, vsc = _load_comp_tile(
        kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, bh, CAP, tl.minimum(t_begin, n_ct - 1), d, D,
        BS, BLOCK_N, BITS, K_CHANNEL, V_CHANNEL, WORDS)
    for ti in range(t_begin, c_end):
        if PREFETCH:
            nk, nks2, nkz, nksc, nv, nvs2, nvz, nvsc = _load_comp_tile(
                kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, bh, CAP,
                tl.minimum(ti + 1, c_end - 1), d, D, BS, BLOCK_N, BITS, K_CHANNEL, V_CHANNEL, WORDS)
        else:
            kc, ks2, kz, ksc, vc, vs2, vz, vsc = _load_comp_tile(
                kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, bh, CAP, ti, d, D,
                BS, BLOCK_N, BITS, K_CHANNEL, V_CHANNEL, WORDS)
        if REBUILD:
            s = qk_dot(q16, rebuild_packed_f16(kc, ks2, kz, BLOCK_N, DP, BITS, K_CHANNEL, WORDS, ASM))
        else:
            s = qk_dot(q8, rebuild_packed(kc, ks2, kz, d, D, BLOCK_N, BITS, K_CHANNEL).to(tl.int8))
        c = qs * ksc
        kpos = ti * BLOCK_N + offs_n
        vis = rvalid[:, None] & (kpos[None, :] >= pad_b)
        if CAUSAL:
            vis = vis & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            vis = vis & (qpos[:, None] - kpos[None, :] < window)
        if REBUILD:  # FP16 PV on the INT8 codes (FOLD_V), built in fp16
            v = rebuild_packed_f16(vc, vs2, vz, BLOCK_N, DP, BITS, V_CHANNEL, WORDS, ASM)
        else:
            v = prep_v(rebuild_packed(vc, vs2, vz, d, D, BLOCK_N, BITS, V_CHANNEL), vsc, PV_MODE, FOLD_V)
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, c, vis, v, vsc,
                                      EXP_MODE, PV_MODE, N_R, Y_R, L1, L2, L3, L4, L5, L6, L7, L8, SKIP_EMPTY,
                                      FOLD_V=FOLD_V)
        if PREFETCH:
            kc, ks2, kz, ksc, vc, vs2, vz, vsc = nk, nks2, nkz, nksc, nv, nvs2, nvz, nvsc
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["NSPLIT", "EXT", "CAP", "CAP_LO", "n_comp", "T_seg", "seg_start", "q_start", "T_old"])
def _decode_kernel(
    q_ptr, sqb, sqh, sqs, sqd, q_mult, Hq,
    acc_ptr, m_ptr, l_ptr, lock_ptr, NSPLIT, EXT, o_ptr, sob, soh, sos, sod,
    hmap_ptr, pad_ptr, NB,
    kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr, HB, CAP, n_comp,
    lo_hmap_ptr, lo_kc_ptr, lo_ks_ptr, lo_ks2_ptr, lo_kz_ptr, lo_vc_ptr, lo_vs_ptr, lo_vs2_ptr, lo_vz_ptr,
    HB_LO, CAP_LO,
    tk_ptr, stkb, stkh, stkt, stkd, tv_ptr, stvb, stvh, stvt, stvd, T_seg, seg_start,
    nk_ptr, snkb, snkh, snkt, snkd, nv_ptr, snvb, snvh, snvt, snvd, T_old, mu_ptr, smb, smh, smd,
    Sq, q_start, D, window,
    G: tl.constexpr, QB: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
    BITS: tl.constexpr, LO_BITS: tl.constexpr, K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr,
    HAS_COMP: tl.constexpr, HAS_SEG: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
    EXP_MODE: tl.constexpr, PV_MODE: tl.constexpr, N_R: tl.constexpr, Y_R: tl.constexpr,
    L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr,
    L5: tl.constexpr, L6: tl.constexpr, L7: tl.constexpr, L8: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, PREFETCH: tl.constexpr, FOLD_V: tl.constexpr, REBUILD: tl.constexpr,
    ASM: tl.constexpr, DIRECT: tl.constexpr, WRITE_NEW: tl.constexpr, SUB_MEAN: tl.constexpr,
    TAIL_V16: tl.constexpr,
):
    sp = tl.program_id(0)
    pid = tl.program_id(1)
    # programs [0, NB * HB) serve the BITS pool's heads, the next NB * HB_LO (LO_BITS > 0) the LO_BITS pool's
    if LO_BITS > 0:
        lo = pid >= NB * HB
    else:
        lo: tl.constexpr = False  # one pool: the second pool's branches are not compiled
    if lo:
        b = ((pid - NB * HB) // HB_LO).to(tl.int64)  # 64-bit offsets: a pool can pass 2^31 bytes
        j = (pid - NB * HB) % HB_LO
        h = tl.load(lo_hmap_ptr + j)
    else:
        b = (pid // HB).to(tl.int64)
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
    # Q stage 1 in registers: one INT8 scale per (query head, QB query rows), as quantize_pack.stage1 computes it
    qf = tl.load(q_ptr + b * sqb + hq[:, None] * sqh + i[:, None] * sqs + d[None, :] * sqd,
                 mask=rvalid[:, None] & dm[None, :], other=0.0).to(tl.float32)
    row_amax = tl.max(tl.abs(qf), axis=1)
    qkey = g * BLOCK_M + i // QB
    q_amax = tl.max(tl.where(qkey[:, None] == qkey[None, :], row_amax[None, :], 0.0), axis=1)
    q_amax = tl.where(q_amax > 0, q_amax, 1.0)
    q8 = stage1_codes(qf, stage1_inv(q_amax)[:, None]).to(tl.int8)
    qs = stage1_scale(q_amax) * q_mult
    q16 = q8.to(tl.float16)  # the same integers, the operand of the FP16 dot over compressed tiles (REBUILD > 0)
    qpos = q_start + i
    if HAS_PAD:
        pad_b = tl.load(pad_ptr + b)
    else:
        pad_b = 0

    # work units in position order: compressed tiles of BLOCK_N keys, then FP16 tail blocks of BS keys
    TPB: tl.constexpr = BS // BLOCK_N
    n_ct = n_comp * TPB
    total = n_ct + (T_seg + BS - 1) // BS
    tps = (total + NSPLIT - 1) // NSPLIT
    t_begin = sp * tps
    t_end = tl.minimum(t_begin + tps, total)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    if HAS_COMP:
        c_end = tl.minimum(t_end, n_ct)
        if lo:
            acc, m_i, l_i = _walk_compressed(
                acc, m_i, l_i, q8, q16, qs, rvalid, qpos, pad_b, d, D, window, t_begin, c_end, n_ct,
                lo_kc_ptr, lo_ks_ptr, lo_ks2_ptr, lo_kz_ptr, lo_vc_ptr, lo_vs_ptr, lo_vs2_ptr, lo_vz_ptr,
                b * HB_LO + j, CAP_LO, BS, BLOCK_N, DP, LO_BITS, K_CHANNEL, V_CHANNEL,
                CAUSAL, HAS_WINDOW, EXP_MODE, PV_MODE, N_R, Y_R, L1, L2, L3, L4, L5, L6, L7, L8, SKIP_EMPTY,
                PREFETCH, FOLD_V, REBUILD, ASM)
        else:
            acc, m_i, l_i = _walk_compressed(
                acc, m_i, l_i, q8, q16, qs, rvalid, qpos, pad_b, d, D, window, t_begin, c_end, n_ct,
                kc_ptr, ks_ptr, ks2_ptr, kz_ptr, vc_ptr, vs_ptr, vs2_ptr, vz_ptr,
                b * HB + j, CAP, BS, BLOCK_N, DP, BITS, K_CHANNEL, V_CHANNEL,
                CAUSAL, HAS_WINDOW, EXP_MODE, PV_MODE, N_R, Y_R, L1, L2, L3, L4, L5, L6, L7, L8, SKIP_EMPTY,
                PREFETCH, FOLD_V, REBUILD, ASM)
    if HAS_SEG:
        # the FP16 tail (old buffer + this step's tokens), stage 1 per block in registers (buffer_attention="int8"):
        # the same codes and scales quantize_pack.stage1 would write, without its launch and round trip; with
        # TAIL_V16 (tail_v="fp16", FP16 PV) the values are multiplied as stored, in FP16
        offs_b = tl.arange(0, BS)
        for tb in range(tl.maximum(t_begin, n_ct) - n_ct, t_end - n_ct):
            t = tb * BS + offs_b
            tm = t < T_seg
            msk = tm[:, None] & dm[None, :]
            kf = _tail_rows(tk_ptr, stkb, stkh, stkt, stkd, nk_ptr, snkb, snkh, snkt, snkd, mu_ptr, smb, smh, smd,
                            b, h, t, d, dm, msk, T_old, WRITE_NEW, SUB_MEAN)
            k_amax = tl.max(tl.max(tl.abs(kf), axis=1), axis=0)
            k_amax = tl.where(k_amax > 0, k_amax, 1.0)
            k8 = stage1_codes(kf, stage1_inv(k_amax))
            s = qk_dot(q8, k8.to(tl.int8))
            c = qs * stage1_scale(k_amax)
            kpos = seg_start + t
            vis = rvalid[:, None] & tm[None, :] & (kpos[None, :] >= pad_b)
            if CAUSAL:
                vis = vis & (kpos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                vis = vis & (qpos[:, None] - kpos[None, :] < window)
            vf = _tail_rows(tv_ptr, stvb, stvh, stvt, stvd, nv_ptr, snvb, snvh, snvt, snvd, mu_ptr, smb, smh, smd,
                            b, h, t, d, dm, msk, T_old, WRITE_NEW, False)
            if TAIL_V16:
                vsc = 1.0  # FOLD_V multiplies the FP32 partial by it: exact
                v = vf.to(tl.float16)
            else:
                v_amax = tl.max(tl.max(tl.abs(vf), axis=1), axis=0)
                v_amax = tl.where(v_amax > 0, v_amax, 1.0)
                vsc = stage1_scale(v_amax)
                v = prep_v(stage1_codes(vf, stage1_inv(v_amax)), vsc, PV_MODE, FOLD_V)
            acc, m_i, l_i = online_update(acc, m_i, l_i, s, c, vis, v, vsc,
                                          EXP_MODE, PV_MODE, N_R, Y_R, L1, L2, L3, L4, L5, L6, L7, L8, SKIP_EMPTY,
                                          FOLD_V=FOLD_V)
    if DIRECT:  # one program holds the whole context: normalize and write the output (no merge)
        o = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    else:
        prow = row * (EXT + NSPLIT) + EXT + sp
        tl.store(m_ptr + prow, m_i, mask=rvalid)
        tl.store(l_ptr + prow, l_i, mask=rvalid)
        tl.store(acc_ptr + prow[:, None] * DP + d[None, :], acc, mask=rvalid[:, None])
        # the last split of this (sequence, KV head) to finish merges all of them (no merge launch): every thread's
        # partial stores are issued (barrier) and released (acq_rel) before the counter moves; the last program
        # reads the partials from L2 (.cg) and resets the counter for the next step
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
        if arrived != NSPLIT - 1:
            return
        o = _merge_splits(acc_ptr, m_ptr, l_ptr, row, rvalid, d, EXT + NSPLIT, BLOCK_M, DP, EXP_MODE)
        tl.atomic_xchg(lock_ptr + pid, 0)
    tl.store(o_ptr + b * sob + hq[:, None] * soh + i[:, None] * sos + d[None, :] * sod,
             o.to(o_ptr.dtype.element_ty), mask=rvalid[:, None] & dm[None, :])


@triton.jit
def _tail_rows(buf_ptr, sb, sh, st, sd, new_ptr, nb, nh, nt, nd, mu_ptr, smb, smh, smd, b, h, t, d, dm, msk, T_old,
               WRITE_NEW: tl.constexpr, SUB_MEAN: tl.constexpr):
    """Tail rows ``t`` of head ``h`` as float32 ``[BS, DP]``: read from the FP16 buffer, except (``WRITE_NEW``) rows
    ``t >= T_old``, the step's pending tokens (``TurboLayer.pending``), which are read from ``new_ptr``, stored in the
    buffer's dtype (minus K smoothing's mu with ``SUB_MEAN``, in FP32 like ``torch.sub``) and written into the buffer
    at ``t``: the values attended are the values stored. Each tail row belongs to one program of one launch, so each
    pending token is written once."""
    buf = buf_ptr + b * sb + h * sh + t[:, None] * st + d[None, :] * sd
    if WRITE_NEW:
        is_new = msk & (t >= T_old)[:, None]
        x = tl.load(buf, mask=msk & (t < T_old)[:, None], other=0.0)
        new = tl.load(new_ptr + b * nb + h * nh + (t - T_old)[:, None] * nt + d[None, :] * nd, mask=is_new,
                      other=0.0)
        if SUB_MEAN:
            mu = tl.load(mu_ptr + b * smb + h * smh + d * smd, mask=dm, other=0.0)
            new = new.to(tl.float32) - mu.to(tl.float32)[None, :]
        new = new.to(buf_ptr.dtype.element_ty)
        tl.store(buf, new, mask=is_new)
        x = tl.where(is_new, new, x)
    else:
        x = tl.load(buf, mask=msk, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _merge_splits(acc_ptr, m_ptr, l_ptr, row, rvalid, d, NSPLIT,
                  BLOCK_M: tl.constexpr, DP: tl.constexpr, EXP_MODE: tl.constexpr):
    """Log-sum-exp merge of the ``NSPLIT`` partial ``(acc, m, l)`` of rows ``row``: the normalized output, float32
    ``[BLOCK_M, DP]``. The partial maxima are in log2 units (natural units for SAS base e, EXP_MODE 1). The partials
    are read ``CH`` at a time (independent loads in flight together: the merge is latency-bound, one program per
    (sequence, KV head))."""
    CH: tl.constexpr = 4
    to_log2 = 1.4426950408889634 if EXP_MODE == 1 else 1.0  # log2(e)
    first = tl.zeros([BLOCK_M], tl.int32)  # split indices as vectors: masks of row shape (Triton 3.9's interpreter
    # refuses a scalar mask there)
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for sp0 in range(0, NSPLIT, CH):
        for u in tl.static_range(CH):
            ok = rvalid & (first + sp0 + u < NSPLIT)
            mx = tl.maximum(mx, tl.load(m_ptr + row * NSPLIT + sp0 + u, mask=ok, other=float("-inf"),
                                        cache_modifier=".cg"))
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    num = tl.zeros([BLOCK_M, DP], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    for sp0 in range(0, NSPLIT, CH):
        for u in tl.static_range(CH):
            prow = row * NSPLIT + sp0 + u
            ok = rvalid & (first + sp0 + u < NSPLIT)
            m = tl.load(m_ptr + prow, mask=ok, other=float("-inf"), cache_modifier=".cg")
            w = tl.where(m == float("-inf"), 0.0, tl.exp2((m - mx) * to_log2))
            den += w * tl.load(l_ptr + prow, mask=ok, other=0.0, cache_modifier=".cg")
            num += w[:, None] * tl.load(acc_ptr + prow[:, None] * DP + d[None, :], mask=ok[:, None], other=0.0,
                                        cache_modifier=".cg")
    return tl.where(den[:, None] > 0, num / tl.maximum(den, 1e-30)[:, None], 0.0)


# rebuild of the packed codes: integer ops + INT8 dot; FP16 ops from bytes; FP16 ops from int32 words (fewest
# instructions: two codes per shift + LOP3, see _tiles.word_codes_f16) + FP16 dots
REBUILDS = {"int": 0, "fp16": 1, "words": 2}
_DECODE = CachedLauncher(_decode_kernel)  # launched once per layer per token: see _launch.py


def use_decode(sq: int, g: int, split) -> bool:
    """Short queries go to the decode kernel (GQA rows packed); longer ones to the prefill kernel."""
    return sq * g <= 64 and sq <= 16


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_split(bsz: int, hkv: int, total_tiles: int, on_gpu: bool, mult: int | None = None, max_split: int = 32,
                 resident: int | None = None, device_index: int | None = None) -> int:
    """Context splits per (sequence, KV head), at most ``max_split`` and at least 4 tiles each. The GPU runs the
    ``bsz * hkv * split`` programs in waves of ``resident`` per SM (default 2, the decode kernel's count at hd 128 when
    it was measured), all with the same work, so the time goes as waves x tiles per program; the split that minimizes
    that (plus a quarter tile per split for the merge: the last split to finish reads the partials one after another)
    is chosen, or the fewest splits within 3% of it. A wave left mostly empty costs as much as a full one
    (eval/results/decode_tuning.json, B=16 32k).
    ``mult``: instead, enough splits for ``mult`` programs per SM (the rule before the wave model; benchmarks)."""
    if not on_gpu or total_tiles < 8:
        return 1
    sms = _sm_count(torch.cuda.current_device() if device_index is None else device_index)
    pairs = max(1, bsz * hkv)
    top = max(1, min(total_tiles // 4, max_split))
    if mult is not None:
        return max(1, min(math.ceil(mult * sms / pairs), top))
    return _fewest_waves(pairs, total_tiles, sms * (resident or 2), top)


@functools.lru_cache(maxsize=4096)
def _fewest_waves(pairs: int, total_tiles: int, slots: int, top: int) -> int:
    """:func:`choose_split`'s wave model (memoized: it runs once per layer per generated token)."""
    cost = {s: math.ceil(pairs * s / slots) * math.ceil(total_tiles / s) + 0.25 * (s > 1) * s for s in range(1, top + 1)}
    best = min(cost.values())
    return min(s for s, c in cost.items() if c <= 1.03 * best)  # the fewest splits within 3% of the best


def default_warps(bsz: int, hkv: int) -> int:
    """Warps per decode program: 2 once there are enough (sequence, KV head) pairs to fill the GPU without many
    splits (more programs per SM, half the cross-warp softmax reductions: B=16 and B=64 at 32k context ran 1.2x
    faster than with 4 warps, eval/results/decode_tuning.json), else 4 (batch 1 ran faster with 4)."""
    return 2 if bsz * hkv >= 64 else 4


def _head_maps(layer, device) -> dict:
    """int32 head indices per bit-width pool, converted once per layer (``layer.kernel_cache`` is reset when the
    head groups change), not once per step."""
    maps = layer.kernel_cache.get("head_maps")
    if maps is None:
        maps = {b: idx.to(device=device, dtype=torch.int32) for b, idx in layer.groups.items() if idx.numel()}
        layer.kernel_cache["head_maps"] = maps
    return maps


# runtime arguments of _decode_kernel that change from step to step, in the order decode_layer passes them (the
# others are fixed for a layer's pools, scratch and constants)
_DECODE_VARYING = ("q_ptr", "sqb", "sqh", "sqs", "sqd", "NSPLIT", "EXT", "o_ptr", "pad_ptr", "n_comp",
                   "tk_ptr", "stkb", "stkh", "stkt", "stkd", "tv_ptr", "stvb", "stvh", "stvt", "stvd", "T_seg",
                   "seg_start", "nk_ptr", "snkb", "snkh", "snkt", "snkd", "nv_ptr", "snvb", "snvh", "snvt", "snvd",
                   "T_old", "q_start")


class _DecodePlan:
    """The fixed part of a layer's decode launches (pools, head maps, split scratch, constants), built once and
    reused by every step until something fixed changes (see :func:`_plan`); each launch binds its fixed arguments
    (:class:`~._launch.BoundLaunch`), so a step only supplies the query, output, tail and lengths."""

    def __init__(self, query, layer, sm_scale, causal, has_pad, sliding_window, has_comp, has_seg, tuning, mma):
        turbo = layer.turbo
        bsz, hq, sq, d = query.shape
        g = hq // layer.num_heads
        exp_c = exp_constants(turbo)
        self.q_mult = float(sm_scale) * (LOG2E if exp_c["EXP_MODE"] != 1 else 1.0)
        self.maps = _head_maps(layer, query.device)
        if len(self.maps) > 2:
            raise NotImplementedError(f"the decode kernel serves at most two bit-width pools, got {sorted(self.maps)}")
        # one launch serves every pool (the first's heads, then the second's): programs per sequence and split
        self.heads = sum(hmap.numel() for hmap in self.maps.values())
        self.tiles_per_block = turbo.block_size // turbo.block_n
        self.dp = next_pow2(d)
        self.out_strides = (sq * hq * d, d, hq * d, 1)  # torch.empty(B, Sq, Hq, D).transpose(1, 2)
        num_warps, num_stages, prefetch, fold_v, rebuild = tuning
        self.window = int(sliding_window) if sliding_window is not None else 0
        self.kwargs = dict(
            G=g, QB=turbo.block_m, BS=turbo.block_size, BLOCK_M=max(16, next_pow2(g * sq)), BLOCK_N=turbo.block_n,
            DP=self.dp, K_CHANNEL=turbo.k_axis == "channel", V_CHANNEL=turbo.v_axis == "channel",
            HAS_COMP=has_comp and not mma, HAS_SEG=has_seg, CAUSAL=bool(causal), HAS_PAD=has_pad,
            HAS_WINDOW=sliding_window is not None, PV_MODE=PV_MODES[turbo.pv], SKIP_EMPTY=turbo.exp == "sas",
            **exp_c, PREFETCH=bool(prefetch), FOLD_V=bool(fold_v) and turbo.pv == "fp16",
            REBUILD=REBUILDS[rebuild] if fold_v and turbo.pv == "fp16" else 0,
            SUB_MEAN=layer.k_mean is not None, TAIL_V16=turbo.tail_v_precision == "fp16",
            ASM=query.device.type == "cuda",  # packed PTX when compiled; plain Triton in the interpreter
            num_warps=num_warps or default_warps(bsz, self.heads), num_stages=num_stages,
        )
        mu = layer.k_mean  # K smoothing's mean [B, H, 1, D], subtracted from pending keys (WRITE_NEW)
        self.mean = (mu, mu.stride(0), mu.stride(1), mu.stride(3)) if mu is not None else None
        self.shape, self.device = (bsz, hq, sq, d), query.device  # no reference to the layer: it holds the plan
        self.mma = mma  # the compressed tiles go to decode_mma's walk, the Triton launch attends to the tail and merges
        self.walk_resident = None  # programs per SM of the walk kernel (choose_split), known after its first launch
        self.walks = {}  # bit width -> the bound walk launch of that pool (mma)
        self.launches = {}
        self.resident = None  # programs per SM of the compiled kernel, known after its first launch (choose_split)
        self.splits = {}  # (context tiles, split rule) -> splits, once the kernel's residency is known
        self.scratch_splits = 0
        self.scratch = None

    def _ensure_scratch(self, nsplit: int) -> None:
        """Partial results of ``nsplit`` splits (``acc [B, Hq, Sq, nsplit, DP]``, ``m``, ``l`` float32) and one
        arrival counter per (sequence, KV head) program (int32, zero; the merging program resets it), kept across
        steps."""
        if nsplit <= self.scratch_splits:
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # memory allocated during capture belongs to the graph's pool; kept across steps it would be reused
            raise RuntimeError(
                f"decode_layer: {nsplit} context splits need new scratch during CUDA-graph capture; run one eager "
                "step with the same batch and context first (or pass split= at most the splits already used)"
            )
        bsz, hq, sq, d = self.shape
        f32 = dict(dtype=torch.float32, device=self.device)
        self.scratch = (
            torch.empty(bsz, hq, sq, nsplit, self.dp, **f32), torch.empty(bsz, hq, sq, nsplit, **f32),
            torch.empty(bsz, hq, sq, nsplit, **f32),
            torch.zeros(bsz * self.heads, dtype=torch.int32, device=self.device),
        )
        self.scratch_splits = nsplit
        self.launches = {k: v for k, v in self.launches.items() if k[0]}  # split launches held the old scratch
        self.walks = {}

    def decode(self, layer, nsplit, write_new, ext=0):
        """The bound decode launch of ``layer``'s pools for ``nsplit`` splits (1 and no ``ext`` partials written
        before it: one program per KV head writes the output; else the last split to finish merges them all),
        writing the layer's pending tokens into its buffer if ``write_new``."""
        direct = nsplit == 1 and not ext
        if not direct:
            self._ensure_scratch(nsplit + ext)
        bound = self.launches.get((direct, write_new))
        if bound is None:
            bound = self.launches[(direct, write_new)] = self._bind(layer, direct, write_new)
        return bound

    def walk(self, layer, query, pad, nsplit, q_start, device_index):
        """Launch :mod:`.decode_mma`'s walk of the compressed tiles (one bound launch per bit-width pool): ``nsplit``
        splits, writing partials ``0 .. nsplit - 1`` of the ``nsplit + 1`` per row (the Triton launch adds the
        tail's and merges)."""
        self._ensure_scratch(nsplit + 1)
        bsz = query.shape[0]
        for bits, hmap in self.maps.items():
            bound = self.walks.get(bits)
            if bound is None:
                bound = self.walks[bits] = bind_walk(
                    layer.pools[bits], hmap, self.scratch[:3], hq=self.shape[1], d=self.shape[3], q_mult=self.q_mult,
                    turbo=layer.turbo, has_pad=self.kwargs["HAS_PAD"],
                    window=self.window if self.kwargs["HAS_WINDOW"] else None, bits=bits, g=self.kwargs["G"],
                    on_gpu=device_index is not None)
            bound((nsplit, bsz * hmap.numel()), query, query.stride(0), query.stride(1), query.stride(3), nsplit,
                  nsplit + 1, pad if pad is not None else hmap, layer.blocks_before, q_start,
                  device_index=device_index)
            if self.walk_resident is None and bound.kernel is not None:
                self.walk_resident = resident_per_sm(bound.kernel, device_index)

    def _bind(self, layer, direct, write_new):
        bsz, hq, sq, d = self.shape
        pools = list(self.maps.items())
        two = len(pools) == 2
        pools += pools[:1] * (2 - len(pools))  # one pool: it also stands in for the (unused) second
        (bits, hmap), (lo_bits, _) = pools
        sob, soh, sos, sod = self.out_strides
        fixed = dict(q_mult=self.q_mult, Hq=hq, sob=sob, soh=soh, sos=sos, sod=sod, NB=bsz, Sq=sq, D=d,
                     window=self.window)
        kwargs = dict(self.kwargs, BITS=bits, LO_BITS=lo_bits if two else 0, DIRECT=direct, WRITE_NEW=write_new)
        fixed.update(zip(("mu_ptr", "smb", "smh", "smd"), self.mean if self.mean is not None else (hmap, 0, 0, 0)))
        fields = ("k_codes", "k_scale", "k_s2", "k_zero", "v_codes", "v_scale", "v_s2", "v_zero")
        pointers = ("kc_ptr", "ks_ptr", "ks2_ptr", "kz_ptr", "vc_ptr", "vs_ptr", "vs2_ptr", "vz_ptr")
        for prefix, (hb, cap), (b, idx) in zip(("", "lo_"), (("HB", "CAP"), ("HB_LO", "CAP_LO")), pools):
            names = [prefix + n for n in pointers]
            fixed.update({prefix + "hmap_ptr": idx, hb: idx.numel()})
            if b == 8:  # the FP16 rebuilds are checked on the GPU for 2- and 4-bit pools only (tests/gpu)
                kwargs["REBUILD"] = 0
            if self.kwargs["HAS_COMP"]:
                pool = layer.pools[b]
                fixed.update({n: pool[f] for n, f in zip(names, fields)}, **{cap: pool["k_scale"].shape[2]})
                if kwargs["REBUILD"] == 2 and (d * b % 32 or any(pool[f].data_ptr() % 4 for f in fields[::4])):
                    kwargs["REBUILD"] = 1  # word loads need whole words per row and 4-byte aligned pools
            else:  # nothing compressed yet: any tensor stands in for the pools
                fixed.update(dict.fromkeys(names, idx), **{cap: 1})
        scratch = ("acc_ptr", "m_ptr", "l_ptr", "lock_ptr")
        fixed.update(zip(scratch, (hmap,) * 4 if direct else self.scratch))  # direct: no partials, any tensor
        return _DECODE.bind(fixed, kwargs, _DECODE_VARYING)


def _plan(layer, query, sm_scale, causal, pad, sliding_window, has_comp, has_seg, tuning, mma) -> _DecodePlan:
    """The layer's cached :class:`_DecodePlan`, rebuilt when the query's shape/dtype/device or the call's constants
    differ from the last step's; the layer drops it (``kernel_cache``) whenever its head groups or pools are replaced
    (growth, reorder, crop)."""
    sig = (query.shape, query.dtype, query.get_device(), sm_scale, causal, pad is None, sliding_window, has_comp,
           has_seg, tuning, mma)
    cached = layer.kernel_cache.get("decode_plan")
    if cached is not None and cached[0] == sig:
        return cached[1]
    plan = _DecodePlan(query, layer, sm_scale, causal, pad is not None, sliding_window, has_comp, has_seg, tuning,
                       mma)
    layer.kernel_cache["decode_plan"] = (sig, plan)
    return plan


def decode_layer(query, layer, *, sm_scale, causal, pad=None, sliding_window=None, split=None,
                 num_warps=None, num_stages=1, prefetch=True, fold_v=True, rebuild="words", split_mult=None,
                 max_split=32, walk="auto"):
    """Decode attention of ``query [B, Hq, Sq, D]`` over ``layer``: its blocks compressed before this step and its
    FP16 tail (``layer._tail_k/_tail_v``, quantized per block inside the kernel) and, if the layer has
    :attr:`~hf_turbo.cache.TurboLayer.pending` tokens, those too (the kernel writes them into the buffer). One
    decode launch for all bit-width pools (a split context is merged by its last split to finish); the output is
    written in ``[B, Sq, Hq, D]`` memory order (returned as a ``[B, Hq, Sq, D]`` view: transformers' layout is then
    free).

    ``split``: context splits (default :func:`choose_split`: the fewest waves of programs, at most ``max_split``, or
    for the MMA walk at most ``max(max_split, decode_mma.WALK_MAX_SPLIT)``;
    ``split_mult``: the older rule of that many programs per SM; with one split, the program normalizes and writes
    the output itself); ``prefetch``: issue the next packed tile's reads before computing on this one; ``fold_v``:
    FP16 PV on the INT8 codes with the V scale applied after the product; ``rebuild`` (with ``fold_v`` and FP16 PV):
    "words" / "fp16" build the INT8 values of the packed codes in FP16 arithmetic from int32 words / from bytes and
    run QK^T as an (exact) FP16 dot, "int" in integer arithmetic with an INT8 dot (:data:`REBUILDS`); ``num_warps``
    (default :func:`default_warps`) and ``num_stages``: Triton launch options (eval/bench_decode_tuning.py);
    ``walk``: who attends to the compressed blocks: "triton" (this kernel), "mma" (:mod:`.decode_mma`, operands
    unpacked straight into the MMA registers; then this kernel attends to the tail and merges: two launches; raises
    if the configuration is not one it computes) or "auto" (:func:`.decode_mma.walk_choice`: "mma" on the GPU once
    the compressed context is long enough to pay for the second launch).

    The host side of a step is kept small (it runs once per layer per generated token): the fixed launch arguments
    live in a per-layer :class:`_DecodePlan`."""
    bsz, hq, sq, d = query.shape
    n_comp = layer.blocks_before
    bs = layer.turbo.block_size
    tk, tv = layer._tail_k, layer._tail_v
    t_seg = tk.shape[2] if tk is not None else 0
    dev = query.get_device()  # -1 on CPU (interpreter)
    on_gpu = dev >= 0
    mma = walk_choice(walk, query, layer, fold_v=fold_v, rebuild=rebuild, on_gpu=on_gpu) if n_comp else False
    plan = _plan(layer, query, sm_scale, causal, pad, sliding_window, n_comp > 0, t_seg > 0,
                 (num_warps, num_stages, prefetch, fold_v, rebuild), mma)
    total_tiles = n_comp * plan.tiles_per_block + (t_seg + bs - 1) // bs
    q_start = n_comp * bs + t_seg - sq
    ext = 0
    if mma:  # the compressed tiles in nsplit splits of the walk, then the tail in one program per KV head
        ext = split or plan.splits.get(("walk", n_comp, max_split))
        if ext is None:
            ext = choose_split(bsz, min(h.numel() for h in plan.maps.values()), n_comp * plan.tiles_per_block,
                               on_gpu, None, max(max_split, WALK_MAX_SPLIT), plan.walk_resident, dev)  # per pool
            if plan.walk_resident is not None or not on_gpu:
                plan.splits[("walk", n_comp, max_split)] = ext
        plan.walk(layer, query, pad, ext, q_start, dev if on_gpu else None)
        nsplit = 1
    else:
        nsplit = split or plan.splits.get((total_tiles, split_mult, max_split))
    if nsplit is None:  # chosen once per context length (and rule) for this plan
        nsplit = choose_split(bsz, plan.heads, total_tiles, on_gpu, split_mult, max_split, plan.resident, dev)
        if plan.resident is not None or not on_gpu:
            plan.splits[(total_tiles, split_mult, max_split)] = nsplit
    out = query.new_empty((bsz, sq, hq, d)).transpose(1, 2)
    pending = layer.pending  # this step's tokens, not yet in the buffer: the launches write them (their tail rows)
    if pending is not None:
        nk, nv, t_old = pending
        new = (nk, *nk.stride(), nv, *nv.stride(), t_old)
    else:
        new = (query, 0, 0, 0, 0) * 2 + (t_seg,)  # unused (WRITE_NEW off): any tensor of a fixed dtype
    hmap = next(iter(plan.maps.values()))
    tail = (tk, *tk.stride(), tv, *tv.stride(), t_seg, n_comp * bs) if t_seg else (hmap, 0, 0, 0, 0) * 2 + (0, 0)
    bound = plan.decode(layer, nsplit, pending is not None, ext)
    bound(
        (nsplit, bsz * plan.heads), query, *query.stride(), nsplit, ext, out, pad if pad is not None else hmap,
        n_comp, *tail, *new, q_start, device_index=dev if on_gpu else None,
    )
    if plan.resident is None and bound.kernel is not None:
        plan.resident = resident_per_sm(bound.kernel, dev)
    layer.pending = None  # written (a failed launch above leaves them pending: write_pending still has them)
    layer.kernel_cache["writes_pending"] = True  # the next decode step of this layer may leave its tokens pending
    return out
