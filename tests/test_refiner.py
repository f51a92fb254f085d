"""models/refiner.py: the loop depth (random in training, fixed at inference), depths beyond
training, truncated backprop through the loop, activation checkpointing."""

from __future__ import annotations

import torch

import config
from models import build_model
from models.refiner import CausalRefiner, time_codes

torch.set_num_threads(1)


def tiny(**overrides) -> CausalRefiner:
    torch.manual_seed(0)
    return build_model(config.preset("tiny", "refiner", **overrides))


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 2048, (batch, length), generator=torch.Generator().manual_seed(0))


def passes_per_forward(model: CausalRefiner, runs: int, **kwargs) -> list[int]:
    """How many times the shared block ran in each of `runs` forwards, seen by a forward hook."""
    calls = [0]
    handle = model.shared.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    counts = []
    idx = tokens()
    try:
        for _ in range(runs):
            calls[0] = 0
            with torch.no_grad():
                model(idx, **kwargs)
            counts.append(calls[0])
    finally:
        handle.remove()
    return counts


def test_depth_is_random_in_training_and_fixed_at_inference():
    model = tiny(depth_min=1, depth_max=3, depth_eval=2)
    torch.manual_seed(1)
    counts = passes_per_forward(model.train(), 30)
    assert set(counts) == {1, 2, 3}  # P(a value never drawn in 30) < 1e-4, and the seed is fixed
    assert passes_per_forward(model.eval(), 5) == [2] * 5
    assert passes_per_forward(model.train(), 5, n_steps=3) == [3] * 5  # n_steps fixes it in training


def test_depth_beyond_training_works_and_changes_the_output():
    model = tiny().eval()
    deep = model.cfg.depth_max + 3
    assert passes_per_forward(model, 1, n_steps=deep) == [deep]
    with torch.no_grad():
        a, _ = model(tokens(), n_steps=deep)
        b, _ = model(tokens(), n_steps=model.cfg.depth_max)
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-5)


def test_time_codes_differ_per_pass():
    codes = time_codes(20, 64, torch.device("cpu"))
    assert codes.shape == (20, 64)
    assert torch.cdist(codes, codes).add(torch.eye(20)).min() > 0.1


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_truncated_backprop_matches_a_manual_last_pass_only_computation():
    """backprop_steps=1, K=3: the loss must backpropagate through the last pass only. Rebuild that
    computation by hand from the model's own parts, with the first two passes explicitly
    detached, and compare every gradient; then check that full backprop differs."""
    model = tiny(backprop_steps=1).train()
    idx, K = tokens(), 3
    _, loss = model(idx, idx, n_steps=K)
    loss.backward()
    truncated = grads(model)
    model.zero_grad(set_to_none=True)

    e = model.wte(idx)
    for block in model.prelude:
        e = block(e, model.rope)
    times = model.time_proj(time_codes(K, model.cfg.d_model, idx.device))
    h = torch.zeros_like(e)
    with torch.no_grad():
        for k in range(K - 1):
            h = model.refine(h, e, times[k])
    h = model.refine(h, e, times[K - 1])
    logits = model.norm_f(h) @ model.wte.weight.t()
    manual_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    manual_loss.backward()
    manual = grads(model)

    assert abs(loss.item() - manual_loss.item()) < 1e-5
    assert truncated.keys() == manual.keys()
    for name in manual:
        torch.testing.assert_close(truncated[name], manual[name], atol=1e-6, rtol=1e-4)
    # the prelude still learns, through the encoding that the last pass reads
    assert truncated["prelude.0.mlp.down.weight"].abs().sum() > 0
    # and the comparison can fail: with backprop through all passes the loop's gradient differs
    full = tiny(backprop_steps=3).train()
    _, loss = full(idx, idx, n_steps=K)
    loss.backward()
    assert not torch.allclose(grads(full)["shared.mlp.down.weight"], truncated["shared.mlp.down.weight"])


def test_activation_checkpointing_gives_the_same_gradients():
    idx = tokens()
    out = []
    for ckpt in (False, True):
        model = tiny(activation_checkpointing=ckpt).train()
        _, loss = model(idx, idx, n_steps=3)
        loss.backward()
        out.append((loss.item(), grads(model)))
    assert out[0][0] == out[1][0]
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, atol=1e-6, rtol=1e-5)
