"""TurboConfig: every choice of the TurboAttention algorithm, validated in one place.

Choices the paper states are the defaults of the ``"paper"`` preset; choices the paper leaves open (tagged [I] in
``shared/docs/turboattention-spec.md``) are fields here so that they can be measured rather than guessed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VALID_BITS = (2, 4, 8)
VALID_AXES = ("channel", "token")
VALID_PV = ("int8", "fp16", "fp8")
VALID_EXP = ("sas", "exp2")
VALID_SAS_BASE = ("e", "2")
VALID_BUFFER_ATTENTION = ("int8", "fp16")
VALID_TAIL_V = ("auto", "int8", "fp16")
VALID_INT2_SCOPE = ("layer", "model")
VALID_INT2_NORMALIZE = ("none", "layer_mean")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"TurboConfig.{name} must be one of {allowed}, got {value!r}")


@dataclass
class TurboConfig:
    """Configuration of TurboAttention: quantization, softmax, cache layout.

    Attributes:
        quantize: False turns every quantization off (FP16 cache, exact softmax): a plumbing mode for tests that
            must match SDPA + DynamicCache token for token.
        block_size: tokens per quantization block, and the size of the FP16 decode buffer (paper: 64).
        residual_length: newest tokens that are never compressed (KIVI's residual, [I]; default 0, the paper): a
            block is flushed only once ``residual_length + block_size`` tokens wait in the buffer, so the buffer
            holds between ``residual_length`` and ``residual_length + block_size - 1`` tokens. Costs
            ``residual_length`` FP16 tokens per sequence and layer; the kernels read the longer buffer as usual.
        bits: bit-width of the high-priority KV heads in the cache (4; 8 keeps stage-1 INT8 only; 2 for all heads).
        low_bits: bit-width of the low-priority heads (paper: 2).
        int2_fraction: fraction of the KV heads stored at ``low_bits`` (lowest priority first): of every layer
            (``int2_scope="layer"``), or of all ``L x H`` KV heads of the model (``"model"``). Rounded with Python's
            ``round`` (half to even): 0.25 of 3 heads -> 1 per layer; 0.25 of 30 x 3 = 22.5 -> 22 heads in total.
        int2_heads: alternatively, a count (overrides ``int2_fraction``): heads per layer with ``int2_scope="layer"``,
            heads in total over the model with ``"model"``.
        int2_scope: where the lowest-priority heads are chosen (spec §2 leaves it open, [I]): "layer" (the default:
            the same number in every layer) or "model" (ranked over all layers at once, so the number per layer
            varies). "model" needs calibrated ``priorities`` for every layer up front (config or calibration file):
            online priorities are computed layer by layer at prefill and cannot be ranked model-wide.
        int2_normalize: with ``int2_scope="model"``, how priorities of different layers are made comparable:
            "none" (raw gap x std) or "layer_mean" (each head's priority divided by its layer's mean priority, so
            the ranking is within-layer relative and key magnitudes that differ per layer do not decide).
        k_axis / v_axis: stage-2 grouping. "channel": one (scale, zero) per channel over a block of tokens;
            "token": one per token over the head dim. Defaults K per channel, V per token (KIVI-style [I]).
        exp: "sas" (LUT x cubic polynomial in FP16, zero beyond n_r; the paper) or "exp2" (hardware exponential,
            FP32; the default: measured faster and more accurate in our Triton kernels, see README).
        sas_base: "e": e^-x = LUT[floor x] * POLY(frac) (the paper); "2": 2^-y with the integer part from exponent
            bits and a cubic for 2^-frac (kernel-friendly; same function to within FP16 rounding of the table).
        n_r: SAS threshold: exp(-x) is exactly 0 for x > n_r (natural-log units).
        pv: precision of the P @ V product: "int8" (P*127, the paper), "fp16" (the default: faster and more accurate
            on the H100) or "fp8" (e4m3 P and V; computed by the kernels, but slower and less accurate than "fp16"
            in the prefill benchmark: kernels/NOTES.md).
        buffer_attention: how attention reads the FP16 buffer and new tokens: "int8" (stage-1 on the fly) or "fp16".
        tail_v: with ``buffer_attention="int8"``, how the P.V product reads the values of those tokens (the FP16
            tail; without a cache, every value): "int8" (their stage-1 INT8 codes times the block scale, the paper's
            BPQ stage 1), "fp16" (the values as stored, rounded to FP16, like SageAttention's FP16 V: no V
            quantization pass and one rounding less) or "auto" (the default: "fp16" when ``pv="fp16"``, else
            "int8"). "fp16" needs ``pv="fp16"``: INT8 and FP8 P.V products multiply INT8 codes. Keys are always
            stage-1 INT8. :attr:`tail_v_precision` is the resolved choice.
        k_smooth: K smoothing (as in SageAttention): the cache subtracts a per-(sequence, KV head) channel mean mu of
            the first keys it sees from every key before quantizing, so a channel with a large constant offset no
            longer sets the INT8 block scale of all the others. Exact for softmax attention (q.(k - mu) = q.k - q.mu,
            a constant per query row); mu is added back wherever full-precision keys leave the cache (non-turbo
            readers, ``dequantized()``). Default True: on SmolLM2 it cuts the 4-bit perplexity loss from +1.25% to
            +0.71% (eval/results/accuracy_smollm2.json); the paper preset leaves it off (not in the paper).
        block_m / block_n: query rows per INT8 scale and keys per softmax tile (the reference tiles like the kernels).
            block_m defaults to 16: chat-template tokens carry query outliers that, sharing one scale with 63 other
            rows, cost SmolLM2 14% logit error on a chat prompt (1.8% at 16 rows); the paper preset keeps 64.
        priority_source: tensors scored for head priority: "k" or "kv" (sum of both scores).
        priorities: optional calibrated priorities, nested list [num_layers][num_kv_heads]; None = online.
    """

    quantize: bool = True
    block_size: int = 64
    residual_length: int = 0
    bits: int = 4
    low_bits: int = 2
    int2_fraction: float = 0.0
    int2_heads: int | None = None
    int2_scope: str = "layer"
    int2_normalize: str = "none"
    k_axis: str = "channel"
    v_axis: str = "token"
    exp: str = "exp2"
    sas_base: str = "e"
    n_r: float = 6.0
    pv: str = "fp16"
    buffer_attention: str = "int8"
    tail_v: str = "auto"
    k_smooth: bool = True
    block_m: int = 16
    block_n: int = 64
    priority_source: str = "k"
    priorities: list[list[float]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TurboConfig:
        for name in ("bits", "low_bits"):
            value = getattr(self, name)
            if value not in VALID_BITS:
                raise ValueError(f"TurboConfig.{name} must be one of {VALID_BITS}, got {value!r}")
        _check_choice("k_axis", self.k_axis, VALID_AXES)
        _check_choice("v_axis", self.v_axis, VALID_AXES)
        _check_choice("exp", self.exp, VALID_EXP)
        _check_choice("sas_base", self.sas_base, VALID_SAS_BASE)
        _check_choice("pv", self.pv, VALID_PV)
        _check_choice("buffer_attention", self.buffer_attention, VALID_BUFFER_ATTENTION)
        _check_choice("tail_v", self.tail_v, VALID_TAIL_V)
        if self.tail_v == "fp16" and self.pv != "fp16":
            raise ValueError(
                f"TurboConfig.tail_v='fp16' needs pv='fp16' (pv={self.pv!r} multiplies INT8 value codes); "
                "use tail_v='int8' or 'auto'"
            )
        _check_choice("priority_source", self.priority_source, ("k", "kv"))
        _check_choice("int2_scope", self.int2_scope, VALID_INT2_SCOPE)
        _check_choice("int2_normalize", self.int2_normalize, VALID_INT2_NORMALIZE)
        if not isinstance(self.k_smooth, bool):
            raise ValueError(f"TurboConfig.k_smooth must be a bool, got {self.k_smooth!r}")
        if not (isinstance(self.block_size, int) and self.block_size >= 16 and self.block_size % 16 == 0):
            raise ValueError(f"TurboConfig.block_size must be a positive multiple of 16, got {self.block_size!r}")
        if not (isinstance(self.residual_length, int) and self.residual_length >= 0):
            raise ValueError(f"TurboConfig.residual_length must be an int >= 0, got {self.residual_length!r}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 16 and value % 16 == 0):
                raise ValueError(f"TurboConfig.{name} must be a positive multiple of 16, got {value!r}")
        if self.block_size % self.block_n != 0:
            raise ValueError(
                f"TurboConfig.block_n ({self.block_n}) must divide block_size ({self.block_size}) so that every softmax "
                "tile shares one stage-1 scale"
            )
        if not 0.0 <= float(self.int2_fraction) <= 1.0:
            raise ValueError(f"TurboConfig.int2_fraction must be in [0, 1], got {self.int2_fraction!r}")
        if self.int2_heads is not None and (not isinstance(self.int2_heads, int) or self.int2_heads < 0):
            raise ValueError(f"TurboConfig.int2_heads must be a non-negative int or None, got {self.int2_heads!r}")
        if not float(self.n_r) > 0:
            raise ValueError(f"TurboConfig.n_r must be > 0, got {self.n_r!r}")
        return self

    @property
    def tail_v_precision(self) -> str:
        """"int8" or "fp16": how the P.V product reads the tail's values (``tail_v`` with "auto" resolved; "fp16"
        only under FP16 PV, the one product that takes FP16 values)."""
        return "fp16" if self.pv == "fp16" and self.tail_v != "int8" else "int8"

    def num_low_heads(self, num_kv_heads: int, num_layers: int = 1) -> int:
        """How many KV heads go to ``low_bits``: per layer (``int2_scope="layer"``; ``num_layers`` is ignored) or in
        total over ``num_layers x num_kv_heads`` heads (``"model"``)."""
        total = num_kv_heads * (num_layers if self.int2_scope == "model" else 1)
        if self.int2_heads is not None:
            if self.int2_heads > total:
                where = (f"the model's {num_layers} x {num_kv_heads} KV heads" if self.int2_scope == "model"
                         else f"num_key_value_heads={num_kv_heads}")
                raise ValueError(f"TurboConfig.int2_heads={self.int2_heads} exceeds {where}")
            return self.int2_heads
        return int(round(self.int2_fraction * total))

    def head_bits(self, priorities) -> list[list[int]]:
        """``[L][H]`` bit-width of every KV head for calibrated ``priorities`` ``[L][H]``: the lowest-priority heads
        of each layer (``int2_scope="layer"``) or of the whole model (``"model"``, after ``int2_normalize``) get
        ``low_bits``. Ties: lower layer, then lower head index first."""
        import torch

        from .quant.priority import assign_head_bits, assign_model_head_bits

        pr = torch.as_tensor(priorities, dtype=torch.float32)
        if pr.dim() != 2:
            raise ValueError(f"priorities must be [num_layers][num_kv_heads], got shape {tuple(pr.shape)}")
        n_layers, n_heads = pr.shape
        n_low = self.num_low_heads(n_heads, n_layers) if self.bits != self.low_bits else 0
        if self.int2_scope == "model":
            return assign_model_head_bits(pr, n_low, self.bits, self.low_bits, self.int2_normalize).tolist()
        return [assign_head_bits(row, n_low, self.bits, self.low_bits).tolist() for row in pr]

    def replace(self, **changes: Any) -> TurboConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurboConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TurboConfig fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TurboConfig:
        """Named presets. "paper": the paper's choices (SAS base e, INT8 P, INT8 buffer, 25% INT2 heads).
        "default": our measured best on speed x accuracy (exp2 + FP16 PV; README, eval/results/attention_*.json). "int4": all heads 4-bit. "noquant": plumbing mode."""
        presets = {
            "paper": dict(exp="sas", sas_base="e", pv="int8", buffer_attention="int8", int2_fraction=0.25, block_m=64,
                          k_smooth=False),
            "default": dict(),
            "int4": dict(int2_fraction=0.0),
            "mixed": dict(int2_fraction=0.5),
            "noquant": dict(quantize=False),
        }
        if name not in presets:
            raise ValueError(f"unknown TurboConfig preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})
