"""Triton kernels of TurboAttention, installed as ``hf_turbo.kernels`` (source: ``kernels/`` at the repo root).

Contract with :mod:`hf_turbo.ops` (every function computes what the reference in :mod:`hf_turbo.quant` defines):

* ``unavailable_reason(device, allow_interpreter=False) -> str | None``
* ``unsupported(turbo) -> str | None``: a TurboConfig choice the compiled kernels do not compute; ops then runs the
  reference, with a warning, and the functions below raise NotImplementedError (``check_supported``).
* ``compress_into(layer, k, v)``: BPQ of ``k, v [B, H, nb * block_size, D]`` written into ``layer.pools`` at blocks
  ``layer.n_blocks ..`` (the caller then advances ``n_blocks``), like ``TurboLayer._compress``'s reference branch
  (:mod:`.quantize_pack`).
* ``attend_layer(query, layer, *, sm_scale, causal, pad, sliding_window) -> [B, Hq, Sq, D]``: attention over
  ``layer.attention_segments()`` (compressed blocks before this step + the FP16 tail quantized per block on the fly):
  :mod:`.prefill` for query blocks, :mod:`.decode` (GQA heads packed into the MMA rows, split context, LSE merge)
  for short queries; on the GPU with enough (sequence, KV head) pairs and compressed tiles
  (:func:`.decode_mma.walk_choice`), :mod:`.decode_mma` (Gluon: packed codes unpacked straight into the MMA operand
  registers) walks the compressed blocks and :mod:`.decode` adds the FP16 tail and merges.
* ``prefill(query, key, value, turbo, *, sm_scale, causal, pad, sliding_window) -> [B, Hq, Sq, D]``: no-cache path.

``pad`` is None or int32 ``[B]`` leading padding per row (left padding). Outputs are in the query dtype.

The kernels are plain Triton (pointer arithmetic, ``out_dtype=tl.int32`` on int8 dots, no libdevice), so they also
run under ``TRITON_INTERPRET=1`` on CPU tensors; that is for tests, which pass ``allow_interpreter=True``: ops
dispatches to the kernels on CUDA only. The one piece of inline PTX (the decode kernel's unpacking of int32 code
words, :func:`._tiles.word_codes_f16`) has a plain-Triton twin computing the same values, used when interpreted; the
GPU suite checks the compiled path bit for bit against the integer rebuild.
"""

from __future__ import annotations

import os

import torch

from .decode import decode_layer, use_decode
from .prefill import check_supported, launch_prefill, prefill, quantize_kv_segment, unsupported  # noqa: F401
from .quantize_pack import compress_into  # noqa: F401


def unavailable_reason(device, allow_interpreter: bool = False) -> str | None:
    """None when the kernels can run on ``device``; otherwise why not."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return f"triton is not importable ({exc!r})"
    if device.type == "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only"
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"compute capability {major}.x < 8.0 (int8 tensor-core dots need Ampere or newer)"
        return None
    if device.type == "cpu" and allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"no Triton kernels for device {device} (CUDA only; CPU only interpreted, for tests)"


def attend_layer(query, layer, *, sm_scale, causal, pad=None, sliding_window=None, split=None, **decode_tuning):
    """Attention of ``query [B, Hq, Sq, D]`` over a :class:`~hf_turbo.cache.TurboLayer`'s state for this step.
    ``decode_tuning``: launch options of :func:`.decode.decode_layer` (benchmarks)."""
    turbo = layer.turbo
    if "supported" not in layer.kernel_cache:  # once per layer (the cache is reset with the layer's storage)
        check_supported(turbo)
        layer.kernel_cache["supported"] = True
    bs = turbo.block_size
    bsz, hq, sq, d = query.shape
    g = hq // layer.num_heads
    if use_decode(sq, g, split):
        return decode_layer(query, layer, sm_scale=sm_scale, causal=causal, pad=pad, sliding_window=sliding_window,
                            split=split, **decode_tuning)
    layer.write_pending()  # the prefill kernel reads the buffer as it is
    seg = None
    if layer._tail_k is not None and layer._tail_k.shape[-2] > 0:
        seg = quantize_kv_segment(layer._tail_k, layer._tail_v, turbo)
        seg["start"] = layer.blocks_before * bs
    out = torch.empty_like(query)
    for bits, idx in layer.groups.items():
        if idx.numel() == 0:
            continue
        comp = dict(pool=layer.pools[bits], bits=bits, n=layer.blocks_before) if layer.blocks_before else None
        launch_prefill(query, out, turbo=turbo, sm_scale=sm_scale, causal=causal, pad=pad,
                       sliding_window=sliding_window, hmap=idx.to(device=query.device, dtype=torch.int32), g=g,
                       comp=comp, seg=seg)
    return out
