"""models/__init__.py: the forward contract both architectures share, checked on both.

Architecture-specific behaviour (random depth, truncated backprop, the n_steps range) is in
test_refiner.py and test_reasoner.py; the KV cache in test_generate.py."""

from __future__ import annotations

import pytest
import torch

import config
from config import ConfigError
from models import CausalRefiner, Reasoner, build_model, count_params

torch.set_num_threads(1)
ARCHS = config.ARCHS


def tiny(arch: str, **overrides) -> torch.nn.Module:
    # n_layers=4 lets the reasoner run at depth 4 like the refiner
    torch.manual_seed(0)
    return build_model(config.preset("tiny", arch, n_layers=4, **overrides)).eval()


def tokens(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.preset("tiny", "refiner").model.vocab_size, (batch, length),
                         generator=gen)


def test_build_model_picks_the_architecture():
    assert isinstance(build_model(config.preset("tiny", "refiner")), CausalRefiner)
    assert isinstance(build_model(config.preset("tiny", "reasoner")), Reasoner)
    cfg = config.preset("tiny", "reasoner")
    assert isinstance(build_model(cfg.model), Reasoner)  # a ModelConfig works too


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_the_loss_contract(arch):
    model = tiny(arch)
    idx = tokens(3, 10)
    logits, loss = model(idx)
    assert logits.shape == (3, 10, model.cfg.vocab_size) and loss is None
    logits, loss = model(idx, targets=idx)
    assert logits is None and loss.shape == () and loss.dtype == torch.float32
    # near log(V) at init: the model starts out uncertain
    assert 0.5 * torch.log(torch.tensor(2048.0)) < loss < 1.5 * torch.log(torch.tensor(2048.0))


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_equals_cross_entropy_of_the_logits(arch):
    model = tiny(arch)
    idx, targets = tokens(2, 12), tokens(2, 12, seed=1)
    targets[0, :5] = -100
    logits, _ = model(idx)
    _, loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_fp32_under_fp16_autocast(arch):
    model = tiny(arch).train()
    idx = tokens(2, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        _, loss = model(idx, idx, n_steps=2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_causality_a_token_never_changes_earlier_logits(arch, depth):
    model = tiny(arch)
    idx = tokens(1, 20)
    t = 11
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        a, _ = model(idx, n_steps=depth)
        b, _ = model(changed, n_steps=depth)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-4)  # the change is visible from t on


@pytest.mark.parametrize("arch", ARCHS)
def test_a_sequence_longer_than_block_size_is_refused(arch):
    model = tiny(arch)
    with pytest.raises(ValueError, match="block_size 64"):
        model(tokens(1, 65))


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_is_deterministic(arch):
    model = tiny(arch)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])
        assert torch.equal(model(idx, idx)[1], model(idx, idx)[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_n_steps_overrides_the_depth(arch):
    model = tiny(arch)
    idx = tokens()
    with torch.no_grad():
        default, _ = model(idx)
        at_eval_depth, _ = model(idx, n_steps=model.cfg.depth_eval)
        shallow, _ = model(idx, n_steps=1)
    assert torch.equal(default, at_eval_depth)
    assert not torch.allclose(default, shallow, atol=1e-4)
    with pytest.raises(ConfigError, match="n_steps"):
        model(idx, n_steps=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_head_is_tied_to_the_embedding(arch):
    model = tiny(arch)
    V, C = model.cfg.vocab_size, model.cfg.d_model
    assert model.lm_weight() is model.wte.weight
    assert sum(1 for p in model.parameters() if p.shape == (V, C)) == 1
    assert count_params(model) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # the head's gradient lands on the embedding: rows of tokens never fed in still learn
    idx = torch.zeros(1, 8, dtype=torch.long)
    _, loss = model.train()(idx, torch.ones(1, 8, dtype=torch.long), n_steps=1)
    loss.backward()
    assert model.wte.weight.grad[1].abs().sum() > 0


def meta_params(name: str, arch: str) -> int:
    with torch.device("meta"):
        return count_params(build_model(config.preset(name, arch)))


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_sizes(arch):
    assert meta_params("tiny", arch) < 500_000  # "well under 1M"
    assert meta_params("rtx2060", arch) >= 40_000_000
