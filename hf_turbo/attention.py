"""The "turbo" attention for transformers (Llama, Phi3, Qwen2) and its mask registration.

Importing :mod:`hf_turbo` registers

* ``AttentionInterface["turbo"] = turbo_attention_forward``
* ``AttentionMaskInterface["turbo"] = flash_attention_mask`` — the compact mask: ``None`` without padding, else the 2D
  ``[B, kv_len]`` padding mask. Without this second registration transformers would hand the function no mask at all.

How the function finds the cache (it is never passed one): :meth:`hf_turbo.cache.TurboLayer.update` returns tensors
carrying ``.turbo_layer``, the layer's compressed state; the model passes those tensors straight to this function.

* a ``turbo_layer`` present: prefill (any query length) and decode attend over the layer's compressed blocks plus
  its FP16 tail (:func:`hf_turbo.ops.attend_layer`);
* none (no cache, ``use_cache=False``, or a plain ``DynamicCache``): INT8 + SAS attention over the given K/V,
  quantized on the fly (:func:`hf_turbo.ops.attend_no_cache`);
* ``TurboConfig(quantize=False)``: exact SDPA over the full-precision K/V (the plumbing mode for tests).

Causal masks are bottom-right aligned (queries are the last ``Sq`` positions); the sliding window that Phi3 and
Qwen2 pass is applied here (key visible iff ``q_pos - k_pos < sliding_window``).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from . import ops
from .cache import resolve_turbo_config, validate_kv
from .quant.attention import _visible

ATTN_NAME = "turbo"
SUPPORTED_MODEL_TYPES = ("llama", "phi3", "qwen2")
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias", "attention_bias")


def _module_turbo_config(module):
    cfg = getattr(module, "_hf_turbo_config", None)
    if cfg is None:
        cfg = resolve_turbo_config(getattr(module, "config", None))
        module._hf_turbo_config = cfg
    return cfg


def _check_call(module, query, key, attention_mask, dropout, kwargs) -> None:
    if not getattr(module, "_hf_turbo_model_ok", False):  # once per module: config lookups cost host time per token
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f'attn_implementation="turbo" serves model types {SUPPORTED_MODEL_TYPES}, not {model_type!r}'
            )
        module._hf_turbo_model_ok = True
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"turbo attention does not support {name}")
    if dropout and module.training:
        raise NotImplementedError("turbo attention is inference-only: dropout must be 0 (call model.eval())")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "turbo attention expects the 2D padding mask from its registered mask function, got a "
            f"{attention_mask.dim()}D mask of shape {tuple(attention_mask.shape)}; do not pass custom 4D masks"
        )
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query head_dim {query.shape[-1]} != key head_dim {key.shape[-1]}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key heads ({key.shape[1]})")


def _bool_mask(attention_mask: torch.Tensor | None, step_token: object | None) -> torch.Tensor | None:
    """The padding mask as bool, converted once per forward pass (:func:`hf_turbo.ops.per_forward`), so every layer
    gets the same object and what is derived from it (the left-padding counts) is also computed once per forward."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return ops.per_forward(attention_mask, "_hf_turbo_bool", step_token, lambda m: m.to(torch.bool))


def turbo_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """TurboAttention with the transformers attention-function contract.

    Args:
        query: ``[B, Hq, Sq, D]``; key, value: ``[B, Hkv, Skv, D]`` (placeholders carrying ``turbo_layer`` when a
            TurboQuantCache is in use).
        attention_mask: None or bool ``[B, Skv]`` (True = real token).

    Returns:
        ``(out [B, Sq, Hq, D] contiguous in the query dtype, None)``.
    """
    _check_call(module, query, key, attention_mask, dropout, kwargs)
    layer = getattr(key, "turbo_layer", None)
    turbo = layer.turbo if layer is not None else _module_turbo_config(module)
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    sm_scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    key_mask = _bool_mask(attention_mask, layer.step_token if layer is not None else None)
    if key_mask is not None and key_mask.shape[-1] != key.shape[-2]:
        raise ValueError(f"attention_mask covers {key_mask.shape[-1]} keys but the cache holds {key.shape[-2]}")

    if not turbo.quantize:
        return _exact_sdpa(module, query, key, value, key_mask, sm_scale, causal, sliding_window)
    if layer is not None:
        out = ops.attend_layer(
            query, layer, sm_scale=sm_scale, causal=causal, key_mask=key_mask, sliding_window=sliding_window
        )
        layer.release_step()
    else:
        validate_kv("key", key)
        validate_kv("value", value)
        out = ops.attend_no_cache(
            query, key, value, turbo, sm_scale=sm_scale, causal=causal, key_mask=key_mask,
            sliding_window=sliding_window,
        )
    out = out.transpose(1, 2)  # the decode kernel already wrote [B, Sq, Hq, D] memory order: then no copy here
    if not out.is_contiguous():
        out = out.contiguous()
    return (out if out.dtype == query.dtype else out.to(query.dtype)), None


def _exact_sdpa(module, query, key, value, key_mask, sm_scale, causal, sliding_window):
    """Plumbing mode: the same SDPA call transformers makes for ``attn_implementation="sdpa"``."""
    sq, skv = query.shape[-2], key.shape[-2]
    window_active = sliding_window is not None and sliding_window < skv
    mask = None
    if key_mask is not None or window_active or (causal and 1 < sq < skv):
        q_pos = torch.arange(skv - sq, skv, device=query.device)
        mask = _visible(q_pos, torch.arange(skv, device=query.device), causal, sliding_window, key_mask)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=sm_scale, is_causal=causal)


def register() -> None:
    """Register "turbo" with transformers' attention and mask interfaces (idempotent; done on import)."""
    AttentionInterface.register(ATTN_NAME, turbo_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)


def apply_turbo(model, turbo=None, **overrides):
    """Switch a loaded Llama/Phi3/Qwen2 model to turbo attention in place; optionally set its TurboConfig.

    ``turbo`` (a TurboConfig) or ``overrides`` are stored as ``model.config.turbo_config`` (saved with the model).
    Returns the model.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"turbo attention serves {SUPPORTED_MODEL_TYPES}, not {model_type!r}")
    if turbo is not None or overrides:
        cfg = resolve_turbo_config(model.config, turbo, **overrides)
        model.config.turbo_config = cfg.to_dict()
        for module in model.modules():
            if hasattr(module, "_hf_turbo_config"):
                del module._hf_turbo_config
    model.set_attn_implementation(ATTN_NAME)
    return model
