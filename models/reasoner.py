"""The control: a vanilla pre-norm transformer whose depth is random in training.

    tokens -> embedding -> the first d of n_layers blocks -> final norm -> tied LM head

d is drawn from config.depth_min .. depth_max in training and fixed at inference
(`depth_eval`, or `n_steps`). Any gain of the refiner must beat this model, which has the same
parts and the same random-depth training but no weight sharing, time signal or gate.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from config import ConfigError, ModelConfig
from models.generate import Generator
from models.layers import (
    Block,
    Draws,
    KVCache,
    RMSNorm,
    Rotary,
    chunked_cross_entropy,
    init_weights,
    sample_depth,
)


class Reasoner(Generator, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        init_weights(self, cfg.init_std, cfg.n_layers)

    def lm_weight(self) -> torch.Tensor:
        return self.wte.weight  # the head is tied to the embedding

    def pick_depth(self, n_steps: int | None) -> int:
        if n_steps is not None:
            if not 1 <= n_steps <= self.cfg.n_layers:
                raise ConfigError(f"n_steps: {n_steps} is out of range (allowed: [1, {self.cfg.n_layers}])")
            return n_steps
        if self.training:
            c = self.cfg
            return sample_depth(c.depth_min, c.depth_max, c.depth_eval, c.depth_dist, None)
        return self.cfg.depth_eval

    def draw(self, idx: torch.Tensor, n_steps: int | None = None) -> Draws:
        """This forward's random choice: its depth."""
        return Draws(self.pick_depth(n_steps))

    def hidden(self, idx: torch.Tensor, n_steps: int | None = None,
               caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final normed state (B, T, C) after the first `depth` blocks."""
        x = self.wte(idx)  # (B, T, C)
        for i in range(self.draw(idx, n_steps).depth):
            x = self.blocks[i](x, self.rope, caches[i] if caches else None)
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                n_steps: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Same contract as CausalRefiner.forward."""
        h = self.hidden(idx, n_steps)
        if targets is None:
            return h @ self.lm_weight().t(), None
        return None, self.loss(h, targets)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(h, self.lm_weight(), targets, self.cfg.loss_chunk_tokens)

    def n_cache_layers(self, n_steps: int) -> int:
        return n_steps
