"""models/flops.py: FLOPs per token from the config, checked against the built models."""

from __future__ import annotations

import pytest
import torch

import config
from models import build_model
from models.flops import (
    depth_distribution,
    forward_flops_per_token,
    progressive_passes,
    train_flops_at_depth,
    train_flops_per_token,
)


def matmul_params(cfg: config.Config) -> int:
    """Weights that cost a multiply-add per token: every matrix except the embedding lookup
    (which the tied head counts once as a matmul) and the refiner's per-sequence time signal
    (time_proj, or the learned codes time_emb: a lookup)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and not n.startswith(("time_proj", "time_emb")))


@pytest.mark.parametrize("arch, overrides", [
    ("reasoner", {}),
    ("refiner", {}),
    ("refiner", dict(update_rule="gated_blend")),
    ("refiner", dict(update_rule="replace")),  # no gate: fewer weights per pass
    ("refiner", dict(time_signal="none")),
    ("refiner", dict(time_signal="learned")),
    ("refiner", dict(time_signal="random_offset")),
    ("refiner", dict(init_state="noise", init_scale_depth="distinct_blocks")),
], ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())) or "default")
def test_forward_flops_are_two_per_weight_plus_attention(arch, overrides):
    cfg = config.preset("ablation", arch, **overrides)
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


def test_replace_passes_are_cheaper_by_exactly_the_gate():
    gated = config.preset("ablation", "refiner").model
    replace = config.preset("ablation", "refiner", update_rule="replace").model
    d = gated.d_model
    assert forward_flops_per_token(gated, 3) - forward_flops_per_token(replace, 3) == 3 * 2 * 2 * d * d


def test_progressive_loss_adds_its_expected_second_loop_and_head():
    base = config.preset("tiny", "refiner").model
    prog = config.preset("tiny", "refiner", progressive_loss_weight=0.3).model
    pass_fwd = forward_flops_per_token(base, 2) - forward_flops_per_token(base, 1)
    head = 2 * base.d_model * base.vocab_size
    # K=1 draws n=0, k=1: one more pass and one more head, forward and backward
    extra = train_flops_at_depth(prog, 1) - train_flops_at_depth(base, 1)
    assert extra == pytest.approx(3 * (pass_fwd + head))
    for K in range(1, 7):  # closed forms: E[n + k] = (3K + 1) / 4, E[k] = (K + 3) / 4
        assert progressive_passes(K) == pytest.approx(((3 * K + 1) / 4, (K + 3) / 4))
    assert train_flops_per_token(prog) > train_flops_per_token(base)
    assert forward_flops_per_token(prog) == forward_flops_per_token(base)  # inference is unchanged


def test_progressive_passes_match_what_the_model_runs():
    """Count the shared block's calls (and those recording a graph) in training forwards."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(config.preset("tiny", "refiner", progressive_loss_weight=0.5)).train()
    K, runs = 4, 300
    calls = {"run": 0, "grad": 0}

    def count(*_):
        calls["run"] += 1
        calls["grad"] += torch.is_grad_enabled()

    model.shared.register_forward_hook(count)
    idx = torch.zeros(1, 4, dtype=torch.long)
    for _ in range(runs):
        model(idx, idx, n_steps=K)
    run, grad = progressive_passes(K)
    normal_grad = min(K, model.cfg.backprop_steps)
    assert calls["run"] / runs == pytest.approx(K + run, abs=0.2)  # standard error ~0.06
    assert calls["grad"] / runs == pytest.approx(normal_grad + grad, abs=0.15)


@pytest.mark.parametrize("arch, overrides", [
    ("refiner", {}),
    ("refiner", {"update_rule": "replace", "time_signal": "none"}),
    ("refiner", {"time_signal": "learned", "depth_max": 7, "n_prelude": 2}),
    ("refiner", {"time_signal": "random_offset", "update_rule": "gated_blend", "d_model": 48, "n_heads": 3}),
    ("reasoner", {}),
    ("reasoner", {"n_layers": 5, "depth_max": 5, "mlp_hidden": 100}),
])
def test_param_count_is_the_built_models(arch: str, overrides: dict) -> None:
    from models import build_model, count_params
    from models.flops import param_count

    cfg = config.preset("tiny", arch, **overrides)
    assert param_count(cfg.model) == count_params(build_model(cfg))
