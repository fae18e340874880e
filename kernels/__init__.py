"""Triton kernels of TurboAttention, installed as ``hf_turbo.kernels``.

Status: not written yet (issue 4). :func:`unavailable_reason` says so, and :mod:`hf_turbo.ops` then runs the PyTorch
reference on CUDA with a warning.
"""

from __future__ import annotations


def unavailable_reason(device) -> str | None:
    """None when the kernels can run on ``device``; otherwise why not."""
    return "the Triton kernels are not implemented yet"
