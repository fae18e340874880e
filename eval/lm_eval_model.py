"""An lm-eval (0.4.13) model, ``--model hf-turbo``: Hugging Face ``HFLM`` with TurboAttention and a fresh
TurboQuantCache for every ``generate`` call.

    python -m hf_turbo.eval.lm_eval --model hf-turbo \\
        --model_args int2_fraction=0.25,bits=4 --tasks gsm8k_cot --batch_size 1

Model args (``--model_args k=v,...``):

* ``pretrained``: a local dir / hub id / ``.gguf`` path; default (or ``smollm2``): the embedded SmolLM2-135M-Instruct
  GGUF. ``gguf_file`` as in HFLM.
* ``attention``: ``turbo`` (default) or ``sdpa``; ``cache``: ``turbo`` (default), ``kivi``, ``dynamic`` (FP cache)
  or ``none`` (transformers' default cache).
* any :class:`hf_turbo.TurboConfig` field: ``bits``, ``low_bits``, ``int2_fraction``, ``int2_heads``, ``exp``,
  ``n_r``, ``sas_base``, ``pv``, ``buffer_attention``, ``tail_v``, ``k_smooth``, ``block_size``, ``k_axis``, ``v_axis``,
  ``priority_source``, ``quantize``; ``preset`` (``paper``, ``int4``, ``mixed``, ...) as the base.
* ``calibration``: a calibration JSON (``hf-turbo calibrate``) applied to the model (otherwise a ``turbo_config`` in
  the checkpoint's config is used, otherwise priorities are computed online per request).
* ``kivi_bits``, ``kivi_group_size``, ``kivi_residual``: the KIVI-style baseline (``cache=kivi``, SDPA attention).

Why a subclass: a cache object cannot travel through ``--gen_kwargs``, and one put into the generation kwargs would
be deep-copied once and then reused across batches without a reset. ``_model_generate`` builds a new cache per call.
Log-likelihood tasks (multiple choice) never use a cache: they exercise the turbo attention (INT8 + SAS) only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import hf_turbo  # noqa: F401  (registers attn_implementation="turbo" before HFLM loads the model)
from hf_turbo.config import TurboConfig

from .perplexity import cache_kwarg

_TURBO_FIELDS = {f.name: f for f in dataclasses.fields(TurboConfig) if f.name != "priorities"}
CACHES = ("turbo", "kivi", "dynamic", "none")


def _cast(name: str, value: Any) -> Any:
    """Model-arg strings to the TurboConfig field's type."""
    if not isinstance(value, str):
        return value
    default = _TURBO_FIELDS[name].default
    low = value.strip().lower()
    if low in ("none", "null"):
        return None
    if isinstance(default, bool):
        return low in ("1", "true", "yes")
    if isinstance(default, int) or name == "int2_heads":
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def _resolve_pretrained(pretrained: Any, gguf_file: str | None) -> tuple[Any, str | None]:
    if isinstance(pretrained, str) and pretrained.endswith(".gguf"):
        path = Path(pretrained).expanduser()
        return str(path.parent), path.name
    if pretrained in (None, "", "smollm2") and gguf_file is None:
        from hf_turbo.models import find_default_gguf

        path = find_default_gguf()
        return str(path.parent), path.name
    return pretrained, gguf_file


@register_model("hf-turbo", "turbo-hf")
class TurboHFLM(HFLM):
    """HFLM with ``attn_implementation="turbo"`` and a fresh cache per generate call (see the module docstring)."""

    def __init__(
        self,
        pretrained: Any = None,
        gguf_file: str | None = None,
        attention: str = "turbo",
        cache: str = "turbo",
        calibration: str | None = None,
        preset: str | None = None,
        kivi_bits: int = 4,
        kivi_group_size: int = 64,
        kivi_residual: int = 128,
        device: str | None = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        if attention not in ("turbo", "sdpa", "eager"):
            raise ValueError(f"attention must be turbo, sdpa or eager, got {attention!r}")
        self.turbo_overrides = {k: _cast(k, kwargs.pop(k)) for k in list(kwargs) if k in _TURBO_FIELDS}
        self.cache_kind = cache
        self.kivi_args = {"nbits": int(kivi_bits), "group_size": int(kivi_group_size),
                          "residual_length": int(kivi_residual)}
        pretrained, gguf_file = _resolve_pretrained(pretrained, gguf_file)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = "float16" if str(device).startswith("cuda") else "float32"
        if isinstance(pretrained, str):
            kwargs.setdefault("attn_implementation", attention)
        super().__init__(pretrained=pretrained, gguf_file=gguf_file, device=device, dtype=dtype, **kwargs)
        model = self.model
        if getattr(model.config, "quantization_config", None) is not None and gguf_file:
            del model.config.quantization_config  # GGUF weights are dequantized: nothing is quantized any more
        if calibration:
            from hf_turbo.calibration import apply_calibration

            apply_calibration(model, calibration)
        base = TurboConfig.preset(preset) if preset else None
        from hf_turbo.cache import resolve_turbo_config

        self.turbo = resolve_turbo_config(model.config, base, **self.turbo_overrides)
        if attention == "turbo":
            from hf_turbo.attention import apply_turbo

            apply_turbo(model, turbo=self.turbo)  # the no-cache (log-likelihood) path uses the same settings
        elif not isinstance(pretrained, str):
            model.set_attn_implementation(attention)

    def new_cache(self):
        """A fresh cache for one generate call (None: let transformers create its default)."""
        if self.cache_kind == "turbo":
            from hf_turbo.cache import TurboQuantCache

            return TurboQuantCache(self.model.config, turbo=self.turbo)
        if self.cache_kind == "kivi":
            from .kivi import KIVICache

            return KIVICache(self.model.config, **self.kivi_args)
        if self.cache_kind == "dynamic":
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        return None

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        cache = self.new_cache()
        if cache is not None:
            for name in ("cache", "past_key_values"):
                generation_kwargs.pop(name, None)
            generation_kwargs[cache_kwarg(self.model)] = cache
        return super()._model_generate(context, max_length, stop, **generation_kwargs)
