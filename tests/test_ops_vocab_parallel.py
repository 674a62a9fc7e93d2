"""Vocabulary-parallel log-probs, entropies and GRPO loss (r1mega.ops.vocab_parallel).

The multi-rank checks run in ONE torchrun launch on 2 gloo ranks (tests/workers/vocab_parallel_tp.py:
log-probs, entropies, loss, metrics and gradients against the float64 reference and the unsharded
ops, bf16, odd shard widths, tokens in one shard, all -inf shards, padding, gradient accumulation,
and linear_grpo_loss with a sharded weight). In process: the per-shard partials kernel against
torch, tp = 1 (group=None) against the plain ops, and argument errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from r1mega_kernels.vocab_parallel import logprob_partials  # after conftest set TRITON_INTERPRET

from r1mega.algo import LossSpec
from r1mega.ops import (
    grpo_loss,
    token_logprobs,
    token_logprobs_and_entropy,
    vocab_parallel_grpo_loss,
    vocab_parallel_token_logprobs,
    vocab_parallel_token_logprobs_and_entropy,
)
from r1mega.ops.vocab_parallel import _torch_partials
from tests.test_kernels_grpo_loss import evaluate, make_batch
from tests.test_kernels_logprob import (
    BACKENDS,
    DEVICES,
    KERNEL_DEVICE,
    random_logits,
)
from tests.torchrun import run_torchrun

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes


@pytest.mark.distributed
@pytest.mark.parametrize("device, vocab", [
    ("cpu", None),  # every case, small shards, both backends
    # the Triton backend with the models' vocabularies, both ranks on one GPU (gloo all-reduces)
    pytest.param("cuda", 32_000, marks=pytest.mark.gpu, id="cuda-V32000"),
    pytest.param("cuda", 152_064, marks=pytest.mark.gpu, id="cuda-V152064"),
])
def test_tensor_parallel_ranks_match_the_unsharded_ops(device, vocab, gen):
    """2 ranks, every case in one launch (each launch costs ~5 s); the seed is fresh and printed."""
    seed = gen.initial_seed()
    sizes = [] if vocab is None else [device, str(vocab)]
    out = run_torchrun("vocab_parallel_tp.py", 2, str(seed), *sizes, timeout_s=400)
    print(out)
    assert f"vocab parallel ok on 2 ranks ({device})" in out


@pytest.mark.parametrize("vocab_start", [0, 50, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_kernel_matches_torch(dtype, vocab_start, gen):
    """m, s, t and the target logit of one shard; ids outside it give -inf; skipped rows give 0."""
    logits, _ = random_logits(gen, (3, 11), 97, dtype, KERNEL_DEVICE)
    tokens = torch.randint(0, 300, (3, 11), generator=gen).to(KERNEL_DEVICE)
    tokens[0, :4] = torch.arange(vocab_start, vocab_start + 4)  # some surely inside the shard
    logits[1, 2, :40] = float("-inf")  # banned entries
    logits[2, 5] = float("-inf")  # a row of -inf only (the shard of a rank that holds none of it)
    valid = torch.ones(3, 11, dtype=torch.bool, device=KERNEL_DEVICE)
    valid[2, 7:] = False
    logits[2, 7:] = float("nan")  # never read
    out = logprob_partials(logits, tokens, vocab_start=vocab_start, temperature=0.7, with_entropy=True,
                           valid=valid, rows_per_program=4, block_v=32)
    m, s, t, z_y = _torch_partials(logits, tokens, valid, 0.7, True, vocab_start)
    for name, a, b in [("row_max", out.row_max, m), ("sum_exp", out.sum_exp, s),
                       ("sum_exp_shifted", out.sum_exp_shifted, t), ("target_logit", out.target_logit, z_y)]:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, msg=name)
    local = tokens - vocab_start
    inside = (local >= 0) & (local < 97)
    assert torch.isneginf(out.target_logit[valid & ~inside]).all() and inside[0, :4].all()
    assert (out.row_max[~valid] == 0).all() and (out.target_logit[~valid] == 0).all()
    assert out.row_max[2, 5] == float("-inf") and out.sum_exp[2, 5] == 0 and out.sum_exp_shifted[2, 5] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_none_is_the_plain_op(backend, device, gen):
    """tp = 1: vocab_parallel_* with group=None are the plain ops, bit for bit (value and gradient)."""
    logits, tokens = random_logits(gen, (3, 7), 301, torch.bfloat16, device)
    g, gh = (torch.randn(3, 7, generator=gen).to(device) for _ in range(2))
    results = []
    for fn in (lambda x: vocab_parallel_token_logprobs_and_entropy(x, tokens, group=None, temperature=0.9,
                                                                   backend=backend),
               lambda x: token_logprobs_and_entropy(x, tokens, temperature=0.9, backend=backend)):
        x = logits.clone().requires_grad_()
        logp, entropy = fn(x)
        (grad,) = torch.autograd.grad((logp * g).sum() + (entropy * gh).sum(), x)
        results.append((logp, entropy, grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(vocab_parallel_token_logprobs(logits, tokens, group=None, backend=backend),
                       token_logprobs(logits, tokens, backend=backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["everything", "gspo-everything"])
def test_group_none_loss_is_the_plain_loss(case, backend, device, gen):
    batch, opts = make_batch(gen, case, device=device)
    ours = evaluate(vocab_parallel_grpo_loss, batch, opts, group=None, backend=backend, temperature=0.8)
    plain = evaluate(grpo_loss, batch, opts, backend=backend, temperature=0.8)
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours[2], plain[2], rtol=1e-6, atol=1e-8)
    assert list(ours[1]) == list(plain[1])
    for key in plain[1]:
        torch.testing.assert_close(ours[1][key], plain[1][key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_vocabulary_token_has_log_prob_minus_inf(backend):
    lp = vocab_parallel_token_logprobs(torch.zeros(2, 10), torch.tensor([3, 10]), group=None, backend=backend)
    assert lp[0].item() == pytest.approx(-math.log(10)) and lp[1].item() == float("-inf")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: vocab_parallel_token_logprobs(torch.zeros(2, 9), torch.zeros(3, dtype=torch.long), group=None),
         "tokens has shape"),
        (lambda: vocab_parallel_token_logprobs(torch.zeros(2, 9), torch.zeros(2, dtype=torch.long),
                                               group=object()), "torch.distributed is not initialized"),
        (lambda: vocab_parallel_grpo_loss(torch.zeros(3, 9), torch.zeros(3, dtype=torch.long), torch.zeros(3),
                                          torch.zeros(3), torch.ones(3), group=None),
         "logits_shard must be a 3-D floating tensor"),
        (lambda: vocab_parallel_grpo_loss(torch.zeros(2, 3, 9), torch.zeros(2, 3, dtype=torch.long),
                                          torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), group=None),
         "old_logp has shape"),
        (lambda: vocab_parallel_grpo_loss(torch.zeros(2, 3, 9), torch.zeros(2, 3, dtype=torch.long),
                                          torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3),
                                          LossSpec(agg="mean"), group=None), "agg must be one of"),  # LossSpec refuses
        (lambda: vocab_parallel_grpo_loss(torch.zeros(2, 3, 9), torch.zeros(2, 3, dtype=torch.long),
                                          torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3),
                                          LossSpec(agg="seq-mean-token-sum"), group=None, global_tokens=4),
         "global_tokens is only used by agg in"),
        (lambda: vocab_parallel_grpo_loss(torch.zeros(2, 3, 9), torch.zeros(2, 3, dtype=torch.long),
                                          torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3),
                                          LossSpec(kl_coef=0.1), group=None), "kl_coef=0.1 needs ref_logp"),
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
