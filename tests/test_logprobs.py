"""Vocab-parallel log-probs and entropy on one process: exact vs log_softmax, correct backward."""

import pytest
import torch

from gift_megatron.algo import vocab_parallel_entropy, vocab_parallel_logprobs
from tests.reference import ref_logprobs


def _data(seed=0, B=3, T=4, V=50, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale, torch.randint(0, V, (B, T), generator=g)


def test_logprobs_equal_log_softmax_and_float64_reference():
    logits, target = _data()
    logp = vocab_parallel_logprobs(logits, target)
    expected = torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logp.double(), ref_logprobs(logits, target), rtol=0, atol=1e-5)


def test_logprobs_backward_matches_autograd():
    logits, target = _data(seed=1)
    w = torch.randn(target.shape)
    a = logits.clone().requires_grad_()
    (vocab_parallel_logprobs(a, target, temperature=0.7) * w).sum().backward()
    b = logits.clone().requires_grad_()
    (torch.log_softmax(b / 0.7, -1).gather(-1, target[..., None]).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_logprobs_gradcheck_float64():
    logits, target = _data(seed=2, B=2, T=2, V=7, scale=1.0)
    # The function computes in float32; check its analytic backward against finite differences there.
    # 1e-3: float32 round-off (~1e-7) over the difference step eps = 1e-3 is ~1e-4 of error; 1e-3 leaves 10x
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_logprobs(z, target).double(), (x,), eps=1e-3,
                                    atol=1e-3, rtol=1e-3)


def test_bfloat16_logits_are_computed_in_float32():
    logits, target = _data(seed=3)
    logp = vocab_parallel_logprobs(logits.bfloat16(), target)
    assert logp.dtype == torch.float32
    expected = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)


def test_entropy_value_and_backward():
    logits, _ = _data(seed=4)
    a = logits.clone().requires_grad_()
    h = vocab_parallel_entropy(a)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(h, -(p * torch.log_softmax(logits, -1)).sum(-1), rtol=1e-5, atol=1e-5)
    w = torch.randn(h.shape)
    (h * w).sum().backward()
    b = logits.clone().requires_grad_()
    pb = torch.softmax(b, -1)
    (-(pb * torch.log_softmax(b, -1)).sum(-1) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 30.0])
def test_logprobs_extreme_logits_stay_finite(scale):
    logits, target = _data(seed=5, scale=scale)
    logp = vocab_parallel_logprobs(logits * 100 if scale > 1 else logits, target)
    assert torch.isfinite(logp).all() and (logp <= 0).all()


def test_padded_vocabulary_columns_are_excluded():
    logits, target = _data(seed=6, V=50)
    padded = torch.cat([logits, torch.full((3, 4, 14), 5.0)], -1).requires_grad_()  # 14 padding columns
    logp = vocab_parallel_logprobs(padded, target, vocab_size=50)
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1))
    logp.sum().backward()
    assert padded.grad[..., 50:].abs().max() == 0
    ent = vocab_parallel_entropy(padded.detach(), vocab_size=50)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ent, -(p * torch.log_softmax(logits, -1)).sum(-1), rtol=1e-5, atol=1e-5)
