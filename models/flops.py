"""FLOPs per token and parameters, from the config alone (no model built, no torch imported),
so param-matched and compute-matched comparisons can be read off an ablation report, and a
spec validated, without the cost of importing torch.

Convention (nanoGPT / PaLM appendix B): 2 FLOPs per multiply-add; a matmul with P weights costs
2P per token forward; attention adds 4 * T * d per token per block application (scores and
weighted sum, T = context); backward costs twice the forward of the parts that get gradients.
Work done once per sequence rather than per token (the refiner's time signal: a (K, d) x (d, d)
projection, or a learned-code lookup) and elementwise ops (norms, the gate's blend, adding e and
the time code, gated_blend's subtraction) are not counted.
"""

from __future__ import annotations

import math

from config import ModelConfig


def _block_params(cfg: ModelConfig) -> int:
    d = cfg.d_model
    # qkv + proj, SwiGLU gate/up + down, two RMSNorms, the QK norms
    return 4 * d * d + 3 * d * cfg.hidden + 2 * d + 2 * cfg.head_dim


def param_count(cfg: ModelConfig) -> int:
    """The parameters models.build_model(cfg) has (the tied head counted once, as
    models.count_params does): tests/test_flops.py checks it against built models."""
    d = cfg.d_model
    shared = cfg.vocab_size * d + d  # the tied embedding, the final norm
    if cfg.arch != "refiner":
        return shared + cfg.n_layers * _block_params(cfg)
    time = {"sinusoid": d * d, "random_offset": d * d, "learned": cfg.depth_max * d}.get(cfg.time_signal, 0)
    gate = 0 if cfg.update_rule == "replace" else 2 * d * d + d  # gate_h (with its bias), gate_c
    return shared + (cfg.n_prelude + 1) * _block_params(cfg) + time + gate


def _block_forward(cfg: ModelConfig, ctx: int) -> float:
    d = cfg.d_model
    weights = 4 * d * d + 3 * d * cfg.hidden  # qkv + proj, SwiGLU gate/up + down
    return 2.0 * weights + 4.0 * ctx * d


def _pass_forward(cfg: ModelConfig, ctx: int) -> float:
    """One refiner loop pass: the shared block plus the gate (2d -> d); update_rule="replace"
    has no gate."""
    gate = 0 if cfg.update_rule == "replace" else 2 * cfg.d_model * cfg.d_model
    return _block_forward(cfg, ctx) + 2.0 * gate


def _head_forward(cfg: ModelConfig) -> float:
    return 2.0 * cfg.d_model * cfg.vocab_size


def forward_flops_per_token(cfg: ModelConfig, depth: int | None = None, ctx: int | None = None) -> float:
    """Inference FLOPs per token at `depth` (default depth_eval) with `ctx` tokens of context."""
    depth = cfg.depth_eval if depth is None else depth
    ctx = cfg.block_size if ctx is None else ctx
    if cfg.arch == "refiner":
        body = cfg.n_prelude * _block_forward(cfg, ctx) + depth * _pass_forward(cfg, ctx)
    else:
        body = depth * _block_forward(cfg, ctx)
    return body + _head_forward(cfg)


def progressive_passes(depth: int) -> tuple[float, float]:
    """Expected (passes run, passes with gradient) of the refiner's progressive loss at depth K:
    n ~ U{0..K-1} passes without gradient, then k ~ U{1..K-n} with it (models/refiner.py)."""
    run = with_grad = 0.0
    for n in range(depth):
        mean_k = (depth - n + 1) / 2  # mean of U{1..K-n}
        run += (n + mean_k) / depth
        with_grad += mean_k / depth
    return run, with_grad


def train_flops_at_depth(cfg: ModelConfig, depth: int, ctx: int | None = None) -> float:
    """Training FLOPs per token (forward + backward) of one step at a given depth."""
    ctx = cfg.block_size if ctx is None else ctx
    if cfg.arch == "refiner":
        with_grad = min(depth, cfg.backprop_steps)  # truncated backprop: no backward elsewhere
        fwd = forward_flops_per_token(cfg, depth, ctx)
        grad_part = cfg.n_prelude * _block_forward(cfg, ctx) + with_grad * _pass_forward(cfg, ctx)
        total = fwd + 2.0 * (grad_part + _head_forward(cfg))
        if cfg.progressive_loss_weight > 0:
            # a second loop from the same encoding (the prelude runs, and backpropagates, once)
            # and a second head and loss
            run, grad = progressive_passes(depth)
            total += (run + 2.0 * grad) * _pass_forward(cfg, ctx) + 3.0 * _head_forward(cfg)
        return total
    return 3.0 * forward_flops_per_token(cfg, depth, ctx)


def depth_distribution(cfg: ModelConfig) -> dict[int, float]:
    """P(training depth = k), as models.layers.sample_depth draws it."""
    lo, hi = cfg.depth_min, cfg.depth_max
    if lo == hi:
        return {lo: 1.0}
    if cfg.depth_dist == "uniform":
        return {k: 1.0 / (hi - lo + 1) for k in range(lo, hi + 1)}
    lam = float(cfg.depth_eval)  # Poisson around depth_eval, clipped to [lo, hi]

    def pmf(k: int) -> float:
        return math.exp(k * math.log(lam) - lam - math.lgamma(k + 1))

    probs = {k: pmf(k) for k in range(lo + 1, hi)}
    probs[lo] = sum(pmf(k) for k in range(lo + 1))
    probs[hi] = max(0.0, 1.0 - sum(probs.values()))
    return probs


def train_flops_per_token(cfg: ModelConfig, ctx: int | None = None) -> float:
    """Expected training FLOPs per token over the training depth distribution."""
    return sum(p * train_flops_at_depth(cfg, k, ctx) for k, p in depth_distribution(cfg).items())
