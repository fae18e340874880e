"""Dispatch inside the kernels: :func:`attend_layer` (a cache layer's step to :mod:`.prefill` or :mod:`.decode`) and
:func:`unavailable_reason` (whether the kernels run on a device). The contract is in the package docstring
(``hf_turbo.kernels``)."""

from __future__ import annotations

import os

import torch

from .decode import decode_layer, use_decode
from .prefill import check_supported, launch_prefill, quantize_kv_segment


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
