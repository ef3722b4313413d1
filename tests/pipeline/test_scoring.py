"""The task metric and its calibration, against naive float64 references."""

import pytest
import torch

from distill.pipeline.scoring import Score


def test_score_ece_matches_a_naive_float64_reference():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(500, 7, generator=g, dtype=torch.float64) * 3
    hard = torch.randint(0, 7, (500,), generator=g)
    hard[::9] = -100  # ignored positions take no part
    score = Score()
    for a in range(0, 500, 64):
        score.add(logits[a : a + 64].float(), hard[a : a + 64])
    keep = hard != -100
    probs = logits[keep].softmax(-1)
    confidence, predicted = probs.max(-1)
    right = (predicted == hard[keep]).double()
    ece = 0.0
    for b in range(15):
        inside = (confidence >= b / 15) & ((confidence < (b + 1) / 15) if b < 14 else (confidence <= 1))
        if inside.any():
            ece += float((right[inside].mean() - confidence[inside].mean()).abs()) * int(inside.sum()) / int(keep.sum())
    result = score.result("classification")
    assert result["ece"] == pytest.approx(ece, abs=1e-6) and result["ece"] > 0.01
    assert result["value"] == pytest.approx(float(right.mean()))
