"""token_logprobs and entropy_from_logits against explicit float64 formulas."""

import math

import pytest
import torch

from r1mega.algo import entropy_from_logits, token_logprobs

V = 11


def logits_and_tokens(seed, shape=(3, 5), dtype=torch.float64, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, V, generator=gen, dtype=torch.float64)).to(dtype)
    return logits, torch.randint(0, V, shape, generator=gen)


def reference_logprob(row, token, temperature):
    """log(exp(z_k) / sum_j exp(z_j)) with z = row / temperature, in Python floats."""
    z = [float(x) / temperature for x in row]
    top = max(z)
    return z[token] - top - math.log(sum(math.exp(x - top) for x in z))


def reference_entropy(row, temperature):
    z = [float(x) / temperature for x in row]
    top = max(z)
    total = sum(math.exp(x - top) for x in z)
    probs = [math.exp(x - top) / total for x in z]
    return -sum(p * math.log(p) for p in probs if p > 0)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_token_logprobs_match_the_formula(temperature):
    logits, tokens = logits_and_tokens(1)
    got = token_logprobs(logits, tokens, temperature=temperature)
    assert got.shape == tokens.shape and got.dtype == torch.float64
    expected = torch.tensor(
        [[reference_logprob(logits[i, j], tokens[i, j], temperature) for j in range(5)] for i in range(3)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_entropy_matches_the_formula(temperature):
    logits, _ = logits_and_tokens(2)
    got = entropy_from_logits(logits, temperature=temperature)
    assert got.shape == (3, 5) and got.dtype == torch.float64
    expected = torch.tensor(
        [[reference_entropy(logits[i, j], temperature) for j in range(5)] for i in range(3)], dtype=torch.float64
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_gradients_match_the_analytic_ones():
    logits, tokens = logits_and_tokens(3, shape=(4,))
    logits.requires_grad_()
    temperature = 0.7
    (grad_lp,) = torch.autograd.grad(token_logprobs(logits, tokens, temperature=temperature).sum(), logits)
    p = torch.softmax(logits.detach() / temperature, -1)
    onehot = torch.nn.functional.one_hot(tokens, V).double()
    torch.testing.assert_close(grad_lp, (onehot - p) / temperature, rtol=1e-12, atol=1e-12)
    (grad_h,) = torch.autograd.grad(entropy_from_logits(logits, temperature=temperature).sum(), logits)
    h = -(p * torch.log(p)).sum(-1, keepdim=True)
    # dH/dz_k = -p_k (log p_k + H)
    torch.testing.assert_close(grad_h, -p * (torch.log(p) + h) / temperature, rtol=1e-10, atol=1e-12)


def test_low_precision_logits_are_upcast_to_float32():
    logits, tokens = logits_and_tokens(4, dtype=torch.bfloat16)
    lp = token_logprobs(logits, tokens)
    ent = entropy_from_logits(logits)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(lp, token_logprobs(logits.double(), tokens).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, entropy_from_logits(logits.double()).float(), rtol=1e-5, atol=1e-5)
    assert token_logprobs(logits.half(), tokens).dtype == torch.float32


def test_large_and_banned_logits_stay_finite():
    logits = torch.tensor([[1e4, 1e4 - 1.0, -1e4, float("-inf")]], dtype=torch.float32, requires_grad=True)
    lp = token_logprobs(logits, torch.tensor([1]))
    torch.testing.assert_close(lp, torch.tensor([-1.0 - math.log1p(math.exp(-1.0))]))
    ent = entropy_from_logits(logits)
    p = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(ent, torch.tensor([-(p * math.log(p) + (1 - p) * math.log(1 - p))]))
    (grad,) = torch.autograd.grad(ent.sum() + lp.sum(), logits)
    assert torch.isfinite(grad).all() and grad[0, 3] == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: token_logprobs(torch.zeros(2, V), torch.zeros(3, dtype=torch.long)), "tokens has shape"),
        (lambda: token_logprobs(torch.zeros(2, V), torch.zeros(2)), "tokens must be an integer tensor"),
        (lambda: token_logprobs(torch.zeros(2, V, dtype=torch.long), torch.zeros(2, dtype=torch.long)), "logits"),
        (lambda: token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), temperature=0.0), "temperature"),
        (lambda: entropy_from_logits(torch.zeros(2, V), temperature=-1.0), "temperature"),
        (lambda: entropy_from_logits(torch.tensor(1.0)), "logits"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
