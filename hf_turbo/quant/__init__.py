"""Reference math of TurboAttention in plain PyTorch: the definition every kernel is tested against.

bpq        Blockwise Progressive Quantization: INT8 per block, then INT4/INT2 with integer scale and zero point.
sas        SAS softmax exponential: LUT[floor x] * cubic(frac x) in FP16, zero beyond n_r.
priority   head priority gap x std and the choice of the low-bit heads.
attention  INT8 QK^T / PV attention with online SAS softmax, prefill and decode; exact FP64 attention.
"""

from .attention import (
    KVSegment,
    exact_attention,
    int8_segments,
    key_mean,
    no_cache_segments,
    quantize_q,
    turbo_attention_reference,
)
from .bpq import (
    BLOCK_SIZE,
    INT8_RANGE,
    Stage2,
    dequantize_int8,
    pack_bits,
    quantize_int8_blocks,
    quantize_stage2,
    rebuild_stage2,
    round_half_away,
    unpack_bits,
)
from .priority import assign_head_bits, assign_model_head_bits, head_priority
from .sas import exp_neg, sas_error_bound, sas_exp_neg

__all__ = [
    "BLOCK_SIZE",
    "INT8_RANGE",
    "KVSegment",
    "Stage2",
    "assign_head_bits",
    "assign_model_head_bits",
    "dequantize_int8",
    "exact_attention",
    "exp_neg",
    "head_priority",
    "int8_segments",
    "key_mean",
    "no_cache_segments",
    "pack_bits",
    "quantize_int8_blocks",
    "quantize_q",
    "quantize_stage2",
    "rebuild_stage2",
    "round_half_away",
    "sas_error_bound",
    "sas_exp_neg",
    "turbo_attention_reference",
    "unpack_bits",
]
