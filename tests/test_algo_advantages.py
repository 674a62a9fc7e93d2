"""grpo_advantages against a float64 loop reference written from the formulas, and its properties."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1mega.algo import ADV_SCALES, grpo_advantages, policy_loss

NAN = float("nan")


def reference_advantages(rewards, group_ids, scale, eps):
    """Loop over groups in Python floats: A = (r - group mean) / (unbiased std + eps)."""
    rewards, group_ids = [float(r) for r in rewards], [int(g) for g in group_ids]
    scored = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(scored) if len(scored) > 1 else 0.0
    out = []
    for r, g in zip(rewards, group_ids):
        group = [x for x, h in zip(rewards, group_ids) if h == g and not math.isnan(x)]
        if math.isnan(r) or len(group) < 2:
            out.append(0.0)
            continue
        centred = r - statistics.fmean(group)
        if scale == "group":
            out.append(centred / (statistics.stdev(group) + eps))
        elif scale == "batch":
            out.append(centred / (batch_std + eps))
        else:
            out.append(centred)
    return torch.tensor(out, dtype=torch.float64)


def random_batch(seed, size=23, num_groups=6):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(size, generator=gen, dtype=torch.float64) * 3 + 1
    # Arbitrary, unsorted, non-contiguous ids, with negative ones too.
    labels = torch.tensor([-7, 3, 100, 42, 0, 9])[:num_groups]
    group_ids = labels[torch.randint(0, num_groups, (size,), generator=gen)]
    return rewards, group_ids


@pytest.mark.parametrize("scale", ADV_SCALES)
@pytest.mark.parametrize("eps", [1e-6, 1e-4, 0.5])
def test_matches_loop_reference(scale, eps):
    rewards, group_ids = random_batch(seed=1)
    rewards[[2, 11]] = NAN  # unscorable completions
    group_ids[5] = 777  # a one-completion group
    got = grpo_advantages(rewards, group_ids, scale=scale, eps=eps)
    torch.testing.assert_close(got, reference_advantages(rewards, group_ids, scale, eps), rtol=1e-12, atol=1e-12)
    assert got[2] == 0 and got[11] == 0 and got[5] == 0


def test_known_values_and_paper_default():
    # Group 5 = {1, 0, 3}: mean 4/3, unbiased std sqrt(7/3); group 9 = {1, NaN}; group 2 = {2}.
    rewards = torch.tensor([1.0, 0.0, 1.0, NAN, 2.0, 3.0])
    adv = grpo_advantages(rewards, torch.tensor([5, 5, 9, 9, 2, 5]))
    std = math.sqrt(7 / 3)
    expected = [(1 - 4 / 3) / (std + 1e-6), (0 - 4 / 3) / (std + 1e-6), 0, 0, 0, (3 - 4 / 3) / (std + 1e-6)]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_group_order_does_not_matter():
    rewards, group_ids = random_batch(seed=2)
    perm = torch.randperm(rewards.numel(), generator=torch.Generator().manual_seed(0))
    adv = grpo_advantages(rewards, group_ids)
    torch.testing.assert_close(grpo_advantages(rewards[perm], group_ids[perm]), adv[perm])


def test_dtype_is_kept_and_statistics_are_float64():
    # Large offset: a float32 one-pass variance would lose the spread; float64 two-pass keeps it.
    rewards = torch.tensor([1e6 + 0.5, 1e6 - 0.5, 1e6 + 1.5, 1e6 - 1.5], dtype=torch.float32)
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([0.70711, -0.70711, 0.70711, -0.70711]), rtol=1e-4, atol=1e-4)
    assert grpo_advantages(rewards.double(), torch.tensor([0, 0, 1, 1])).dtype == torch.float64


def test_empty_batch_and_all_nan_group():
    assert grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    adv = grpo_advantages(torch.tensor([NAN, NAN, 1.0, 2.0]), torch.tensor([0, 0, 1, 1]), scale="batch")
    assert torch.isfinite(adv).all() and adv[0] == 0 and adv[1] == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=torch.zeros(3, 2), group_ids=torch.zeros(3, dtype=torch.long)), "rewards"),
        (dict(rewards=torch.zeros(3, dtype=torch.long), group_ids=torch.zeros(3, dtype=torch.long)), "rewards"),
        (dict(rewards=torch.zeros(3), group_ids=torch.zeros(3)), "group_ids"),
        (dict(rewards=torch.zeros(3), group_ids=torch.zeros(4, dtype=torch.long)), "group_ids has shape"),
        (dict(rewards=torch.zeros(3), group_ids=torch.zeros(3, dtype=torch.long), scale="std"),
         r"scale must be one of \('group', 'batch', 'none'\)"),
        (dict(rewards=torch.zeros(3), group_ids=torch.zeros(3, dtype=torch.long), eps=0.0), "eps must be > 0"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(**kwargs)


group_rewards = st.lists(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=6), min_size=1, max_size=5
)


def _flatten(groups):
    rewards = torch.tensor([r for g in groups for r in g], dtype=torch.float64)
    ids = torch.tensor([3 * i + 1 for i, g in enumerate(groups) for _ in g])
    return rewards, ids


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=5), sizes=st.data())
def test_equal_rewards_in_each_group_give_zero_advantage_and_zero_policy_gradient(values, sizes):
    groups = [[v] * sizes.draw(st.integers(2, 5)) for v in values]
    rewards, ids = _flatten(groups)
    for scale in ADV_SCALES:
        adv = grpo_advantages(rewards, ids, scale=scale)
        assert torch.equal(adv, torch.zeros_like(adv))
        logp = torch.randn(len(rewards), 5, dtype=torch.float64, requires_grad=True)
        loss, _ = policy_loss(logp, logp.detach() + 0.1, adv, torch.ones(len(rewards), 5))
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.equal(grad, torch.zeros_like(grad))


@settings(max_examples=60, deadline=None)
@given(groups=group_rewards)
def test_advantages_are_centred_in_every_group(groups):
    rewards, ids = _flatten(groups)
    for scale in ADV_SCALES:
        adv = grpo_advantages(rewards, ids, scale=scale)
        for gid in ids.unique():
            assert abs(adv[ids == gid].sum().item()) < 1e-9 * max(1.0, adv.abs().max().item())


@settings(max_examples=60, deadline=None)
@given(groups=group_rewards, a=st.floats(1e-2, 1e2), b=st.floats(-1e3, 1e3))
def test_group_normalised_advantages_are_affine_invariant(groups, a, b):
    rewards, ids = _flatten(groups)
    eps = 1e-12
    adv = grpo_advantages(rewards, ids, eps=eps)
    adv_affine = grpo_advantages(a * rewards + b, ids, eps=eps)
    for gid in ids.unique():
        # A group with (almost) no spread is dominated by eps and rounding: not scale-free.
        if a * rewards[ids == gid].std() > 1e-4:
            torch.testing.assert_close(adv_affine[ids == gid], adv[ids == gid], rtol=1e-6, atol=1e-6)
