"""The parts both architectures are built from: RMSNorm, RoPE, causal attention with a KV cache,
a SwiGLU MLP, a pre-norm Block, and a chunked cross-entropy. Read top to bottom."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from config import ModelConfig

# torch.func's transforms refuse torch.utils.checkpoint (its saved-tensor hooks), so code that
# trains under vmap(grad) (harness/batched.py) keeps the activations instead: the same values,
# more memory.
_keep_activations = contextvars.ContextVar("keep_activations", default=False)


@contextlib.contextmanager
def keep_activations() -> Iterator[None]:
    """Within: no activation checkpointing (Block, chunked_cross_entropy), whatever the config."""
    token = _keep_activations.set(True)
    try:
        yield
    finally:
        _keep_activations.reset(token)


def _checkpointed(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    if _keep_activations.get():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


class _RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * weight, computed in fp32, output in x's dtype. Autograd on the plain
    formula would save two fp32 copies of x per call (four calls per block); this saves only
    x itself (usually alive anyway) and one 1/rms per row, and recomputes the rest in backward.
    forward and setup_context are apart, and the vmap rule generated, so that torch.func
    transforms (harness/batched.py: seeds stacked under vmap) can run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp16 -> fp32; fp64 (gradcheck) stays
        xf = x.to(dtype)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        return (xf * rstd * weight.to(dtype)).to(x.dtype), rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _rstd: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.to(rstd.dtype) * rstd
        g = grad_out.to(rstd.dtype)
        grad_weight = (g * x_hat).reshape(-1, x.size(-1)).sum(0)
        g_hat = g * weight.to(rstd.dtype)
        # d(x_hat)/dx = rstd * (I - x_hat x_hat^T / dim)
        grad_x = rstd * (g_hat - x_hat * (g_hat * x_hat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the autocast dtype (fp16 policy)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)[0]


class Rotary(nn.Module):
    """Rotary position embedding tables for positions [0, block_size)."""

    def __init__(self, head_dim: int, block_size: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(block_size, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, hd/2)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """Rotate x (B, H, T, hd) as if its first token sat at position `pos`."""
        T = x.size(-2)
        if pos + T > self.cos.size(0):
            raise ValueError(f"position {pos + T - 1} is beyond block_size {self.cos.size(0)}")
        cos = self.cos[pos : pos + T].to(x.dtype)
        sin = self.sin[pos : pos + T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


@dataclass
class KVCache:
    """Keys and values of one attention layer (or one loop pass) for incremental decoding."""

    k: torch.Tensor  # (B, H, T_max, hd)
    v: torch.Tensor
    length: int = 0

    @staticmethod
    def empty(batch: int, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch, cfg.n_heads, cfg.block_size, cfg.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(shape, device=device, dtype=dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # QK-norm keeps attention logits bounded, which matters in fp16 and in a deep loop.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        pos = cache.length if cache is not None else 0
        q, k = rope(self.q_norm(q), pos), rope(self.k_norm(k), pos)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache.k[:, :, pos : pos + T] = k
            cache.v[:, :, pos : pos + T] = v
            cache.length = pos + T
            k, v = cache.k[:, :, : pos + T], cache.v[:, :, : pos + T]
            # new query i sits at absolute position pos + i and may see keys up to there
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.checkpointed = cfg.activation_checkpointing

    def _forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache | None = None) -> torch.Tensor:
        if self.checkpointed and self.training and torch.is_grad_enabled():
            return _checkpointed(self._forward, x, rope, cache)
        return self._forward(x, rope, cache)


@dataclass
class Draws:
    """The random choices of one forward, drawn up front from torch's global RNG in this order:
    the depth K, then (the refiner's) time offset and initial state's noise. Apart from the
    forward so that harness/batched.py can draw each stacked seed's from that seed's own stream
    (random ops do not run under vmap); there `offset` is a 0-dim tensor and `noise` one seed's
    slice."""

    depth: int
    offset: int | torch.Tensor = 0
    noise: torch.Tensor | None = None  # (B, T, C), already scaled by state_noise_std


def init_weights(module: nn.Module, std: float, n_residual_layers: int) -> None:
    """GPT-2 style init; output projections scaled down by depth so the residual stream is
    not blown up by many additions."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        if name.endswith("proj.weight") or name.endswith("down.weight"):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * max(1, n_residual_layers)))
        else:
            nn.init.normal_(p, mean=0.0, std=std)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.t()).float()  # (N, V) in fp32, for this chunk only
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against targets (-100 = ignore), computed a chunk of
    rows at a time. Each chunk's logits are recomputed in backward (checkpoint), so the
    (tokens x vocab) logits never exist at once for a whole batch."""
    h = h.reshape(-1, h.size(-1))
    targets = targets.reshape(-1)
    count = (targets != -100).sum().clamp(min=1)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.size(0), chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + _checkpointed(_chunk_loss, h[sl], weight, targets[sl])
        else:
            total = total + _chunk_loss(h[sl], weight, targets[sl])
    return total / count


def sample_depth(lo: int, hi: int, mean: int, dist: str, generator: torch.Generator | None) -> int:
    """Training depth: uniform on [lo, hi], or Poisson around `mean` clipped to [lo, hi]."""
    if dist == "poisson":
        k = int(torch.poisson(torch.tensor([float(mean)]), generator=generator).item())
        return min(max(k, lo), hi)
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())
