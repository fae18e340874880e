"""Per-forward state kept to save host time per layer: the step token TurboQuantCache hands every layer of one
forward pass, and the attention-mask work (bool conversion, left-padding counts, a device sync) done once per
forward under it, never reused by the next forward."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from hf_turbo import TurboQuantCache
from hf_turbo.attention import _bool_mask
from hf_turbo.ops import left_padding


def _cfg():
    return AutoConfig.for_model("llama", hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=32, head_dim=16)


def test_one_token_per_forward_shared_by_its_layers():
    cache = TurboQuantCache(_cfg())
    tokens = []
    for _ in range(2):  # two forward passes
        for i in range(3):
            k = torch.randn(1, 2, 5, 16)
            cache.update(k, k.clone(), i)
        tokens.append([layer.step_token for layer in cache.layers])
    assert all(t is tokens[0][0] for t in tokens[0]) and all(t is tokens[1][0] for t in tokens[1])
    assert tokens[0][0] is not tokens[1][0]


def test_mask_work_cached_per_token_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    step1 = object()
    km = _bool_mask(mask, step1)
    assert km.dtype == torch.bool and _bool_mask(mask, step1) is km  # second layer of the same forward
    assert left_padding(km, step1).tolist() == [2, 0]
    mask[1, 0] = 0  # the caller reuses the tensor for the next forward, changed in place
    step2 = object()
    km2 = _bool_mask(mask, step2)
    assert km2 is not km and km2[1].tolist() == [False, True, True, True, True]
    assert left_padding(km2, step2).tolist() == [2, 1]
    assert left_padding(km2).tolist() == [2, 1]  # no token: nothing cached or reused
