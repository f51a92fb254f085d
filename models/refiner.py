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

That is the seed design, and every default below. Each variant is a ModelConfig key that
changes one line of the pseudo-code (default first):

  update_rule       gated_residual   as above. The block is residual, c = x + f(x) with x its input,
                                     so the gate blends in c - h = e + time(k) + f(x)
                    gated_blend      only the block's own contribution f = c - x takes c's place,
                                     in the gate too: g = sigmoid(W_h h + W_c f + b); h = h + g * (f - h)
                    replace          h = c; no gate (its weights are not built)
  time_signal       sinusoid         time(k) = W_t sincos(k)   (W_t applied once per forward)
                    none             no time(k)
                    learned          time(k) = a learned vector per k in 0 .. depth_max-1; passes
                                     k >= depth_max reuse the last one (nothing trained the others)
                    random_offset    time(k) = W_t sincos(o + k), o ~ U{0..time_offset_max} drawn
                                     once per forward in training; o = 0 at inference
  init_state        zeros            h = 0
                    noise            h ~ N(0, state_noise_std^2), drawn every forward (inference
                                     too) from torch's global RNG; a cached decode draws it only
                                     for the new positions
  init_scale_depth  depth_eval       output projections init with std / sqrt(2 (n_prelude + depth_eval))
                    distinct_blocks  ... with n_prelude + 1, the blocks that own weights, so the
                                     test depth does not change the init
  progressive_loss_weight  w = 0     off. With w > 0, in training, with targets (Bansal et al. 2022,
                                     "End-to-end Algorithm Synthesis with Recurrent Networks"):
        loss = (1 - w) * loss(K passes as above)
             + w * loss(n ~ U{0..K-1} passes without gradient, then k ~ U{1..K-n} passes with it)
    The second path starts from the same e, time codes and h0, continues the pass index at n,
    and backpropagates through all k passes (not only backprop_steps, so it can hold up to K
    passes of activations): it teaches the loop to improve whatever state it is handed, not
    only the ones its own first passes produce.
