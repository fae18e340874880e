"""hf-turbo: TurboAttention (Kang et al., 2024, arXiv 2412.08585) for Hugging Face transformers.

    import hf_turbo                                    # registers attn_implementation="turbo"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="turbo")
    model.generate(**inputs, past_key_values=hf_turbo.TurboQuantCache(model.config))

Data path: quant/ (reference math) -> kernels/ (Triton, ``hf_turbo.kernels``) -> ops.py (dispatch) ->
cache.py + attention.py (transformers integration) -> calibration/, eval/ (tools).
"""

from .attention import ATTN_NAME, apply_turbo, register, turbo_attention_forward
from .cache import TurboLayer, TurboQuantCache, resolve_turbo_config
from .config import TurboConfig

__version__ = "0.1.0"

register()

__all__ = [
    "ATTN_NAME",
    "TurboConfig",
    "TurboLayer",
    "TurboQuantCache",
    "__version__",
    "apply_turbo",
    "register",
    "resolve_turbo_config",
    "turbo_attention_forward",
]
