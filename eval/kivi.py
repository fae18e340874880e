"""A faithful reference of the KIVI KV cache (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
KV Cache"; ``jy-yuan/KIVI``), as a ``transformers.Cache``, for the accuracy baseline.

What KIVI does (and this reproduces, as fake quantization: values are quantized then dequantized to the model's
float dtype at once, so attention is the ordinary SDPA over the dequantized tensors):

* **K per channel**: keys are quantized in chunks of ``residual_length`` (R = 128) tokens; within a chunk every
  channel is quantized over groups of ``group_size`` (32 / 64) consecutive tokens (asymmetric min/max, round to
  nearest, FP16 scale and minimum per group). The last ``L mod R`` keys stay full precision (the residual) until R
  of them are collected.
* **V per token**: each value token is quantized over groups of ``group_size`` channels of the head dim; the most
  recent R values stay full precision, older ones are quantized one token at a time as they leave the window.
* Prefill: the prompt's attention uses the full-precision K/V (KIVI computes prefill attention before quantizing);
  the cache then holds K (all but ``L mod R``) and V (all but the last R) quantized.
* Decode: attention reads quantized + residual; after each step a full residual of R keys is quantized.

Bits per element (steady state, residual excluded): ``nbits + 2 * 16 / group_size`` (FP16 scale + FP16 minimum per
group), e.g. 4-bit g32: 5.0, 4-bit g64: 4.5, 2-bit g32: 3.0, 2-bit g64: 2.5.

Reading K/V in chunks of several tokens (the perplexity evaluation feeds 64 at a time) applies the decode rule per
chunk: pending full residuals are quantized *before* the chunk is appended, so every query sees exactly what a
token-by-token decode would show it, except that V's full-precision window is R plus the chunk's earlier tokens
(at most R + chunk - 1 rather than R + 1 values), a slight advantage to the baseline.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from hf_turbo.cache import text_config


def fake_quantize(x: torch.Tensor, nbits: int, group_size: int, dim: int) -> torch.Tensor:
    """Asymmetric min/max round-to-nearest quantization of ``x`` in groups of ``group_size`` along ``dim``, returned
    dequantized in ``x``'s dtype (scale and minimum rounded to FP16 as KIVI stores them).

    Args:
        x: ``[..., N, ...]`` with ``x.shape[dim] % group_size == 0``.
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    if n % group_size:
        raise ValueError(f"dim {dim} has {n} elements, not a multiple of group_size {group_size}")
    moved = x.movedim(dim, -1).float()
    g = moved.reshape(*moved.shape[:-1], n // group_size, group_size)
    mn = g.amin(dim=-1, keepdim=True).half().float()
    mx = g.amax(dim=-1, keepdim=True)
    levels = (1 << nbits) - 1
    scale = ((mx - mn) / levels).clamp_min(1e-8).half().float()
    q = torch.round((g - mn) / scale).clamp_(0, levels)
    deq = (q * scale + mn).reshape(moved.shape)
    return deq.movedim(-1, dim).to(x.dtype)


class KIVILayer(DynamicLayer):
    """One layer of :class:`KIVICache`.

    State (all ``[B, H, *, D]`` in the model's dtype): ``k_q`` / ``v_q`` dequantized quantized tokens, ``k_res`` /
    ``v_res`` the full-precision residuals.
    """

    is_sliding = False

    def __init__(self, nbits: int = 2, group_size: int = 32, residual_length: int = 128):
        super().__init__()
        if residual_length % group_size:
            raise ValueError(f"residual_length {residual_length} must be a multiple of group_size {group_size}")
        self.nbits, self.group_size, self.residual_length = nbits, group_size, residual_length
        self.cumulative_length = 0
        self.k_q = self.v_q = self.k_res = self.v_res = None
        self.quantized_elements = 0  # K and V elements stored quantized (for the bit accounting)

    def _quant_k(self, k: torch.Tensor) -> torch.Tensor:  # per channel: groups of tokens (dim -2)
        self.quantized_elements += k.numel()
        return fake_quantize(k, self.nbits, self.group_size, dim=-2)

    def _quant_v(self, v: torch.Tensor) -> torch.Tensor:  # per token: groups of channels (dim -1)
        self.quantized_elements += v.numel()
        return fake_quantize(v, self.nbits, self.group_size, dim=-1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        empty = key_states[:, :, :0]
        self.k_q, self.v_q, self.k_res, self.v_res = empty, value_states[:, :, :0], empty, value_states[:, :, :0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``key_states, value_states [B, H, T, D]``; return ``(keys, values) [B, H, S, D]`` for attention."""
        r = self.residual_length
        if not self.is_initialized:  # prefill: attention on full precision, store quantized
            self.lazy_initialization(key_states, value_states)
            t = key_states.shape[-2]
            nk = t - t % r
            self.k_q = self._quant_k(key_states[:, :, :nk]) if nk else self.k_q
            self.k_res = key_states[:, :, nk:]
            nv = max(t - r, 0)
            self.v_q = self._quant_v(value_states[:, :, :nv]) if nv else self.v_q
            self.v_res = value_states[:, :, nv:]
            self.cumulative_length = t
            return key_states, value_states
        # decode (or a chunk of decode steps): first the flushes due after the previous step
        if self.k_res.shape[-2] >= r:
            n = self.k_res.shape[-2] // r * r
            self.k_q = torch.cat([self.k_q, self._quant_k(self.k_res[:, :, :n])], dim=-2)
            self.k_res = self.k_res[:, :, n:]
        if self.v_res.shape[-2] > r:
            n = self.v_res.shape[-2] - r
            self.v_q = torch.cat([self.v_q, self._quant_v(self.v_res[:, :, :n])], dim=-2)
            self.v_res = self.v_res[:, :, n:]
        self.k_res = torch.cat([self.k_res, key_states], dim=-2)
        self.v_res = torch.cat([self.v_res, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.k_q, self.k_res], dim=-2)
        values = torch.cat([self.v_q, self.v_res], dim=-2)
        self.keys, self.values = keys, values  # what DynamicLayer helpers (offload, ...) see
        return keys, values

    def get_seq_length(self, *args) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        query_length = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.cumulative_length + int(query_length), 0

    def bits_per_element(self) -> float:
        """Steady-state storage: codes + FP16 scale and minimum per group."""
        return self.nbits + 32.0 / self.group_size


class KIVICache(Cache):
    """KIVI fake-quantized cache: ``KIVICache(model.config, nbits=2, group_size=32, residual_length=128)``.

    Use with an ordinary attention implementation (SDPA / eager), a fresh cache per sequence."""

    def __init__(self, config=None, nbits: int = 2, group_size: int = 32, residual_length: int = 128):
        self.nbits, self.group_size, self.residual_length = nbits, group_size, residual_length
        text = text_config(config)
        layers = [KIVILayer(nbits, group_size, residual_length) for _ in range(text.num_hidden_layers)]
        super().__init__(layers=layers)

    def bits_per_element(self) -> float:
        return self.nbits + 32.0 / self.group_size
