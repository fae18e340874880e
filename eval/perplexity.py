"""Accuracy of TurboAttention on real text: sliding-window perplexity, plus next-token top-1 agreement and KL
divergence against the full-precision SDPA model, for every setting in one pass over the same windows.

Protocol (what a scored token sees):

* The text is one token stream. Window ``i`` covers inputs ``ids[s : s + W]`` with targets ``ids[s + 1 : s + W + 1]``,
  ``s = i * (W - P)``. Its first ``P`` tokens (``context``) are only context; the last ``W - P`` predictions are
  scored, so consecutive windows score disjoint, contiguous spans and each scored token has at least P tokens of
  context.
* **Cache settings** (TurboQuantCache, KIVI, quanto) run the window like a request: the ``P`` context tokens are one
  prefill call into a fresh cache (online head priorities come from them), then the scored part is fed in chunks of
  ``chunk`` tokens (default 64 = ``block_size``), each chunk one forward call through the same cache. With chunks
  aligned to the cache blocks, a scored query at position ``t`` attends to the compressed blocks below
  ``64 * floor(t / 64)`` (INT4/INT2 codes) and to the FP16 tail above it, quantized to INT8 on the fly: the same
  split a token-by-token decode would see at step ``t``. So every scored token reads compressed KV. (``chunk=1`` is
  a true teacher-forced decode, much slower on CPU; the difference is the stage-1 INT8 scale of the tail, computed
  over the chunk rather than the tokens decoded so far.)
* **No-cache settings** (``fp`` SDPA, ``turbo`` INT8+SAS prefill) run each window in one forward pass without a cache.
* Agreement and KL compare each setting's next-token distribution with the ``fp`` (SDPA) model's at the same
  positions: ``agree = mean[argmax p == argmax p_fp]``, ``kl = mean KL(p_fp || p)`` in nats.

Bits per KV element: measured from the cache's compressed pools (codes + stage-1 scales + stage-2 scale/zero) over
the compressed tokens, i.e. steady state without the < 64-token FP16 buffer; KIVI: ``nbits + 32 / group_size``;
FP16 caches: 16.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class Setting:
    """One evaluated configuration.

    kind: "fp" (SDPA, no cache), "turbo" (turbo attention, no cache: INT8 + SAS prefill), "turbo_cache"
    (turbo attention + TurboQuantCache), "kivi" (SDPA + :class:`~hf_turbo.eval.kivi.KIVICache`), "quanto"
    (SDPA + transformers ``QuantizedCache(backend="quanto")``), "sdpa_cache" (SDPA + DynamicCache, chunked: a
    check that the chunked protocol alone changes nothing), "turbo_cache_sdpa" (TurboQuantCache read by exact SDPA
    through its dequantized K/V: the cache's quantization error without INT8 attention or SAS).
    turbo: TurboConfig fields. ``priorities="calibrated"`` takes the priorities given to :func:`evaluate`.
    kivi: ``nbits``, ``group_size``, ``residual_length`` (also for "quanto": ``nbits``, ``q_group_size``, ...).
    """

    name: str
    kind: str
    turbo: dict[str, Any] = field(default_factory=dict)
    kivi: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def turbo_config(self, calibrated: list[list[float]] | None = None):
        from hf_turbo.config import TurboConfig

        fields = dict(self.turbo)
        if fields.get("priorities") == "calibrated":
            if calibrated is None:
                raise ValueError(f"setting {self.name} needs calibrated priorities: pass priorities= to evaluate")
            fields["priorities"] = calibrated
        return TurboConfig(**fields)


def _t(name, label, **turbo):
    return Setting(name, "turbo_cache", turbo=turbo, label=label)


PAPER = {"exp": "sas", "pv": "int8", "k_smooth": False}  # the paper's softmax (SAS), INT8 P, no K smoothing
DEFAULT = {"exp": "exp2", "pv": "fp16"}  # the "default" preset (exact exp2, FP16 P @ V, K smoothing)

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("fp", "fp", label="FP SDPA (reference)"),
        Setting("sdpa-chunked", "sdpa_cache", label="FP SDPA, chunked through DynamicCache"),
        Setting("turbo-prefill", "turbo", turbo=dict(PAPER), label="turbo INT8 + SAS + INT8 P, no cache"),
        Setting("turbo-prefill-exp2", "turbo", turbo={**PAPER, "exp": "exp2"},
                label="turbo INT8, SAS off (exp2), INT8 P, no cache"),
        Setting("turbo-prefill-default", "turbo", turbo=dict(DEFAULT), label="turbo INT8, exp2, FP16 P, no cache"),
        _t("turbo-int8", "turbo cache INT8 (bits=8), SAS, INT8 P", bits=8, **PAPER),
        _t("turbo-4bit", "turbo 4-bit KV, SAS n_r=6, INT8 P", bits=4, **PAPER),
        _t("turbo-4bit-exp2", "turbo 4-bit KV, SAS off (exp2), INT8 P", bits=4, **{**PAPER, "exp": "exp2"}),
        _t("turbo-4bit-pvfp16", "turbo 4-bit KV, SAS, FP16 P", bits=4, **{**PAPER, "pv": "fp16"}),
        _t("turbo-4bit-default", "turbo 4-bit KV, exp2, FP16 P, K smoothing (default preset)", bits=4, **DEFAULT),
        _t("turbo-4bit-default-nosmooth", "turbo 4-bit KV, exp2, FP16 P, no K smoothing", bits=4, k_smooth=False,
           **DEFAULT),
        _t("turbo-4bit-nr4", "turbo 4-bit KV, SAS n_r=4", bits=4, n_r=4.0, **PAPER),
        _t("turbo-4bit-nr5", "turbo 4-bit KV, SAS n_r=5", bits=4, n_r=5.0, **PAPER),
        _t("turbo-4bit-nr8", "turbo 4-bit KV, SAS n_r=8", bits=4, n_r=8.0, **PAPER),
        _t("turbo-4bit-nr8-pvfp16", "turbo 4-bit KV, SAS n_r=8, FP16 P", bits=4, n_r=8.0, **{**PAPER, "pv": "fp16"}),
        _t("turbo-mixed1-online", "turbo 2/4 mixed, 1 INT2 head/layer, online", int2_heads=1, **PAPER),
        _t("turbo-mixed1-calib", "turbo 2/4 mixed, 1 INT2 head/layer, calibrated", int2_heads=1,
           priorities="calibrated", **PAPER),
        _t("turbo-mixed1-calib-default", "turbo 2/4 mixed, 1 INT2 head/layer, calibrated, exp2 + FP16 P",
           int2_heads=1, priorities="calibrated", **DEFAULT),
        _t("turbo-mixed1-calib-default-nosmooth",
           "turbo 2/4 mixed, 1 INT2 head/layer, calibrated, exp2 + FP16 P, no K smoothing", int2_heads=1,
           priorities="calibrated", k_smooth=False, **DEFAULT),
        _t("turbo-mixed-model25-calib-default", "turbo 2/4 mixed, 25% of all heads INT2 ranked model-wide, "
           "calibrated, exp2 + FP16 P", int2_fraction=0.25, int2_scope="model", priorities="calibrated", **DEFAULT),
        _t("turbo-mixed-model33-calib-default", "turbo 2/4 mixed, 1/3 of all heads INT2 ranked model-wide, "
           "calibrated, exp2 + FP16 P", int2_fraction=1 / 3, int2_scope="model", priorities="calibrated", **DEFAULT),
        _t("turbo-mixed-model25-norm-calib-default", "turbo 2/4 mixed, 25% of all heads INT2 ranked model-wide "
           "(priority / layer mean), calibrated, exp2 + FP16 P", int2_fraction=0.25, int2_scope="model",
           int2_normalize="layer_mean", priorities="calibrated", **DEFAULT),
        _t("turbo-mixed-model33-norm-calib-default", "turbo 2/4 mixed, 1/3 of all heads INT2 ranked model-wide "
           "(priority / layer mean), calibrated, exp2 + FP16 P", int2_fraction=1 / 3, int2_scope="model",
           int2_normalize="layer_mean", priorities="calibrated", **DEFAULT),
        _t("turbo-4bit-default-r128", "turbo 4-bit KV, default preset, newest 128 tokens uncompressed (residual)",
           bits=4, residual_length=128, **DEFAULT),
        _t("turbo-mixed-model25-calib-default-r128", "turbo 2/4 mixed, 25% of all heads INT2 ranked model-wide, "
           "calibrated, exp2 + FP16 P, residual 128", int2_fraction=0.25, int2_scope="model", priorities="calibrated",
           residual_length=128, **DEFAULT),
        _t("turbo-mixed-model25-calib-default-r64", "turbo 2/4 mixed, 25% of all heads INT2 ranked model-wide, "
           "calibrated, exp2 + FP16 P, residual 64", int2_fraction=0.25, int2_scope="model", priorities="calibrated",
           residual_length=64, **DEFAULT),
        _t("turbo-mixed1-calib-default-r128", "turbo 2/4 mixed, 1 INT2 head/layer, calibrated, exp2 + FP16 P, "
           "residual 128", int2_heads=1, priorities="calibrated", residual_length=128, **DEFAULT),
        _t("turbo-mixed2-online", "turbo 2/4 mixed, 2 INT2 heads/layer, online", int2_heads=2, **PAPER),
        _t("turbo-mixed2-calib", "turbo 2/4 mixed, 2 INT2 heads/layer, calibrated", int2_heads=2,
           priorities="calibrated", **PAPER),
        _t("turbo-2bit", "turbo 2-bit KV (all heads)", bits=2, **PAPER),
        _t("turbo-mixed-frac25", "turbo mixed, int2_fraction=0.25", int2_fraction=0.25, **PAPER),
        _t("turbo-mixed-frac50", "turbo mixed, int2_fraction=0.5", int2_fraction=0.5, **PAPER),
        Setting("cache4-sdpa", "turbo_cache_sdpa", turbo={"bits": 4},
                label="TurboQuantCache 4-bit (K smoothing) read by exact SDPA (cache error only)"),
        Setting("cache4-sdpa-nosmooth", "turbo_cache_sdpa", turbo={"bits": 4, "k_smooth": False},
                label="TurboQuantCache 4-bit, no K smoothing, read by exact SDPA"),
        Setting("cache-mixed1-calib-sdpa", "turbo_cache_sdpa", turbo={"int2_heads": 1, "priorities": "calibrated"},
                label="TurboQuantCache mixed 1 INT2/layer calibrated (K smoothing), read by SDPA"),
        Setting("cache-mixed1-calib-sdpa-nosmooth", "turbo_cache_sdpa",
                turbo={"int2_heads": 1, "priorities": "calibrated", "k_smooth": False},
                label="TurboQuantCache mixed 1 INT2/layer calibrated, no K smoothing, read by SDPA"),
        Setting("cache2-sdpa", "turbo_cache_sdpa", turbo={"bits": 2},
                label="TurboQuantCache 2-bit read by exact SDPA (cache error only)"),
        Setting("cache4-sdpa-r128", "turbo_cache_sdpa", turbo={"bits": 4, "residual_length": 128},
                label="TurboQuantCache 4-bit, residual 128, read by exact SDPA (like KIVI r128)"),
        Setting("cache2-sdpa-r128", "turbo_cache_sdpa", turbo={"bits": 2, "residual_length": 128},
                label="TurboQuantCache 2-bit, residual 128, read by exact SDPA (like KIVI r128)"),
        Setting("kivi-4-g32", "kivi", kivi={"nbits": 4, "group_size": 32}, label="KIVI 4-bit g32 r128"),
        Setting("kivi-4-g64", "kivi", kivi={"nbits": 4, "group_size": 64}, label="KIVI 4-bit g64 r128"),
        Setting("kivi-3-g64", "kivi", kivi={"nbits": 3, "group_size": 64}, label="KIVI 3-bit g64 r128"),
        Setting("kivi-2-g32", "kivi", kivi={"nbits": 2, "group_size": 32}, label="KIVI 2-bit g32 r128"),
        Setting("kivi-2-g64", "kivi", kivi={"nbits": 2, "group_size": 64}, label="KIVI 2-bit g64 r128"),
        Setting("quanto-4", "quanto", kivi={"nbits": 4, "q_group_size": 64, "residual_length": 128},
                label="transformers QuantizedCache quanto 4-bit g64 r128"),
        Setting("quanto-2", "quanto", kivi={"nbits": 2, "q_group_size": 64, "residual_length": 128},
                label="transformers QuantizedCache quanto 2-bit g64 r128"),
    ]
}

SUITES: dict[str, list[str]] = {
    "ci": ["fp", "turbo-prefill", "turbo-4bit", "turbo-mixed1-online", "kivi-4-g64"],
    "full": [
        "fp", "turbo-prefill", "turbo-prefill-exp2", "turbo-prefill-default", "turbo-int8", "turbo-4bit",
        "turbo-4bit-exp2", "turbo-4bit-pvfp16", "turbo-4bit-default", "turbo-4bit-default-nosmooth", "turbo-4bit-nr4",
        "turbo-4bit-nr5", "turbo-4bit-nr8", "turbo-4bit-nr8-pvfp16", "turbo-mixed1-online", "turbo-mixed1-calib",
        "turbo-mixed1-calib-default", "turbo-mixed1-calib-default-nosmooth", "turbo-mixed-model25-calib-default",
        "turbo-mixed-model33-calib-default", "turbo-mixed-model25-norm-calib-default",
        "turbo-mixed-model33-norm-calib-default", "turbo-4bit-default-r128", "turbo-mixed-model25-calib-default-r64",
        "turbo-mixed-model25-calib-default-r128", "turbo-mixed1-calib-default-r128", "turbo-mixed2-online",
        "turbo-mixed2-calib", "turbo-2bit", "cache4-sdpa", "cache4-sdpa-nosmooth", "cache-mixed1-calib-sdpa",
        "cache-mixed1-calib-sdpa-nosmooth", "cache2-sdpa", "cache4-sdpa-r128", "cache2-sdpa-r128", "kivi-4-g32",
        "kivi-4-g64", "kivi-3-g64", "kivi-2-g32", "kivi-2-g64", "quanto-4", "quanto-2", "sdpa-chunked",
    ],
}


def get_settings(names: Sequence[str | Setting]) -> list[Setting]:
    """Resolve setting names (keys of :data:`SETTINGS`) or pass :class:`Setting` objects through."""
    out = []
    for n in names:
        if isinstance(n, Setting):
            out.append(n)
        elif n in SETTINGS:
            out.append(SETTINGS[n])
        else:
            raise ValueError(f"unknown setting {n!r}; known: {', '.join(SETTINGS)}")
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def cache_kwarg(model) -> str:
    """``"cache"`` (transformers >= 5.24) or ``"past_key_values"``: the forward argument that takes a Cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def token_stream(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` (no special tokens) -> int64 ``[N]``, cut to ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids[:max_tokens] if max_tokens else ids


def window_starts(n_tokens: int, window: int, context: int, max_windows: int | None = None) -> list[int]:
    """Start offsets ``s`` of the windows (inputs ``[s, s+W)``, targets ``[s+1, s+W+1)``), stride ``W - context``."""
    if not 0 <= context < window:
        raise ValueError(f"context ({context}) must be in [0, window={window})")
    stride = window - context
    starts = list(range(0, n_tokens - window, stride))
    if not starts:
        raise ValueError(f"text has {n_tokens} tokens: too few for one window of {window} + 1")
    return starts[:max_windows] if max_windows else starts


@contextlib.contextmanager
def attention_mode(model, name: str, turbo=None):
    """Run ``model`` with attention ``name`` ("sdpa" or "turbo"); for "turbo" with TurboConfig ``turbo`` (its
    ``turbo_config`` entry is restored afterwards, so calibration stored in the config survives)."""
    from hf_turbo.attention import apply_turbo

    saved = getattr(model.config, "turbo_config", None)
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    try:
        if name == "turbo":
            apply_turbo(model, turbo=turbo) if turbo is not None else apply_turbo(model)
        else:
            model.set_attn_implementation(name)
        yield model
    finally:
        if saved is None:
            if hasattr(model.config, "turbo_config"):
                del model.config.turbo_config
        else:
            model.config.turbo_config = saved
        for module in model.modules():
            if hasattr(module, "_hf_turbo_config"):
                del module._hf_turbo_config
        model.set_attn_implementation(previous)


def turbo_cache_bits(cache) -> float:
    """Bits per K/V element of the compressed blocks (codes, stage-1 scales, stage-2 scale/zero), buffer excluded."""
    bits, elements = 0, 0
    for layer in cache.layers:
        if not getattr(layer, "n_blocks", 0):
            continue
        for pool in layer.pools.values():
            bits += 8 * sum(t[:, :, : layer.n_blocks].nbytes for t in pool.values())
        elements += 2 * layer.batch * layer.num_heads * layer.n_blocks * layer.turbo.block_size * layer.head_dim
    return bits / elements if elements else float("nan")


def _make_cache(model, setting: Setting, turbo):
    if setting.kind in ("turbo_cache", "turbo_cache_sdpa"):
        from hf_turbo.cache import TurboQuantCache

        return TurboQuantCache(model.config, turbo=turbo)
    if setting.kind == "kivi":
        from .kivi import KIVICache

        return KIVICache(model.config, **{"residual_length": 128, **setting.kivi})
    if setting.kind == "quanto":
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=model.config, **setting.kivi)
    if setting.kind == "sdpa_cache":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    raise ValueError(f"setting kind {setting.kind!r} has no cache")


@torch.no_grad()
def window_logits(model, ids: torch.Tensor, setting: Setting, *, context: int, chunk: int = 64,
                  calibrated: list[list[float]] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Logits of the scored positions of one window.

    Args:
        ids: int64 ``[1, W]`` inputs.
        context: P, the unscored prefix (one prefill call for cache settings).
        chunk: tokens per forward call after the prefill (cache settings).

    Returns:
        ``(logits float32 [W - P, V], info)``; ``info`` has ``kv_bits`` and, for TurboQuantCache, the cache's
        ``compression_ratio`` (FP16 bytes / bytes held, buffer included) at the end of the window.
    """
    kind = setting.kind
    turbo = setting.turbo_config(calibrated) if kind in ("turbo", "turbo_cache", "turbo_cache_sdpa") else None
    attn = "turbo" if kind in ("turbo", "turbo_cache") else "sdpa"
    info: dict[str, Any] = {}
    with attention_mode(model, attn, turbo):
        if kind in ("fp", "turbo"):
            logits = model(input_ids=ids, use_cache=False).logits[0, context:]
            info["kv_bits"] = 16.0
            return logits.float(), info
        cache = _make_cache(model, setting, turbo)
        ck = cache_kwarg(model)
        outs = []
        if context:
            model(input_ids=ids[:, :context], use_cache=True, **{ck: cache})
        for c0 in range(context, ids.shape[1], chunk):
            outs.append(model(input_ids=ids[:, c0 : c0 + chunk], use_cache=True, **{ck: cache}).logits[0].float())
        if kind in ("turbo_cache", "turbo_cache_sdpa"):
            info["kv_bits"] = turbo_cache_bits(cache)
            info["compression_ratio"] = cache.compression_ratio()
        elif kind == "kivi":
            info["kv_bits"] = cache.bits_per_element()
        elif kind == "quanto":
            info["kv_bits"] = setting.kivi["nbits"] + 32.0 / setting.kivi.get("q_group_size", 64)
        else:
            info["kv_bits"] = 16.0
        return torch.cat(outs, dim=0), info


@dataclass
class _Acc:
    nll: float = 0.0
    n: int = 0
    agree: int = 0
    kl: float = 0.0
    seconds: float = 0.0
    bits: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    window_nll: list[float] = field(default_factory=list)  # mean NLL per scored token, one entry per window


def ppl_delta_se_pct(window_nll: Sequence[float], ref_window_nll: Sequence[float]) -> float:
    """Standard error (in %) of the perplexity change vs the reference, from the paired per-window differences of
    mean NLL (every setting scores the same tokens of each window): ``ppl / ref_ppl = exp(mean d)``, so by the delta
    method SE = 100 * exp(mean d) * sd(d) / sqrt(W). NaN with fewer than 2 windows."""
    d = [a - b for a, b in zip(window_nll, ref_window_nll, strict=True)]
    if len(d) < 2:
        return float("nan")
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return 100.0 * math.exp(mean) * sd / math.sqrt(len(d))


def evaluate(
    model,
    tokens: torch.Tensor,
    settings: Sequence[str | Setting],
    *,
    window: int = 1024,
    context: int = 512,
    chunk: int = 64,
    max_windows: int | None = None,
    priorities: list[list[float]] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity, agreement and KL of every setting over the same windows of ``tokens`` (int64 ``[N]``).

    The "fp" reference is always computed (and reported first). ``priorities`` (``[L][H_kv]``) feed settings with
    ``priorities="calibrated"``. Returns one row per setting: ``setting, label, kind, kv_bits, ppl,
    ppl_delta_pct`` (vs fp), ``ppl_delta_se_pct`` (its standard error over windows, :func:`ppl_delta_se_pct`),
    ``top1_agree, kl, tokens, windows, seconds``, and for TurboQuantCache
    ``compression``, ``int2_heads_per_layer`` (the mean over layers when chosen model-wide) and ``int2_heads_total``.
    """
    from tqdm.auto import tqdm

    settings = get_settings(settings)
    if any(s.kind == "quanto" for s in settings) and importlib.util.find_spec("optimum") is None:
        warnings.warn("optimum-quanto is not installed: the quanto rows are skipped (pip install optimum-quanto)",
                      stacklevel=2)
        settings = [s for s in settings if s.kind != "quanto"]
    ref = SETTINGS["fp"]
    order = [ref] + [s for s in settings if s.name != "fp"]
    starts = window_starts(int(tokens.numel()), window, context, max_windows)
    device = next(model.parameters()).device
    accs = {s.name: _Acc() for s in order}
    bar = tqdm(total=len(starts) * len(order), desc="perplexity", unit="run", disable=not progress)
    for s0 in starts:
        ids = tokens[s0 : s0 + window].unsqueeze(0).to(device)
        targets = tokens[s0 + 1 + context : s0 + window + 1].to(device)
        ref_lp = None
        for setting in order:
            bar.set_postfix_str(setting.name)
            t0 = time.perf_counter()
            logits, info = window_logits(model, ids, setting, context=context, chunk=chunk, calibrated=priorities)
            acc = accs[setting.name]
            acc.seconds += time.perf_counter() - t0
            lp = torch.log_softmax(logits.double(), dim=-1)
            nll = float(-lp.gather(-1, targets[:, None]).sum())
            acc.nll += nll
            acc.n += int(targets.numel())
            acc.window_nll.append(nll / targets.numel())
            if ref_lp is None:
                ref_lp = lp
            acc.agree += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
            acc.kl += float((ref_lp.exp() * (ref_lp - lp)).sum())
            acc.bits.append(info["kv_bits"])
            if "compression_ratio" in info:
                acc.ratio.append(info["compression_ratio"])
            bar.update(1)
    bar.close()
    ref_ppl = math.exp(accs["fp"].nll / accs["fp"].n)
    rows = []
    for s in order:
        a = accs[s.name]
        ppl = math.exp(a.nll / a.n)
        row = {
            "setting": s.name,
            "label": s.label or s.name,
            "kind": s.kind,
            "kv_bits": sum(a.bits) / len(a.bits),
            "ppl": ppl,
            "ppl_delta_pct": 100.0 * (ppl / ref_ppl - 1.0),
            "ppl_delta_se_pct": ppl_delta_se_pct(a.window_nll, accs["fp"].window_nll) if s.name != "fp" else 0.0,
            "top1_agree": a.agree / a.n,
            "kl": a.kl / a.n,
            "tokens": a.n,
            "windows": len(starts),
            "seconds": a.seconds,
        }
        if s.kind in ("turbo_cache", "turbo_cache_sdpa"):
            cfg = s.turbo_config(priorities)
            from hf_turbo.cache import kv_heads, text_config

            h, layers = kv_heads(model.config), text_config(model.config).num_hidden_layers
            if cfg.bits == cfg.low_bits:
                per_layer = [h] * layers
            elif cfg.int2_scope == "model" and cfg.priorities is not None:
                per_layer = [row.count(cfg.low_bits) for row in cfg.head_bits(cfg.priorities)]
            else:
                per_layer = [cfg.num_low_heads(h)] * layers
            row["int2_heads_per_layer"] = per_layer[0] if len(set(per_layer)) == 1 else sum(per_layer) / layers
            row["int2_heads_total"] = sum(per_layer)
            row["compression"] = sum(a.ratio) / len(a.ratio) if a.ratio else float("nan")
            row["config"] = {k: v for k, v in cfg.to_dict().items() if k != "priorities"}
            row["priorities"] = "calibrated" if s.turbo.get("priorities") == "calibrated" else "online"
        if s.kind in ("kivi", "quanto"):
            row["config"] = dict(s.kivi)
        rows.append(row)
    return rows
