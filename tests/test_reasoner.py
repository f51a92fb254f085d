"""models/reasoner.py: the control applies the first d of its n_layers blocks, d random in
training and fixed at inference; n_steps picks d and cannot exceed n_layers."""

from __future__ import annotations

import pytest
import torch

import config
from config import ConfigError
from models import build_model
from models.reasoner import Reasoner

torch.set_num_threads(1)


def tiny(**overrides) -> Reasoner:
    torch.manual_seed(0)
    return build_model(config.preset("tiny", "reasoner", **overrides))


def layers_per_forward(model: Reasoner, runs: int, **kwargs) -> list[list[int]]:
    """Which blocks ran in each of `runs` forwards, seen by forward hooks."""
    ran: list[int] = []
    handles = [b.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, b in enumerate(model.blocks)]
    idx = torch.randint(0, 2048, (2, 10), generator=torch.Generator().manual_seed(0))
    out = []
    try:
        for _ in range(runs):
            ran.clear()
            with torch.no_grad():
                model(idx, **kwargs)
            out.append(list(ran))
    finally:
        for h in handles:
            h.remove()
    return out


def test_depth_is_random_in_training_and_fixed_at_inference():
    model = tiny(n_layers=3, depth_min=1, depth_max=3, depth_eval=3)
    torch.manual_seed(1)
    runs = layers_per_forward(model.train(), 30)
    assert {len(r) for r in runs} == {1, 2, 3}
    assert all(r == list(range(len(r))) for r in runs)  # always the first d blocks, in order
    assert layers_per_forward(model.eval(), 3) == [[0, 1, 2]] * 3
    assert layers_per_forward(model.train(), 3, n_steps=2) == [[0, 1]] * 3


def test_n_steps_beyond_its_layers_is_a_config_error():
    model = tiny(n_layers=3).eval()
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"n_steps: 4 .*\[1, 3\]"):
        model(idx, n_steps=4)
    with pytest.raises(ConfigError, match="n_steps"):
        model.generate(idx, 2, n_steps=4)


def test_layers_beyond_the_depth_get_no_gradient():
    model = tiny(n_layers=3).train()
    idx = torch.randint(0, 2048, (2, 8), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx, idx, n_steps=2)
    loss.backward()
    assert model.blocks[1].mlp.down.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.blocks[2].parameters())
