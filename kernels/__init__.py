"""Triton kernels of TurboAttention, installed as ``hf_turbo.kernels`` (source: ``kernels/`` at the repo root).

Contract with :mod:`hf_turbo.ops` (every function computes what the reference in :mod:`hf_turbo.quant` defines):

* ``unavailable_reason(device) -> str | None``
* ``compress_into(layer, k, v)``: BPQ of ``k, v [B, H, nb * block_size, D]`` written into ``layer.pools`` at blocks
  ``layer.n_blocks ..`` (the caller then advances ``n_blocks``), like ``TurboLayer._compress``'s reference branch.
* ``attend_layer(query, layer, *, sm_scale, causal, pad, sliding_window) -> [B, Hq, Sq, D]``: attention over
  ``layer.attention_segments()`` (compressed blocks before this step + the FP16 tail).
* ``prefill(query, key, value, turbo, *, sm_scale, causal, pad, sliding_window) -> [B, Hq, Sq, D]``: no-cache path.

``pad`` is None or int32 ``[B]`` leading padding per row (left padding).

Status: not written yet (issue 4): :func:`unavailable_reason` says so, and ops runs the reference on CUDA with a warning.
"""

from __future__ import annotations


def unavailable_reason(device) -> str | None:
    """None when the kernels can run on ``device``; otherwise why not."""
    return "the Triton kernels are not implemented yet"
