"""Dispatch: one place decides where attention and cache compression run.

CUDA tensors go to the Triton kernels (``hf_turbo.kernels``) when they are importable and support the request;
CPU tensors go to the PyTorch reference (``hf_turbo.quant``). Both take the same arguments and compute the same
function to within FP16 rounding. On CUDA without usable kernels the reference runs and a warning says so once:
nothing pretends to be fast.
"""

from __future__ import annotations

import os
import warnings

import torch

from .quant.attention import KVSegment, no_cache_segments, turbo_attention_reference

_warned: set[str] = set()
_backends: dict = {}  # (device, TRITON_INTERPRET) -> kernels module or None


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def kernel_backend(device: torch.device):
    """The kernels module if Triton kernels can run on ``device``, else None (with the reason warned once).

    Decided once per device (and ``TRITON_INTERPRET`` setting): it is asked on every layer of every decode step."""
    key = (device, os.environ.get("TRITON_INTERPRET"))
    if key not in _backends:
        _backends[key] = _find_backend(device)
    return _backends[key]


def _find_backend(device: torch.device):
    if device.type != "cuda":
        return None
    try:
        from . import kernels
    except Exception as exc:  # pragma: no cover - depends on the GPU machine
        _warn_once(f"hf_turbo: Triton kernels unavailable ({exc!r}); running the PyTorch reference on CUDA (slow)")
        return None
    reason = kernels.unavailable_reason(device)
    if reason:
        _warn_once(f"hf_turbo: Triton kernels unavailable ({reason}); running the PyTorch reference on CUDA (slow)")
        return None
    return kernels


def _backend_for(device: torch.device, turbo):
    """The kernels module if it runs on ``device`` and computes ``turbo``'s choices, else None (reason warned once)."""
    backend = kernel_backend(device)
    if backend is None:
        return None
    why = backend.unsupported(turbo)
    if why:
        _warn_once(f"hf_turbo: Triton kernels do not support this TurboConfig ({why}); running the PyTorch reference")
        return None
    return backend


def per_forward(tensor: torch.Tensor, name: str, step_token: object | None, compute):
    """``compute(tensor)``, kept on ``tensor`` (attribute ``name``) for the forward pass ``step_token``
    (:attr:`hf_turbo.cache.TurboLayer.step_token`): every layer of one forward passes the same mask tensor, so the
    first layer computes and the others reuse; the next forward (a new token) computes again. Without a token
    nothing is kept."""
    if step_token is None:
        return compute(tensor)
    cached = getattr(tensor, name, None)
    if cached is not None and cached[0] is step_token:
        return cached[1]
    value = compute(tensor)
    setattr(tensor, name, (step_token, value))
    return value


def left_padding(key_mask: torch.Tensor | None, step_token: object | None = None) -> torch.Tensor | None:
    """``key_mask [B, S]`` (True = real) -> int32 ``[B]`` count of leading padding, or None without padding.

    Raises if the mask is not left padding (a hole after a real token), which the kernels do not express. The check
    synchronizes with the device, so with a ``step_token`` it runs once per forward pass (:func:`per_forward`)."""
    if key_mask is None:
        return None
    return per_forward(key_mask, "_hf_turbo_pad", step_token, _left_padding)


def _left_padding(key_mask: torch.Tensor) -> torch.Tensor:
    km = key_mask.to(torch.bool)
    start = (~km).to(torch.int32).cumprod(dim=-1).sum(dim=-1)
    expect = torch.arange(km.shape[-1], device=km.device)[None, :] >= start[:, None]
    if not bool((expect == km).all()):
        raise NotImplementedError("attention_mask has holes after real tokens; only left padding is supported")
    return start.to(torch.int32)


def attend(query: torch.Tensor, segments: list[KVSegment], **kw) -> torch.Tensor:
    """Attention of ``query [B, Hq, Sq, D]`` over ``segments`` (see quant/attention.py); float32 out."""
    return turbo_attention_reference(query, segments, **kw)


def attend_layer(query: torch.Tensor, layer, *, sm_scale: float, causal: bool, key_mask, sliding_window) -> torch.Tensor:
    """Attention of ``query [B, Hq, Sq, D]`` over a :class:`~hf_turbo.cache.TurboLayer`'s state for this step.

    Returns float32 ``[B, Hq, Sq, D]`` (reference) or the query dtype (kernels)."""
    t = layer.turbo
    cached = layer.kernel_cache.get("backend")  # decided once per layer and device (reset with the layer's storage)
    if cached is None or cached[0] != query.device:
        cached = layer.kernel_cache["backend"] = (query.device, _backend_for(query.device, t))
    backend = cached[1]
    if backend is not None:
        return backend.attend_layer(
            query, layer, sm_scale=sm_scale, causal=causal, pad=left_padding(key_mask, layer.step_token),
            sliding_window=sliding_window,
        )
    return turbo_attention_reference(
        query,
        layer.attention_segments(),
        sm_scale=sm_scale,
        causal=causal,
        key_mask=key_mask,
        sliding_window=sliding_window,
        exp=t.exp,
        n_r=t.n_r,
        sas_base=t.sas_base,
        pv=t.pv,
        block_m=t.block_m,
        block_n=t.block_n,
    )


def attend_no_cache(query, key, value, turbo, *, sm_scale, causal, key_mask, sliding_window) -> torch.Tensor:
    """INT8 + SAS attention over ``key, value [B, Hkv, S, D]`` quantized on the fly (no cache: log-likelihoods,
    ``use_cache=False``)."""
    backend = _backend_for(query.device, turbo)
    if backend is not None:
        return backend.prefill(
            query, key, value, turbo, sm_scale=sm_scale, causal=causal, pad=left_padding(key_mask),
            sliding_window=sliding_window,
        )
    return turbo_attention_reference(
        query, no_cache_segments(key, value, turbo), sm_scale=sm_scale, causal=causal, key_mask=key_mask,
        sliding_window=sliding_window,
        exp=turbo.exp, n_r=turbo.n_r, sas_base=turbo.sas_base, pv=turbo.pv, block_m=turbo.block_m,
        block_n=turbo.block_n,
    )
