"""CausalRefiner: a causal language model that thinks by looping one shared block.

    tokens -> embedding -> prelude (n_prelude causal blocks)  = e, the encoded problem
    h = 0
    repeat K times (k = 0 .. K-1):
        c = shared_block(h + e + time(k))        # the same weights every pass
        g = sigmoid(W_h h + W_c c + b)           # the gate: per position, per channel
        h = h + g * (c - h)                      # blend the new thought into the state
    final norm -> LM head (tied to the embedding)

K is drawn at random in training (config.depth_min .. depth_max, `depth_dist`) so the model
learns to use whatever depth it is given, and fixed at inference (`depth_eval`, or `n_steps`).
The encoding e is fed to every pass: with truncated backprop only the last `backprop_steps`
passes carry gradient, and this is the path through which the prelude still learns.
Everything is per position under the causal mask, so the model stays a causal LM at any K.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from config import ConfigError, ModelConfig
from models.generate import Generator
from models.layers import (
    Block,
    KVCache,
    RMSNorm,
    Rotary,
    chunked_cross_entropy,
    init_weights,
    sample_depth,
)


def time_codes(n: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed sinusoidal codes of the pass indices 0 .. n-1, (n, dim). Defined for any n, so
    depths beyond those seen in training still get a distinct signal."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=device) / half)
    angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * freqs  # (n, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class CausalRefiner(Generator, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_base)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.shared = Block(cfg)
        self.time_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # The gate reads the old state and the new thought. Two (d, d) maps rather than one
        # (2d, d) map over torch.cat([h, c]): same function, no concatenated copy per pass.
        self.gate_h = nn.Linear(cfg.d_model, cfg.d_model)
        self.gate_c = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        init_weights(self, cfg.init_std, cfg.n_prelude + cfg.depth_eval)
        for lin in (self.time_proj, self.gate_h, self.gate_c):
            nn.init.normal_(lin.weight, std=cfg.init_std)
        nn.init.constant_(self.gate_h.bias, cfg.gate_bias_init)

    def lm_weight(self) -> torch.Tensor:
        return self.wte.weight  # the head is tied to the embedding

    def pick_depth(self, n_steps: int | None) -> int:
        """Loop passes K: n_steps if given (any K >= 1, also beyond depth_max), else random in
        training and depth_eval at inference."""
        if n_steps is not None:
            if n_steps < 1:
                raise ConfigError(f"n_steps: {n_steps} is out of range (allowed: [1, inf])")
            return n_steps
        if self.training:
            c = self.cfg
            return sample_depth(c.depth_min, c.depth_max, c.depth_eval, c.depth_dist, None)
        return self.cfg.depth_eval

    def refine(self, h: torch.Tensor, e: torch.Tensor, t: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        """One pass of the shared block with time signal t (C,), blended into the state h."""
        c = self.shared(h + e + t, self.rope, cache)
        g = torch.sigmoid(self.gate_h(h) + self.gate_c(c))
        return h + g * (c - h)

    def hidden(self, idx: torch.Tensor, n_steps: int | None = None,
               caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final normed state (B, T, C). `caches`: one per prelude block, then one per pass."""
        K = self.pick_depth(n_steps)
        e = self.wte(idx)  # (B, T, C)
        for i, block in enumerate(self.prelude):
            e = block(e, self.rope, caches[i] if caches else None)
        times = self.time_proj(time_codes(K, self.cfg.d_model, idx.device))  # (K, C), once
        h = torch.zeros_like(e)
        # Truncated backprop: only the last backprop_steps passes record a graph. The earlier
        # passes still shape h; the prelude learns through e, which every pass reads.
        grad_on = torch.is_grad_enabled()
        first_with_grad = K - self.cfg.backprop_steps
        for k in range(K):
            cache = caches[self.cfg.n_prelude + k] if caches else None
            with torch.set_grad_enabled(grad_on and k >= first_with_grad):
                h = self.refine(h, e, times[k], cache)
        return self.norm_f(h)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                n_steps: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V), None) without targets; (None, mean loss) with them:
        in training the full logits are never materialised (chunked cross-entropy)."""
        h = self.hidden(idx, n_steps)
        if targets is None:
            return h @ self.lm_weight().t(), None
        return None, chunked_cross_entropy(h, self.lm_weight(), targets, self.cfg.loss_chunk_tokens)

    def n_cache_layers(self, n_steps: int) -> int:
        return self.cfg.n_prelude + n_steps
