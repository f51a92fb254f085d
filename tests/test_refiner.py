"""models/refiner.py: the loop depth (random in training, fixed at inference), depths beyond
training, truncated backprop through the loop, activation checkpointing; the design variants
(update rule, time signal, initial state, init scale, progressive loss), with the defaults
pinned bit for bit to the seed design."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import config
from models import build_model, count_params
from models.layers import Block, RMSNorm, Rotary, chunked_cross_entropy, init_weights, sample_depth
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


# --------------------------------------------------------------------------------------------
# Design variants (ModelConfig keys). The defaults must stay the seed design, bit for bit.

VARIANTS = {
    "seed design": {},
    "gated_blend": dict(update_rule="gated_blend"),
    "replace": dict(update_rule="replace"),
    "no time": dict(time_signal="none"),
    "learned time": dict(time_signal="learned"),
    "random_offset": dict(time_signal="random_offset", time_offset_max=3),
    "noise": dict(init_state="noise", state_noise_std=0.05),
    "distinct_blocks": dict(init_scale_depth="distinct_blocks"),
    "progressive": dict(progressive_loss_weight=0.5),
}


def _seed_time_codes(n: int, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half) / half)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SeedRefiner(nn.Module):
    """A frozen copy of the refiner as it was before the variants existed (construction order,
    init and forward), built from the shared layers only. The default config must match it."""

    def __init__(self, cfg: config.ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_base)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.shared = Block(cfg)
        self.time_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.gate_h = nn.Linear(cfg.d_model, cfg.d_model)
        self.gate_c = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        init_weights(self, cfg.init_std, cfg.n_prelude + cfg.depth_eval)
        for lin in (self.time_proj, self.gate_h, self.gate_c):
            nn.init.normal_(lin.weight, std=cfg.init_std)
        nn.init.constant_(self.gate_h.bias, cfg.gate_bias_init)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None, K: int):
        e = self.wte(idx)
        for block in self.prelude:
            e = block(e, self.rope)
        times = self.time_proj(_seed_time_codes(K, self.cfg.d_model))
        h = torch.zeros_like(e)
        grad_on = torch.is_grad_enabled()
        for k in range(K):
            with torch.set_grad_enabled(grad_on and k >= K - self.cfg.backprop_steps):
                c = self.shared(h + e + times[k], self.rope)
                g = torch.sigmoid(self.gate_h(h) + self.gate_c(c))
                h = h + g * (c - h)
        h = self.norm_f(h)
        if targets is None:
            return h @ self.wte.weight.t()
        return chunked_cross_entropy(h, self.wte.weight, targets, self.cfg.loss_chunk_tokens)


def test_the_defaults_are_the_seed_design_bit_for_bit():
    cfg = config.preset("tiny", "refiner")
    model = tiny()
    torch.manual_seed(0)
    seed = SeedRefiner(cfg.model)
    ours, theirs = model.state_dict(), seed.state_dict()
    assert ours.keys() == theirs.keys()  # also: old checkpoints still load
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    idx = tokens()
    with torch.no_grad():
        for K in (1, 2, 5):
            assert torch.equal(model.eval()(idx, n_steps=K)[0], seed(idx, None, K))
    # training: the same random depth, the same loss and the same gradients, bit for bit
    model.train()
    torch.manual_seed(3)
    _, loss = model(idx, idx)
    after_ours = torch.rand(1)  # and the same RNG consumption: the next draw agrees
    torch.manual_seed(3)
    c = cfg.model
    K = sample_depth(c.depth_min, c.depth_max, c.depth_eval, c.depth_dist, None)
    seed_loss = seed(idx, idx, K)
    assert torch.equal(torch.rand(1), after_ours)
    assert torch.equal(loss, seed_loss)
    loss.backward()
    seed_loss.backward()
    theirs_grads = grads(seed)
    assert all(torch.equal(g, theirs_grads[n]) for n, g in grads(model).items())


def hand_forward(model: CausalRefiner, idx: torch.Tensor, K: int) -> torch.Tensor:
    """The variants' formulas, written out from the model's modules (eval: no offset)."""
    cfg = model.cfg
    e = model.wte(idx)
    for block in model.prelude:
        e = block(e, model.rope)
    if cfg.time_signal == "none":
        times = torch.zeros(K, cfg.d_model)
    elif cfg.time_signal == "learned":
        times = model.time_emb.weight[[min(k, cfg.depth_max - 1) for k in range(K)]]
    else:
        times = model.time_proj(time_codes(K, cfg.d_model, idx.device))
    h = torch.zeros_like(e)
    for k in range(K):
        x = h + e + times[k]
        c = model.shared(x, model.rope)
        if cfg.update_rule == "replace":
            h = c
            continue
        new = c - x if cfg.update_rule == "gated_blend" else c
        g = torch.sigmoid(model.gate_h(h) + model.gate_c(new))
        h = h + g * (new - h)
    return model.norm_f(h) @ model.wte.weight.t()


@pytest.mark.parametrize("overrides", [
    dict(update_rule="gated_residual"), dict(update_rule="gated_blend"), dict(update_rule="replace"),
    dict(time_signal="none"), dict(time_signal="learned"),
    dict(time_signal="random_offset", time_offset_max=3),  # at inference: offset 0
], ids=lambda o: "-".join(map(str, o.values())))
def test_each_variant_computes_its_formula(overrides):
    model = tiny(**overrides).eval()
    idx = tokens()
    deep = model.cfg.depth_max + 2  # the learned time signal reuses its last code from here on
    with torch.no_grad():
        for K in (1, 3, deep):
            torch.testing.assert_close(model(idx, n_steps=K)[0], hand_forward(model, idx, K),
                                       atol=1e-5, rtol=1e-5)


def test_the_variants_really_differ_from_the_seed_design():
    idx = tokens()
    with torch.no_grad():
        base = tiny().eval()(idx, n_steps=3)[0]
        for name in ("gated_blend", "replace", "no time", "learned time", "noise", "distinct_blocks"):
            out = tiny(**VARIANTS[name]).eval()(idx, n_steps=3)[0]
            assert not torch.allclose(out, base, atol=1e-4), name


def param_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def test_unused_parts_are_not_built():
    base = param_names(tiny())
    assert {"time_proj.weight", "gate_h.weight", "gate_h.bias", "gate_c.weight"} <= base
    replace = tiny(update_rule="replace")
    assert param_names(replace) == base - {"gate_h.weight", "gate_h.bias", "gate_c.weight"}
    d = replace.cfg.d_model
    assert count_params(tiny()) - count_params(replace) == 2 * d * d + d
    assert param_names(tiny(time_signal="none")) == base - {"time_proj.weight"}
    learned = tiny(time_signal="learned")
    assert param_names(learned) == base - {"time_proj.weight"} | {"time_emb.weight"}
    assert learned.time_emb.weight.shape == (learned.cfg.depth_max, d)
    # random_offset is the sinusoid with other pass indices: the same modules, the same init
    a, b = tiny(), tiny(time_signal="random_offset")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_learned_time_codes_are_learned_and_reused_beyond_depth_max():
    model = tiny(time_signal="learned")
    D = model.cfg.depth_max
    times = model.pass_times(D + 3, torch.device("cpu"))
    assert torch.equal(times[:D], model.time_emb.weight)
    assert all(torch.equal(times[k], times[D - 1]) for k in range(D, D + 3))
    _, loss = model.train()(tokens(), tokens(), n_steps=2)
    loss.backward()
    g = model.time_emb.weight.grad
    # the last backprop_steps=2 passes (k = 0, 1) read codes 0 and 1; the unused code gets none
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0 and g[2].abs().sum() == 0


def test_random_offset_draws_one_offset_per_forward_in_training_only():
    model = tiny(time_signal="random_offset", time_offset_max=3)
    K, dev = 4, torch.device("cpu")
    with torch.no_grad():
        by_offset = [model.time_proj(time_codes(K, model.cfg.d_model, dev, start=o)) for o in range(4)]
        model.train()
        torch.manual_seed(0)
        seen = set()
        for _ in range(40):
            t = model.pass_times(K, dev, model.draw(tokens()).offset)
            seen |= {o for o, ref in enumerate(by_offset) if torch.equal(t, ref)}
            assert any(torch.equal(t, ref) for ref in by_offset)  # a consecutive run of indices
        assert seen == {0, 1, 2, 3}  # P(one offset missing in 40 draws) < 1e-4; seed fixed
        assert model.eval().draw(tokens()).offset == 0
        assert torch.equal(model.pass_times(K, dev), by_offset[0])
    assert torch.equal(time_codes(K, 8, dev, start=2), time_codes(K + 2, 8, dev)[2:])


def test_noise_state_is_fresh_per_forward_and_seeded_by_torch():
    model = tiny(init_state="noise", state_noise_std=0.05).eval()
    idx = tokens()
    with torch.no_grad():
        torch.manual_seed(5)
        a = model(idx)[0]
        b = model(idx)[0]
        torch.manual_seed(5)
        assert torch.equal(model(idx)[0], a)  # reproducible under torch.manual_seed
    assert not torch.allclose(a, b, atol=1e-5)  # a fresh draw every forward, also at inference
    noise = model.draw(torch.zeros(4, 64, dtype=torch.long)).noise
    assert noise is not None and noise.shape == (4, 64, 64)
    h0 = model.initial_state(torch.empty(4, 64, 64), noise)
    assert abs(h0.std().item() - 0.05) < 0.002 and abs(h0.mean().item()) < 0.002


def test_distinct_blocks_init_does_not_depend_on_the_test_depth():
    def weights(**overrides) -> dict[str, torch.Tensor]:
        return tiny(**overrides).state_dict()

    for scale, same in (("distinct_blocks", True), ("depth_eval", False)):
        a = weights(init_scale_depth=scale, depth_eval=1)
        b = weights(init_scale_depth=scale, depth_eval=3)
        assert all(torch.equal(a[k], b[k]) for k in a) == same, scale
    # what differs under depth_eval is only the residual-output scale-down
    a, b = weights(depth_eval=1), weights(depth_eval=3)
    assert {k for k in a if not torch.equal(a[k], b[k])} == {
        k for k in a if k.endswith(("attn.proj.weight", "mlp.down.weight"))}
    # distinct_blocks scales as if there were n_prelude + 1 blocks: depth_eval=1 under depth_eval
    one = weights(depth_eval=1, init_scale_depth="depth_eval")
    assert all(torch.equal(one[k], w) for k, w in weights(init_scale_depth="distinct_blocks").items())


def progressive_by_hand(model: CausalRefiner, idx: torch.Tensor, K: int, w: float) -> torch.Tensor:
    """The progressive-loss objective written out, drawing n and k as the model does."""
    cfg = model.cfg
    e = model.wte(idx)
    for block in model.prelude:
        e = block(e, model.rope)
    times = model.time_proj(time_codes(K, cfg.d_model, idx.device))

    def run(h: torch.Tensor, passes: range, grad_from: int) -> torch.Tensor:
        for k in passes:
            with torch.set_grad_enabled(k >= grad_from):
                h = model.refine(h, e, times[k])
        return h

    def loss(h: torch.Tensor) -> torch.Tensor:
        logits = model.norm_f(h) @ model.wte.weight.t()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())

    h0 = torch.zeros_like(e)
    normal = loss(run(h0, range(K), K - cfg.backprop_steps))
    n = int(torch.randint(0, K, (1,)).item())
    k = int(torch.randint(1, K - n + 1, (1,)).item())
    with torch.no_grad():
        h = run(h0, range(n), K)
    return (1 - w) * normal + w * loss(run(h, range(n, n + k), n))


def test_progressive_loss_matches_its_formula_and_changes_the_gradients():
    idx, K = tokens(), 3
    for seed in range(4):  # several draws of (n, k)
        model = tiny(progressive_loss_weight=0.5, backprop_steps=1).train()
        torch.manual_seed(seed)
        _, loss = model(idx, idx, n_steps=K)
        loss.backward()
        ours = grads(model)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        ref = progressive_by_hand(model, idx, K, 0.5)
        ref.backward()
        assert abs(loss.item() - ref.item()) < 1e-5
        for name, g in grads(model).items():
            torch.testing.assert_close(ours[name], g, atol=1e-6, rtol=1e-4)
    # and it changes what is learned: the same weights, the same seed, other gradients. Seed 3
    # draws n=1, k=1 (the loss after 2 of 3 passes); some draws (n + k = K with k <=
    # backprop_steps) reproduce the normal path exactly, so the seed matters here.
    off = tiny(backprop_steps=1).train()
    torch.manual_seed(3)
    _, off_loss = off(idx, idx, n_steps=K)
    off_loss.backward()
    on = tiny(backprop_steps=1, progressive_loss_weight=0.5).train()
    torch.manual_seed(3)
    _, on_loss = on(idx, idx, n_steps=K)
    on_loss.backward()
    assert on_loss.item() != off_loss.item()
    assert not torch.allclose(grads(on)["shared.mlp.down.weight"], grads(off)["shared.mlp.down.weight"])


def test_progressive_loss_is_training_only():
    idx = tokens()
    on, off = tiny(progressive_loss_weight=1.0).eval(), tiny().eval()
    with torch.no_grad():
        assert torch.equal(on(idx, idx)[1], off(idx, idx)[1])  # eval loss is the plain loss
        assert torch.equal(on(idx)[0], off(idx)[0])


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_trains_on_the_tiny_preset(name):
    """A few optimizer steps on one fixed batch: the loss stays finite and falls."""
    model = tiny(**VARIANTS[name])
    idx = tokens(4, 32)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    with torch.no_grad():
        before = model.eval()(x, y)[1].item()
    model.train()
    for _ in range(15):
        _, loss = model(x, y)
        assert torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model.eval()(x, y)[1].item()
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_stays_causal(name):
    model = tiny(**VARIANTS[name]).eval()
    idx = tokens(1, 20)
    changed = idx.clone()
    changed[0, 11] += 1
    with torch.no_grad():
        torch.manual_seed(0)  # the same noise draw for both (init_state="noise")
        a, _ = model(idx, n_steps=3)
        torch.manual_seed(0)
        b, _ = model(changed, n_steps=3)
    torch.testing.assert_close(a[:, :11], b[:, :11], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 11:], b[:, 11:], atol=1e-4)
