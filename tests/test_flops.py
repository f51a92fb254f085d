"""models/flops.py: FLOPs per token from the config, checked against the built models."""

from __future__ import annotations

import pytest
import torch

import config
from models import build_model
from models.flops import (
    depth_distribution,
    forward_flops_per_token,
    train_flops_at_depth,
    train_flops_per_token,
)


def matmul_params(cfg: config.Config) -> int:
    """Weights that cost a multiply-add per token: every matrix except the embedding lookup
    (which the tied head counts once as a matmul) and the refiner's per-sequence time_proj."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "time_proj" not in n)


@pytest.mark.parametrize("arch", config.ARCHS)
def test_forward_flops_are_two_per_weight_plus_attention(arch):
    cfg = config.preset("ablation", arch)
    m, ctx = cfg.model, 32
    depth = 3
    applications = (m.n_prelude + depth) if arch == "refiner" else depth
    if arch == "refiner":
        # every block and gate weight is applied once per pass; the prelude once
        weights = matmul_params(cfg) - m.vocab_size * m.d_model
        per_pass = weights - m.n_prelude * (4 * m.d_model**2 + 3 * m.d_model * m.hidden)
        expected = 2 * (weights + (depth - 1) * per_pass + m.vocab_size * m.d_model)
    else:
        shallow = config.preset("ablation", arch, n_layers=depth, depth_min=1, depth_max=depth,
                                depth_eval=depth)
        expected = 2 * matmul_params(shallow)
    expected += 4 * ctx * m.d_model * applications
    assert forward_flops_per_token(m, depth, ctx) == expected


def test_training_costs_three_forwards_except_the_truncated_passes():
    r = config.preset("ablation", "refiner", backprop_steps=2).model
    g = config.preset("ablation", "reasoner").model
    assert train_flops_at_depth(g, 3) == 3 * forward_flops_per_token(g, 3)
    assert train_flops_at_depth(r, 2) == 3 * forward_flops_per_token(r, 2)
    # passes beyond backprop_steps are forward only: one pass-forward each
    extra = forward_flops_per_token(r, 5) - forward_flops_per_token(r, 4)
    assert train_flops_at_depth(r, 5) - train_flops_at_depth(r, 4) == pytest.approx(extra)


@pytest.mark.parametrize("dist", ["uniform", "poisson"])
def test_expected_training_flops_follow_the_depth_distribution(dist):
    m = config.preset("ablation", "refiner", depth_dist=dist, depth_min=2, depth_max=6, depth_eval=4).model
    probs = depth_distribution(m)
    assert set(probs) == set(range(2, 7)) and sum(probs.values()) == pytest.approx(1.0)
    assert min(probs.values()) > 0
    lo, hi = train_flops_at_depth(m, 2), train_flops_at_depth(m, 6)
    assert lo < train_flops_per_token(m) < hi
    fixed = config.preset("ablation", "refiner", depth_dist=dist, depth_min=3, depth_max=3).model
    assert depth_distribution(fixed) == {3: 1.0}
    assert train_flops_per_token(fixed) == train_flops_at_depth(fixed, 3)
