"""models/layers.py: the fp32 RMSNorm, RoPE, attention with a KV cache, the chunked loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import config
from models.layers import (
    CausalSelfAttention,
    KVCache,
    RMSNorm,
    Rotary,
    chunked_cross_entropy,
    sample_depth,
)

torch.set_num_threads(1)
TINY = config.preset("tiny", "refiner").model


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_rms_norm_matches_the_formula_in_value_and_gradient():
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, dtype=torch.double, requires_grad=True)
    grad_out = torch.randn(3, 5, 16, dtype=torch.double)
    y = norm(x)
    y.backward(grad_out)
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    ref = reference_rms_norm(x, norm.weight, 1e-6)
    ref.backward(grad_out)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, norm.weight.grad)
    assert torch.autograd.gradcheck(norm, (x.detach().requires_grad_(),))


def test_rms_norm_computes_in_fp32_and_returns_the_input_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    x = (torch.randn(4, 64) * 300).half()  # squares overflow fp16 (max 65504)
    y = norm(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), reference_rms_norm(x.float(), norm.weight, 1e-6),
                               atol=2e-3, rtol=2e-3)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    rope = Rotary(8, 32, 10_000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pos_q: int, pos_k: int) -> float:
        return float((rope(q, pos_q) * rope(k, pos_k)).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    torch.testing.assert_close(rope(q, 0), q)  # position 0 is the identity


def test_attention_with_kv_cache_equals_full_causal_attention():
    torch.manual_seed(0)
    attn = CausalSelfAttention(TINY).eval()
    rope = Rotary(TINY.head_dim, TINY.block_size, TINY.rope_base)
    x = torch.randn(2, 11, TINY.d_model)
    with torch.no_grad():
        full = attn(x, rope)
        cache = KVCache.empty(2, TINY, x.device, x.dtype)
        parts = [attn(x[:, :4], rope, cache), attn(x[:, 4:5], rope, cache), attn(x[:, 5:], rope, cache)]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n, chunk", [(37, 16), (37, 37), (37, 100)])
def test_chunked_cross_entropy_equals_full_cross_entropy(n, chunk):
    torch.manual_seed(0)
    vocab, dim = 50, 12
    h = torch.randn(n, dim, dtype=torch.double, requires_grad=True)
    w = torch.randn(vocab, dim, dtype=torch.double, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    targets[::5] = -100
    loss = chunked_cross_entropy(h, w, targets, chunk)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = F.cross_entropy((h @ w.t()).double(), targets, ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert loss.dtype == torch.float32  # the loss is accumulated in fp32 by policy
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_of_a_batch_shape_and_all_ignored():
    torch.manual_seed(0)
    h, w = torch.randn(2, 9, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (2, 9))
    ref = F.cross_entropy((h @ w.t()).view(-1, 30), targets.view(-1))
    assert chunked_cross_entropy(h, w, targets, 4).item() == pytest.approx(ref.item(), rel=1e-5)
    # a batch with nothing to predict gives 0, not nan (a NaN would stop a training run)
    assert chunked_cross_entropy(h, w, torch.full((2, 9), -100), 4).item() == 0.0


def test_chunked_cross_entropy_is_fp32_under_fp16_autocast():
    torch.manual_seed(0)
    h, w = torch.randn(16, 8), torch.randn(30, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_cross_entropy(h, w, torch.randint(0, 30, (16,)), 5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


def test_sample_depth_stays_in_range_and_varies():
    gen = torch.Generator().manual_seed(0)
    for dist in ("uniform", "poisson"):
        draws = [sample_depth(2, 5, 3, dist, gen) for _ in range(200)]
        assert min(draws) >= 2 and max(draws) <= 5 and len(set(draws)) >= 3
