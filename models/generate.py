"""Sampling with a KV cache, shared by both architectures.

A model provides `hidden(idx, n_steps, caches)`, `lm_weight()`, `pick_depth(n_steps)` and
`n_cache_layers(depth)`: one cache per block application (the refiner keeps one per loop pass,
since every pass sees different keys and values).
"""

from __future__ import annotations

import torch

from models.layers import KVCache


class Generator:
    cfg: object

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, n_steps: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens. temperature 0 is greedy. The cache is used while
        the sequence fits in block_size; past that the window slides and every step recomputes,
        exactly as without a cache."""
        was_training = self.training  # type: ignore[attr-defined]
        self.eval()  # type: ignore[attr-defined]
        try:
            return self._generate(idx, max_new_tokens, n_steps, temperature, top_k, use_cache)
        finally:
            self.train(was_training)  # type: ignore[attr-defined]

    def _generate(self, idx: torch.Tensor, max_new_tokens: int, n_steps: int | None,
                  temperature: float, top_k: int | None, use_cache: bool) -> torch.Tensor:
        depth = self.pick_depth(n_steps)  # type: ignore[attr-defined]
        block_size = self.cfg.block_size  # type: ignore[attr-defined]
        caches: list[KVCache] | None = None
        fed = 0  # tokens of idx already in the caches
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= block_size:
                if caches is None:
                    dtype = self.lm_weight().dtype  # type: ignore[attr-defined]
                    caches = [KVCache.empty(idx.size(0), self.cfg, idx.device, dtype)  # type: ignore[arg-type]
                              for _ in range(self.n_cache_layers(depth))]  # type: ignore[attr-defined]
                h = self.hidden(idx[:, fed:], depth, caches)  # type: ignore[attr-defined]
                fed = idx.size(1)
            else:
                # past block_size the window slides, positions shift, and the cache is void
                h = self.hidden(idx[:, -block_size:], depth)  # type: ignore[attr-defined]
            logits = (h[:, -1, :] @ self.lm_weight().t()).float()  # type: ignore[attr-defined]
            idx = torch.cat((idx, self._pick(logits, temperature, top_k)), dim=1)
        return idx

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
        return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