"""

from __future__ import annotations

import math

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


def time_codes(n: int, dim: int, device: torch.device, start: int | torch.Tensor = 0) -> torch.Tensor:
    """Fixed sinusoidal codes of the pass indices start .. start+n-1, (n, dim). Defined for any
    index, so depths beyond those seen in training still get a distinct signal. `start` may be a
    0-dim tensor (one offset per stacked seed under vmap)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=device) / half)
    steps = start + torch.arange(n, device=device, dtype=torch.float32)
    angles = steps[:, None] * freqs  # (n, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class CausalRefiner(Generator, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        # Modules are created in the seed design's order: construction draws from the RNG, so
        # the default config gives the same initial weights for the same seed.
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.rope = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_base)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.shared = Block(cfg)
        sinusoid = cfg.time_signal in ("sinusoid", "random_offset")
        self.time_proj: nn.Linear | None = nn.Linear(d, d, bias=False) if sinusoid else None
        self.time_emb: nn.Embedding | None = (
            nn.Embedding(cfg.depth_max, d) if cfg.time_signal == "learned" else None)
        # The gate reads the old state and the new thought. Two (d, d) maps rather than one
        # (2d, d) map over torch.cat([h, c]): same function, no concatenated copy per pass.
        gated = cfg.update_rule != "replace"
        self.gate_h: nn.Linear | None = nn.Linear(d, d) if gated else None
        self.gate_c: nn.Linear | None = nn.Linear(d, d, bias=False) if gated else None
        self.norm_f = RMSNorm(d, cfg.norm_eps)
        # The output-projection scale-down counts blocks: the n_prelude + depth_eval applied at
        # inference (seed design), or the n_prelude + 1 that own weights (distinct_blocks), so
        # that a config's test depth does not change the init.
        n_residual = cfg.depth_eval if cfg.init_scale_depth == "depth_eval" else 1
        init_weights(self, cfg.init_std, cfg.n_prelude + n_residual)
        # init_weights scales time_proj down (its name ends in "proj"); it is an input, not a
        # residual output, so it gets the plain std. time_emb already has it.
        for lin in (self.time_proj, self.gate_h, self.gate_c):
            if lin is not None:
                nn.init.normal_(lin.weight, std=cfg.init_std)
        if self.gate_h is not None:
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

    def draw(self, idx: torch.Tensor, n_steps: int | None = None) -> Draws:
        """This forward's random choices (see Draws) for the tokens idx (B, T)."""
        K = self.pick_depth(n_steps)
        offset = 0
        if self.cfg.time_signal == "random_offset" and self.training:
            # one offset for the whole forward: the passes still count up 1 by 1 from it
            offset = int(torch.randint(0, self.cfg.time_offset_max + 1, (1,)).item())
        noise = None
        if self.cfg.init_state == "noise":
            shape, std = (*idx.shape, self.cfg.d_model), self.cfg.state_noise_std
            noise = torch.randn(shape, device=idx.device, dtype=self.wte.weight.dtype) * std
        return Draws(K, offset, noise)

    def pass_times(self, K: int, device: torch.device, offset: int | torch.Tensor = 0) -> torch.Tensor | None:
        """The time signals of passes 0 .. K-1, (K, C), computed once per forward; None for
        time_signal="none"."""
        signal = self.cfg.time_signal
        if signal == "none":
            return None
        if signal == "learned":
            assert self.time_emb is not None
            steps = torch.arange(K, device=device).clamp(max=self.cfg.depth_max - 1)
            return self.time_emb(steps)
        assert self.time_proj is not None
        return self.time_proj(time_codes(K, self.cfg.d_model, device, offset))

    def initial_state(self, e: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros_like(e) if noise is None else noise.to(e.dtype)

    def refine(self, h: torch.Tensor, e: torch.Tensor, t: torch.Tensor | None,
               cache: KVCache | None = None) -> torch.Tensor:
        """One pass of the shared block with time signal t (C,) or None, blended into the state h."""
        x = h + e if t is None else h + e + t
        c = self.shared(x, self.rope, cache)
        rule = self.cfg.update_rule
        if rule == "replace":
            return c
        if rule == "gated_blend":
            # The residual stream is fp32 even under fp16 autocast, so subtracting x back out
            # loses nothing worth a second Block code path.
            c = c - x
        assert self.gate_h is not None and self.gate_c is not None
        g = torch.sigmoid(self.gate_h(h) + self.gate_c(c))
        return h + g * (c - h)

    def loop(self, h: torch.Tensor, e: torch.Tensor, times: torch.Tensor | None, first: int,
             n: int, with_grad: int, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Passes first .. first+n-1 from state h; only the last `with_grad` record a graph."""
        # Truncated backprop: the earlier passes still shape h; the prelude learns through e,
        # which every pass reads.
        grad_on = torch.is_grad_enabled()
        for k in range(first, first + n):
            cache = caches[self.cfg.n_prelude + k] if caches else None
            with torch.set_grad_enabled(grad_on and k >= first + n - with_grad):
                h = self.refine(h, e, None if times is None else times[k], cache)
        return h

    def start(self, idx: torch.Tensor, d: Draws, caches: list[KVCache] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The encoding e (B, T, C), the time signals of d.depth passes, and the initial state h0."""
        e = self.wte(idx)
        for i, block in enumerate(self.prelude):
            e = block(e, self.rope, caches[i] if caches else None)
        return e, self.pass_times(d.depth, idx.device, d.offset), self.initial_state(e, d.noise)

    def hidden(self, idx: torch.Tensor, n_steps: int | None = None,
               caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final normed state (B, T, C). `caches`: one per prelude block, then one per pass."""
        d = self.draw(idx, n_steps)
        e, times, h = self.start(idx, d, caches)
        return self.norm_f(self.loop(h, e, times, 0, d.depth, self.cfg.backprop_steps, caches))

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(h, self.lm_weight(), targets, self.cfg.loss_chunk_tokens)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                n_steps: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V), None) without targets; (None, mean loss) with them:
        in training the full logits are never materialised (chunked cross-entropy)."""
        w = self.cfg.progressive_loss_weight
        if targets is None:
            return self.hidden(idx, n_steps) @ self.lm_weight().t(), None
        if not (self.training and w > 0):
            return None, self.loss(self.hidden(idx, n_steps), targets)
        d = self.draw(idx, n_steps)
        K = d.depth
        e, times, h0 = self.start(idx, d)
        normal = self.loss(self.norm_f(self.loop(h0, e, times, 0, K, self.cfg.backprop_steps)), targets)
        # Progressive loss: n passes without a graph (so the state is detached), then k passes
        # with one, from pass index n on. The loss is taken after n + k <= K passes.
        n = int(torch.randint(0, K, (1,)).item())
        k = int(torch.randint(1, K - n + 1, (1,)).item())
        h = self.loop(h0, e, times, 0, n, with_grad=0).detach()
        h = self.loop(h, e, times, n, k, with_grad=k)
        progressive = self.loss(self.norm_f(h), targets)
        return None, (1 - w) * normal + w * progressive

    def n_cache_layers(self, n_steps: int) -> int:
        return self.cfg.n_prelude + n_steps
