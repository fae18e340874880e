"""The pure pieces of eval/gpu_smollm2 (the script itself needs the GPU and the GGUF file)."""

import pytest
import torch
from hf_turbo.eval.gpu_smollm2 import moved_by_one_rounding, next_token_agreement


def test_next_token_agreement_counts_and_margins():
    reference = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.9], [5.0, 0.0, 4.0]])
    tokens = [0, 1, 0]
    logits = reference.clone()
    logits[1, 2] = 2.5  # picks token 2 where the reference's margin is 0.1
    out = next_token_agreement(logits, reference, tokens)
    assert out["positions"] == 3 and out["same_next_token"] == 2
    assert out["reference_margins_at_disagreements"] == pytest.approx([0.1])
    assert out["max_logit_diff"] == pytest.approx(0.6)
    assert out["reference_min_top2_margin"] == pytest.approx(0.1)
    with pytest.raises(RuntimeError, match="own greedy answer"):
        next_token_agreement(logits, reference, [1, 1, 0])


def test_moved_by_one_rounding_moves_each_weight_by_about_one_rounding():
    model = torch.nn.Linear(64, 64)
    moved = moved_by_one_rounding(model)
    for w, m in zip(model.parameters(), moved.parameters()):
        rel = ((m - w) / w).abs()
        assert 0 < rel.max() < 2.0**-24 * 8 and not torch.equal(m, w)
