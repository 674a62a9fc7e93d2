"""policy_loss against independent float64 references: our formulas, verl's and TRL's.

Every reference here is written in the test from the formulas (per-token loops, or the
libraries' own vectorised formulas as they write them); none calls r1mega.algo. Values and
gradients w.r.t. logp are compared.
"""

import dataclasses
import inspect
import math
import subprocess
import sys

import pytest
import torch

from r1mega.algo import AGG_MODES, KL_ESTIMATORS, LossSpec, LossSpecError, local_denominators, policy_loss
from tests.loss_cases import SPEC_FIELDS, split_options, with_spec

# The cases below write loss options and tensors/denominators in one dict: opts_loss makes the
# options a LossSpec (validated at its construction) and passes the rest as policy_loss's arguments.
opts_loss = with_spec(policy_loss)

S, T = 7, 13
BOUND = 20.0  # log-ratio clamp of the spec


def make_batch(seed, *, spread=0.3, adv_per_token=False, dtype=torch.float64):
    """Seeded [S, T] batch: right-padded masks with one empty and one full sequence."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    logp = (-3 * torch.rand(S, T, generator=gen, dtype=dtype)).requires_grad_()
    lengths = torch.randint(1, T + 1, (S,), generator=gen)
    lengths[2], lengths[4] = 0, T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return dict(
        logp=logp,
        old_logp=logp.detach() + spread * randn(S, T),
        advantages=randn(S, T) if adv_per_token else randn(S),
        mask=mask,
        ref_logp=logp.detach() + 0.5 * randn(S, T),
        rollout_logp=logp.detach() + 0.3 * randn(S, T),
    )


def reference_kl(lp, rf, estimator, kl_clamp):
    d = rf - lp
    if estimator.startswith("k1"):
        value = lp - rf
    elif estimator == "k2":
        value = 0.5 * d * d
    else:
        dc = d if kl_clamp is None else torch.clamp(d, -BOUND, BOUND)
        value = torch.exp(dc) - dc - 1
    if kl_clamp is not None:
        value = torch.clamp(value, -kl_clamp, kl_clamp)
    if estimator.endswith("+"):
        k2 = 0.5 * d * d
        value = k2 - k2.detach() + value.detach()
    return value


def reference_loss(
    logp, old_logp, advantages, mask, *, eps_low=0.2, eps_high=0.2, dual_clip=None,
    ratio_level="token", ref_logp=None, kl_coef=0.0, kl_estimator="k3", kl_clamp=None,
    rollout_logp=None, tis_cap=None, agg="token-mean", global_tokens=None,
    global_sequences=None, norm_length=None,
):
    """The spec, token by token, in float64 scalars."""
    sums, counts = [], []
    for s in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[s, t]]
        if tokens and ratio_level == "sequence":
            seq_log_ratio = sum(logp[s, t] - old_logp[s, t] for t in tokens) / len(tokens)
        total = logp.new_zeros(())
        for t in tokens:
            a = advantages[s, t] if advantages.dim() == 2 else advantages[s]
            if ratio_level == "token":
                log_ratio = logp[s, t] - old_logp[s, t]
            else:
                log_ratio = logp[s, t] - logp[s, t].detach() + seq_log_ratio.detach()
            ratio = torch.exp(torch.clamp(log_ratio, -BOUND, BOUND))
            unclipped = -a * ratio
            clipped = -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            loss = unclipped if unclipped >= clipped else clipped
            if dual_clip is not None and a < 0 and loss > -a * dual_clip:
                loss = -a * dual_clip
            if rollout_logp is not None:
                w = math.exp(old_logp[s, t] - rollout_logp[s, t])
                loss = loss * (w if tis_cap is None else min(w, tis_cap))
            if ref_logp is not None and kl_coef != 0:
                loss = loss + kl_coef * reference_kl(logp[s, t], ref_logp[s, t], kl_estimator, kl_clamp)
            total = total + loss
        sums.append(total)
        counts.append(len(tokens))
    nonempty = sum(1 for n in counts if n > 0)
    if agg == "token-mean":
        return sum(sums) / (global_tokens if global_tokens is not None else max(sum(counts), 1))
    if agg == "seq-mean-token-mean":
        numerator = sum(x / max(n, 1) for x, n in zip(sums, counts))
    elif agg == "seq-mean-token-sum":
        numerator = sum(sums)
    else:
        numerator = sum(sums) / (norm_length if norm_length is not None else logp.shape[1])
    return numerator / (global_sequences if global_sequences is not None else max(nonempty, 1))


def loss_and_grad(fn, batch, **kwargs):
    loss = fn(batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"], **kwargs)
    loss = loss[0] if isinstance(loss, tuple) else loss
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    return loss, grad


def assert_same_loss_and_grad(batch, fn_a, kwargs_a, fn_b, kwargs_b, rtol=1e-10, atol=1e-12):
    loss_a, grad_a = loss_and_grad(fn_a, batch, **kwargs_a)
    loss_b, grad_b = loss_and_grad(fn_b, batch, **kwargs_b)
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_a, grad_b, rtol=rtol, atol=atol)


CASES = {
    "defaults": dict(),
    "asymmetric-clip": dict(eps_low=0.1, eps_high=0.28),
    "dual-clip": dict(dual_clip=1.5, spread=0.8),
    "gspo": dict(ratio_level="sequence", eps_low=0.01, eps_high=0.01, spread=0.6, seed=101),
    "gspo-dual-clip": dict(ratio_level="sequence", dual_clip=1.2, eps_low=0.05, eps_high=0.1, spread=1.0, seed=101),
    **{f"kl-{e}": dict(kl_estimator=e, kl_coef=0.3, with_ref=True) for e in KL_ESTIMATORS},
    **{f"kl-{e}-clamp": dict(kl_estimator=e, kl_coef=0.3, kl_clamp=0.4, with_ref=True) for e in KL_ESTIMATORS},
    "kl-k3-verl-clamp-far-ref": dict(kl_estimator="k3", kl_coef=0.3, kl_clamp=10.0, with_ref=True, far_ref=True),
    "kl-k3+-verl-clamp-far-ref": dict(kl_estimator="k3+", kl_coef=0.3, kl_clamp=10.0, with_ref=True, far_ref=True),
    "tis": dict(with_rollout=True),
    "tis-cap": dict(with_rollout=True, tis_cap=1.1),
    "per-token-adv": dict(adv_per_token=True),
    "everything": dict(
        adv_per_token=True, eps_low=0.15, eps_high=0.3, dual_clip=2.0, spread=0.8, with_ref=True,
        kl_estimator="k3+", kl_coef=0.05, kl_clamp=10.0, with_rollout=True, tis_cap=1.5,
    ),
}


def build_case(case, seed=None):
    """The batch and policy_loss options of CASES[case]; the seed defaults to the case's own."""
    opts = dict(CASES[case])
    own_seed = opts.pop("seed", list(CASES).index(case))
    seed = own_seed if seed is None else seed
    batch = make_batch(seed, spread=opts.pop("spread", 0.3), adv_per_token=opts.pop("adv_per_token", False))
    if opts.pop("far_ref", False):
        # d = ref - logp beyond +-20 and k3 beyond 10: both of verl's clamps are exercised.
        batch["ref_logp"][0, :3] += 25.0
        batch["ref_logp"][1, :3] -= 30.0
        batch["ref_logp"][3, :2] += 12.0
    if opts.pop("with_ref", False):
        opts["ref_logp"] = batch["ref_logp"]
    if opts.pop("with_rollout", False):
        opts["rollout_logp"] = batch["rollout_logp"]
    return batch, opts


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, agg):
    batch, opts = build_case(case)
    assert_same_loss_and_grad(batch, opts_loss, dict(opts, agg=agg), reference_loss, dict(opts, agg=agg))


@pytest.mark.parametrize(
    "agg, denominators",
    [
        ("token-mean", dict(global_tokens=123.0)),
        ("seq-mean-token-mean", dict(global_sequences=17)),
        ("seq-mean-token-sum", dict(global_sequences=torch.tensor(17))),
        ("seq-mean-token-sum-norm", dict(global_sequences=17, norm_length=4096)),
        ("seq-mean-token-sum-norm", dict(norm_length=2.5)),
    ],
)
def test_explicit_denominators_match_reference(agg, denominators):
    batch, opts = build_case("everything", seed=5)
    ref_denominators = {k: float(v) for k, v in denominators.items()}
    assert_same_loss_and_grad(
        batch, opts_loss, dict(opts, agg=agg, **denominators), reference_loss, dict(opts, agg=agg, **ref_denominators)
    )


def test_cases_exercise_the_branches_they_name():
    for case, key in [("dual-clip", "dual_clip_frac"), ("gspo", "clip_frac_high"), ("gspo", "clip_frac_low"),
                      ("gspo-dual-clip", "dual_clip_frac"), ("defaults", "clip_frac_low"),
                      ("defaults", "clip_frac_high")]:
        batch, opts = build_case(case)
        _, metrics = opts_loss(batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"], **opts)
        assert metrics[key] > 0, (case, key)
    batch, _ = build_case("tis-cap")
    assert (torch.exp(batch["old_logp"] - batch["rollout_logp"])[batch["mask"]] > 1.1).any()
    batch, _ = build_case("kl-k2-clamp")
    assert (0.5 * (batch["ref_logp"] - batch["logp"]).square()[batch["mask"]] > 0.4).any()


def test_gspo_gradient_is_the_sequence_level_gradient():
    """Unclipped, seq-mean-token-mean: d loss / d logp_it = -A_i s_i / |y_i| / N_seq (GSPO eq.)."""
    batch = make_batch(11, spread=0.2)
    mask, adv = batch["mask"], batch["advantages"]
    loss, grad = loss_and_grad(
        opts_loss, batch, ratio_level="sequence", agg="seq-mean-token-mean", eps_low=0.999, eps_high=1e6
    )
    lengths = mask.sum(-1)
    seq_log_ratio = ((batch["logp"].detach() - batch["old_logp"]) * mask).sum(-1) / lengths.clamp(min=1)
    s = torch.exp(seq_log_ratio)
    num_seq = (lengths > 0).sum()
    expected = (-adv * s / lengths.clamp(min=1) / num_seq)[:, None] * mask
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, (-adv * s)[lengths > 0].sum() / num_seq, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_per_token_equals_kl_after_aggregation(agg, estimator):
    """TRL adds beta*kl per token before aggregating; verl adds coef*agg(kl) after: identical."""
    batch, opts = build_case("everything", seed=3)
    opts.update(kl_estimator=estimator, agg=agg)
    coef = opts.pop("kl_coef")

    def pg_plus_aggregated_kl(logp, old, adv, mask):
        pg, _ = opts_loss(logp, old, adv, mask, **dict(opts, ref_logp=None))
        # With zero advantages the reference loss is the aggregated KL alone.
        kl = reference_loss(logp, old, torch.zeros_like(adv), mask, **dict(opts, kl_coef=1.0, rollout_logp=None))
        return pg + coef * kl

    assert_same_loss_and_grad(batch, opts_loss, dict(opts, kl_coef=coef), pg_plus_aggregated_kl, {})


# ---------------------------------------------------------------------------------------------
# verl (core_algos.py), written as verl writes it, with dp_size = 1.
# ---------------------------------------------------------------------------------------------


def verl_masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None, legacy_norm=False):
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        return (loss_mat * loss_mask).sum() / batch_num_tokens
    if loss_agg_mode == "seq-mean-token-sum-norm" and legacy_norm:  # verl before PR #5417
        return torch.sum(torch.sum(loss_mat * loss_mask, dim=-1)) / (loss_scale_factor or loss_mask.shape[-1])
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = (seq_losses * seq_mask).sum() / global_batch_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor or loss_mask.shape[-1])
        return loss
    seq_mask = torch.sum(loss_mask, dim=-1)
    seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
    seq_mask = (seq_mask > 0).float()
    if global_batch_size is None:
        global_batch_size = seq_mask.sum()
    return (seq_losses * seq_mask).sum() / global_batch_size


def verl_vanilla(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high,
                 clip_ratio_c, rollout_is_weights=None, **agg_kwargs):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    return verl_agg_loss(pg_losses, response_mask, **agg_kwargs), pg_clipfrac, pg_clipfrac_lower


def verl_gspo(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high, **agg_kwargs):
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    return verl_agg_loss(pg_losses, response_mask, "seq-mean-token-mean", **agg_kwargs)


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base in ("kl", "k1"):
        forward = logprob - ref_logprob
    elif base in ("mse", "k2"):
        forward = 0.5 * (logprob - ref_logprob).square()
    else:  # low_var_kl / k3
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        forward = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


# (verl kl_loss_type, our kl_estimator, our kl_clamp)
VERL_KL = [
    ("low_var_kl", "k3", 10.0), ("k3+", "k3+", 10.0), ("kl", "k1", None), ("k1+", "k1+", None), ("mse", "k2", None)
]


@pytest.mark.parametrize("verl_kl, our_kl, kl_clamp", VERL_KL)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_reproduces_verl_vanilla_with_dual_clip_kl_loss_and_rollout_is(agg, verl_kl, our_kl, kl_clamp):
    batch = make_batch(21, spread=1.2)
    batch["ref_logp"][0, :3] += 25.0  # exercise low_var_kl's clamps
    batch["ref_logp"][3, :2] += 12.0
    mask = batch["mask"]
    adv_ST = batch["advantages"][:, None] * mask  # verl broadcasts the score over the response
    is_weights = torch.exp(batch["old_logp"] - batch["rollout_logp"]).clamp(max=2.0)
    gbs, scale = 11, 4096  # verl's global_batch_size and loss_scale_factor
    verl_agg = {
        "token-mean": dict(batch_num_tokens=97),
        "seq-mean-token-mean": dict(global_batch_size=gbs),
        "seq-mean-token-sum": dict(global_batch_size=gbs),
        "seq-mean-token-sum-norm": dict(global_batch_size=gbs, loss_scale_factor=scale),
    }[agg]
    ours_agg = {
        "token-mean": dict(global_tokens=97),
        "seq-mean-token-mean": dict(global_sequences=gbs),
        "seq-mean-token-sum": dict(global_sequences=gbs),
        "seq-mean-token-sum-norm": dict(global_sequences=gbs, norm_length=scale),
    }[agg]
    kl_coef = 0.001

    def verl_actor_loss(logp, old, _adv, m):
        pg_loss, clipfrac, clipfrac_lower = verl_vanilla(
            old, logp, adv_ST, m.double(), 0.2, 0.28, 3.0, rollout_is_weights=is_weights,
            loss_agg_mode=agg, **verl_agg,
        )
        kld = verl_kl_penalty(logp, batch["ref_logp"], verl_kl)
        return pg_loss + kl_coef * verl_agg_loss(kld, m.double(), agg, **verl_agg), clipfrac, clipfrac_lower

    ours = dict(
        eps_low=0.2, eps_high=0.28, dual_clip=3.0, ref_logp=batch["ref_logp"], kl_coef=kl_coef,
        kl_estimator=our_kl, kl_clamp=kl_clamp, rollout_logp=batch["rollout_logp"], tis_cap=2.0, agg=agg,
        **ours_agg,
    )
    # seq-mean-token-mean: verl divides by n + 1e-8, we by n: a relative 1e-8 / n difference.
    assert_same_loss_and_grad(batch, opts_loss, ours, verl_actor_loss, {}, rtol=1e-7, atol=1e-10)
    _, metrics = opts_loss(batch["logp"], batch["old_logp"], batch["advantages"], mask, **ours)
    _, clipfrac, clipfrac_lower = verl_actor_loss(batch["logp"], batch["old_logp"], None, mask)
    torch.testing.assert_close(metrics["clip_frac_low"] + metrics["clip_frac_high"], clipfrac)
    torch.testing.assert_close(metrics["dual_clip_frac"], clipfrac_lower)
    assert clipfrac_lower > 0


@pytest.mark.parametrize(
    "ours",
    [dict(agg="seq-mean-token-sum-norm", global_sequences=1), dict(agg="seq-mean-token-sum", global_sequences=T)],
)
def test_reproduces_verl_legacy_seq_mean_token_sum_norm(ours):
    """verl before PR #5417: sum(L*M) / loss_scale_factor, no sequence mean -> global_sequences=1."""
    batch = make_batch(22)
    adv_ST = batch["advantages"][:, None] * batch["mask"]

    def verl_loss(logp, old, _adv, m):
        return verl_vanilla(old, logp, adv_ST, m.double(), 0.2, 0.2, 3.0, loss_agg_mode="seq-mean-token-sum-norm",
                            loss_scale_factor=T, legacy_norm=True)[0]

    assert_same_loss_and_grad(batch, opts_loss, dict(ours, dual_clip=3.0), verl_loss, {})


@pytest.mark.parametrize("global_batch_size", [None, 9])
def test_reproduces_verl_gspo(global_batch_size):
    batch = make_batch(23, spread=0.6)
    adv_ST = batch["advantages"][:, None] * batch["mask"]

    def verl_loss(logp, old, _adv, m):
        return verl_gspo(old, logp, adv_ST, m.double(), 3e-4, 4e-4, global_batch_size=global_batch_size)

    ours = dict(ratio_level="sequence", agg="seq-mean-token-mean", eps_low=3e-4, eps_high=4e-4)
    if global_batch_size is not None:
        ours["global_sequences"] = global_batch_size
    assert_same_loss_and_grad(batch, opts_loss, ours, verl_loss, {}, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# TRL GRPOTrainer._compute_loss, written as TRL writes it (one process, no gradient accumulation).
# ---------------------------------------------------------------------------------------------


def trl_loss(per_token_logps, old_per_token_logps, advantages, completion_mask, *, loss_type, beta=0.0,
             ref_per_token_logps=None, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level="token",
             max_completion_length=None, num_items_in_batch=None, num_processes=1):
    completion_mask = completion_mask.double()
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        return (per_token_loss * completion_mask).sum() / (num_items_in_batch / num_processes)
    raise ValueError(loss_type)


TRL_LOSS_TYPES = {
    "grpo": dict(agg="seq-mean-token-mean", global_sequences=S),  # TRL's mean counts empty rows
    "bnpo": dict(agg="token-mean"),
    "dr_grpo": dict(agg="seq-mean-token-sum-norm", global_sequences=S, norm_length=1024),
    "dapo": dict(agg="token-mean", global_tokens=301),
}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", list(TRL_LOSS_TYPES))
def test_reproduces_trl(loss_type, beta, level):
    batch = make_batch(31, spread=0.5)
    trl_kwargs = dict(
        loss_type=loss_type, beta=beta, ref_per_token_logps=batch["ref_logp"],
        importance_sampling_level="token" if level == "token" else "sequence",
        max_completion_length=1024, num_items_in_batch=301,
    )
    ours = dict(
        TRL_LOSS_TYPES[loss_type], eps_low=0.2, eps_high=0.28, ratio_level=level,
        ref_logp=batch["ref_logp"], kl_coef=beta, kl_estimator="k3", kl_clamp=None,
    )
    assert_same_loss_and_grad(batch, opts_loss, ours, trl_loss, trl_kwargs)


def test_reproduces_trl_dapo_across_processes():
    """TRL dapo: each of P processes divides by num_items/P and DDP averages: our summed ranks."""
    batch = make_batch(32)
    num_items = int(batch["mask"].sum())
    halves = [slice(0, 3), slice(3, S)]
    trl_grad = torch.zeros(S, T, dtype=torch.float64)
    our_grad = torch.zeros(S, T, dtype=torch.float64)
    for rows in halves:
        part = {k: v[rows] for k, v in batch.items()}
        logp = batch["logp"]
        trl = trl_loss(logp[rows], part["old_logp"], part["advantages"], part["mask"], loss_type="dapo",
                       num_items_in_batch=num_items, num_processes=2)
        trl_grad += torch.autograd.grad(trl, logp)[0] / 2  # DDP: mean over processes
        ours, _ = opts_loss(logp[rows], part["old_logp"], part["advantages"], part["mask"],
                              eps_high=0.28, global_tokens=num_items)
        our_grad += torch.autograd.grad(ours, logp)[0]
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Invariants, micro-batching, masks, dtypes, metrics, errors.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_first_inner_step_ratio_is_one_and_kl_is_zero_exactly(level, estimator):
    batch = make_batch(41)
    logp = batch["logp"]
    mask = batch["mask"]
    loss, metrics = opts_loss(
        logp, logp.detach().clone(), batch["advantages"], mask, ratio_level=level, ref_logp=logp.detach().clone(),
        kl_coef=0.1, kl_estimator=estimator, kl_clamp=10.0, rollout_logp=logp.detach().clone(), tis_cap=1.5,
    )
    for key, value in [("ratio_mean", 1.0), ("ratio_max", 1.0), ("approx_kl", 0.0), ("kl_mean", 0.0),
                       ("clip_frac_low", 0.0), ("clip_frac_high", 0.0), ("dual_clip_frac", 0.0),
                       ("tis_weight_mean", 1.0)]:
        assert metrics[key].item() == value, key
    # At ratio 1 the clipped objective is the plain policy gradient -A * grad(logp) / N.
    (grad,) = torch.autograd.grad(loss, logp)
    kl_grad = {"k1": 0.1, "k1+": 0.0, "k2": 0.0, "k3": 0.0, "k3+": 0.0}[estimator]
    expected = (-batch["advantages"][:, None] + kl_grad) * mask / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


SPLITS = [slice(0, 2), slice(2, 3), slice(3, S)]  # uneven; the middle one is just the empty sequence


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_gradients_sum_to_the_full_batch_gradient(agg, level):
    batch, opts = build_case("everything", seed=51)
    opts.update(agg=agg, ratio_level=level)
    mask = batch["mask"]
    assert not mask[2].any()
    full_loss, full_grad = loss_and_grad(opts_loss, batch, **opts)
    denominators = {}
    for rows in SPLITS:
        for name, count in local_denominators(mask[rows], agg).items():
            denominators[name] = denominators.get(name, 0) + count
    micro_loss, micro_grad = 0.0, torch.zeros_like(full_grad)
    for rows in SPLITS:
        part = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
        loss, _ = opts_loss(batch["logp"][rows], batch["old_logp"][rows], batch["advantages"][rows],
                              mask[rows], **part, **denominators)
        micro_loss = micro_loss + loss.detach()
        micro_grad += torch.autograd.grad(loss, batch["logp"])[0]
    torch.testing.assert_close(micro_loss, full_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(micro_grad, full_grad, rtol=1e-12, atol=1e-14)


def test_local_denominators():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert local_denominators(mask, "token-mean") == {"global_tokens": 3}
    for agg in AGG_MODES[1:]:
        assert local_denominators(mask.bool(), agg) == {"global_sequences": 2}


@pytest.mark.parametrize("estimator", ["k3", "k3+"])
def test_clamped_k3_keeps_huge_reference_gaps_finite(estimator):
    """d = ref - logp = 100 overflows exp() in float32; clamping d to 20 first keeps grads finite."""
    batch = make_batch(63, dtype=torch.float32)
    batch["ref_logp"][0, 0] = batch["logp"][0, 0].detach() + 100.0
    loss, grad = loss_and_grad(opts_loss, batch, ref_logp=batch["ref_logp"], kl_coef=1.0,
                               kl_estimator=estimator, kl_clamp=10.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # k3: the value is clamped at 10, so that token gets no KL gradient; k3+ has k2's gradient -d.
    expected = 0.0 if estimator == "k3" else -100.0
    n = batch["mask"].sum()
    _, grad_no_kl = loss_and_grad(opts_loss, batch)
    torch.testing.assert_close(grad[0, 0] - grad_no_kl[0, 0], (expected / n).to(grad.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_empty_sequences_and_garbage_padding_get_zero_gradient(agg):
    batch, opts = build_case("everything", seed=61)
    mask = batch["mask"]
    clean_loss, clean_grad = loss_and_grad(opts_loss, batch, agg=agg, **opts)
    # Padding holds NaN / inf in every input: it must not reach the loss or the gradient.
    for key in ["old_logp", "advantages", "rollout_logp", "ref_logp"]:
        if batch[key].dim() == 2:
            batch[key] = batch[key].masked_fill(~mask, float("nan"))
    opts = {k: batch[k] if k in ("ref_logp", "rollout_logp") else v for k, v in opts.items()}
    with torch.no_grad():
        garbage = batch["logp"].masked_fill(~mask, float("inf"))
    logp = garbage.clone().requires_grad_()
    loss, metrics = opts_loss(logp, batch["old_logp"], batch["advantages"], mask, agg=agg, **opts)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss, clean_loss)
    torch.testing.assert_close(grad, clean_grad)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_all_masked_batch_gives_zero_loss_and_gradient(agg, level):
    batch, opts = build_case("everything", seed=62)
    mask = torch.zeros(S, T, dtype=torch.bool)
    loss, metrics = opts_loss(batch["logp"], batch["old_logp"], batch["advantages"], mask, agg=agg,
                                ratio_level=level, **opts)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v) for v in metrics.values()) and metrics["tokens"] == 0


def test_bf16_inputs_are_upcast_to_float32():
    batch, opts = build_case("everything", seed=71)
    low = {k: v.detach().to(torch.bfloat16) for k, v in batch.items() if v.is_floating_point()}
    logp = low["logp"].requires_grad_()
    opts = dict(opts, ref_logp=low["ref_logp"], rollout_logp=low["rollout_logp"])
    loss, metrics = opts_loss(logp, low["old_logp"], low["advantages"], batch["mask"], **opts)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.dtype == torch.bfloat16
    # Same computation on the exactly upcast values: bit-identical loss.
    up = {k: v.float() for k, v in low.items()}
    logp32 = up["logp"].requires_grad_()
    opts32 = dict(opts, ref_logp=up["ref_logp"], rollout_logp=up["rollout_logp"])
    loss32, _ = opts_loss(logp32, up["old_logp"], up["advantages"], batch["mask"], **opts32)
    assert torch.equal(loss, loss32)
    torch.testing.assert_close(grad.float(), torch.autograd.grad(loss32, logp32)[0], rtol=1e-2, atol=1e-4)
    float32_loss, _ = opts_loss(*(x.float() for x in (batch["logp"], batch["old_logp"], batch["advantages"])),
                                  batch["mask"])
    assert float32_loss.dtype == torch.float32


def test_metrics_match_their_definitions():
    batch, opts = build_case("everything", seed=81)
    logp, old, adv, mask = batch["logp"].detach(), batch["old_logp"], batch["advantages"], batch["mask"]
    _, metrics = opts_loss(batch["logp"], old, adv, mask, **opts)
    n = mask.sum().double()
    ratio = torch.exp(logp - old)
    low = (ratio < 1 - opts["eps_low"]) & (adv < 0)
    high = (ratio > 1 + opts["eps_high"]) & (adv > 0)
    dual = (adv < 0) & (ratio > opts["dual_clip"])
    d = old - logp
    kl_d = opts["ref_logp"] - logp
    expected = {
        "clip_frac_low": low[mask].sum() / n,
        "clip_frac_high": high[mask].sum() / n,
        "dual_clip_frac": dual[mask].sum() / n,
        "ratio_mean": ratio[mask].mean(),
        "ratio_max": ratio[mask].max(),
        "approx_kl": (torch.exp(d) - d - 1)[mask].mean(),
        "kl_mean": torch.clamp(torch.exp(kl_d.clamp(-20, 20)) - kl_d.clamp(-20, 20) - 1, max=10)[mask].mean(),
        "tis_weight_mean": torch.exp(old - opts["rollout_logp"]).clamp(max=opts["tis_cap"])[mask].mean(),
        "tokens": n,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key], value.double(), rtol=1e-12, atol=1e-14, msg=key)
        assert not metrics[key].requires_grad and metrics[key].dim() == 0
    assert expected["dual_clip_frac"] > 0 and expected["clip_frac_low"] > 0 and expected["clip_frac_high"] > 0
    _, plain = opts_loss(batch["logp"], old, adv, mask)
    assert "kl_mean" not in plain and "tis_weight_mean" not in plain


# Refused by policy_loss at the call: the tensors, the optional tensors a valid spec needs, and
# the denominators (the options themselves are refused by LossSpec: BAD_SPECS below).
BAD = [
    (dict(old_logp=torch.zeros(S, T + 1)), "old_logp has shape"),
    (dict(mask=torch.ones(S + 1, T)), "mask has shape"),
    (dict(advantages=torch.zeros(S + 1)), "advantages has shape"),
    (dict(advantages=torch.zeros(S, 1)), "advantages has shape"),
    (dict(ref_logp=torch.zeros(S, 2)), "ref_logp has shape"),
    (dict(rollout_logp=torch.zeros(2, T)), "rollout_logp has shape"),
    (dict(logp=torch.zeros(S)), "logp must be a 2-D floating tensor"),
    (dict(old_logp=torch.zeros(S, T, dtype=torch.long)), "old_logp must be a floating tensor"),
    (dict(tis_cap=2.0), "tis_cap needs rollout_logp"),
    (dict(kl_coef=0.1), "kl_coef=0.1 needs ref_logp"),
    (dict(global_tokens=0), "global_tokens must be > 0"),
    (dict(global_tokens=float("nan")), "global_tokens"),
    (dict(global_sequences=4), "global_sequences is only used by agg in"),
    (dict(agg="seq-mean-token-sum", global_tokens=4), "global_tokens is only used by agg in"),
    (dict(agg="seq-mean-token-mean", global_sequences=-2), "global_sequences must be > 0"),
]


@pytest.mark.parametrize("overrides, match", BAD)
def test_bad_inputs_raise_value_error_naming_the_argument(overrides, match):
    args = dict(logp=torch.zeros(S, T), old_logp=torch.zeros(S, T), advantages=torch.zeros(S),
                mask=torch.ones(S, T)) | overrides
    spec, rest = split_options(args)  # a valid spec: the call refuses
    with pytest.raises(ValueError, match=match):
        policy_loss(rest.pop("logp"), rest.pop("old_logp"), rest.pop("advantages"), rest.pop("mask"), spec, **rest)


# (options, the field LossSpecError names, message): refused at LossSpec(...), before any call.
BAD_SPECS = [
    (dict(agg="mean"), "agg", r"agg must be one of \('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum', "
                              r"'seq-mean-token-sum-norm'\), got 'mean'"),
    (dict(kl_estimator="low_var_kl"), "kl_estimator", r"kl_estimator must be one of \('k1', 'k2', 'k3', 'k1\+', 'k3\+'\)"),
    (dict(ratio_level="seq"), "ratio_level", r"ratio_level must be one of \('token', 'sequence'\)"),
    (dict(eps_low=-0.1), "eps_low", r"eps_low must be >= 0, got -0\.1"),
    (dict(eps_low=-1), "eps_low", r"^eps_low must be >= 0, got -1\.0$"),
    (dict(eps_high=-0.1), "eps_high", "eps_high"),
    (dict(eps_high="wide"), "eps_high", "eps_high must be a real number"),
    (dict(dual_clip=1.0), "dual_clip", r"dual_clip must be > 1 \(or None\), got 1\.0"),
    (dict(tis_cap=0.0), "tis_cap", "tis_cap must be > 0"),
    (dict(kl_clamp=-1.0), "kl_clamp", "kl_clamp must be > 0"),
    (dict(agg="seq-mean-token-sum", norm_length=4), "norm_length", "norm_length is only used by agg in"),
    (dict(norm_length=512), "norm_length", r"^norm_length is only used by agg in \('seq-mean-token-sum-norm',\), "
                                          r"not by agg='token-mean'$"),
    (dict(agg="seq-mean-token-sum-norm", norm_length=0), "norm_length", "norm_length must be > 0"),
]


@pytest.mark.parametrize("options, field, match", BAD_SPECS)
def test_bad_options_are_refused_by_loss_spec(options, field, match):
    with pytest.raises(LossSpecError, match=match) as err:
        LossSpec(**options)
    assert err.value.field == field and isinstance(err.value, ValueError)
    # The old way of passing them (with the tensors) is refused identically: the spec is built first.
    args = (torch.zeros(S, T), torch.zeros(S, T), torch.zeros(S), torch.ones(S, T))
    with pytest.raises(LossSpecError, match=match):
        opts_loss(*args, rollout_logp=torch.zeros(S, T), **options)


def test_clip_ratio_above_one_means_no_lower_clip():
    # R1-Zero's clip ratio 10: 1 - eps < 0 < ratio, so only ratios above 1 + eps would be clipped.
    gen = torch.Generator().manual_seed(7)
    logp = (torch.randn(5, 9, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    old, adv = torch.randn(5, 9, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 9, generator=gen) > 0.3
    loss, metrics = opts_loss(logp, old, adv, mask, eps_low=10.0, eps_high=1e9)
    ratio = torch.exp(logp - old)
    expected = (-adv[:, None] * ratio * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert metrics["clip_frac_low"] == 0


# ---------------------------------------------------------------------------------------------
# LossSpec itself: one typed value, validated once at construction.
# ---------------------------------------------------------------------------------------------

# One refused value per field (every field of LossSpec), with the other fields at their defaults
# unless given.
BAD_FIELD_VALUES = {
    "ratio_level": dict(ratio_level="gspo"),
    "eps_low": dict(eps_low=-0.5),
    "eps_high": dict(eps_high=float("nan")),
    "dual_clip": dict(dual_clip=0.5),
    "kl_coef": dict(kl_coef=float("inf")),
    "kl_estimator": dict(kl_estimator="k4"),
    "kl_clamp": dict(kl_clamp=0),
    "tis_cap": dict(tis_cap=-2.0),
    "agg": dict(agg="sum"),
    "norm_length": dict(agg="seq-mean-token-sum-norm", norm_length=-1),
}


def test_bad_field_values_cover_every_field():
    assert set(BAD_FIELD_VALUES) == set(SPEC_FIELDS) == {f.name for f in dataclasses.fields(LossSpec)}


@pytest.mark.parametrize("field", list(BAD_FIELD_VALUES))
def test_every_field_is_refused_with_a_one_line_message_naming_it(field):
    with pytest.raises(LossSpecError) as err:
        LossSpec(**BAD_FIELD_VALUES[field])
    message = str(err.value)
    assert err.value.field == field
    assert message.startswith(field) and "\n" not in message, message
    for flag in (True, False):  # a bool is no number, for any numeric field
        if field in ("eps_low", "eps_high", "dual_clip", "kl_coef", "kl_clamp", "tis_cap"):
            with pytest.raises(LossSpecError, match=field) as err:
                LossSpec(**{field: flag})
            assert err.value.field == field


def test_numbers_are_made_floats():
    spec = LossSpec(eps_low=1, eps_high=torch.tensor(0.28), dual_clip=3, kl_coef=0, kl_clamp=10, tis_cap=2,
                    agg="seq-mean-token-sum-norm", norm_length=512)
    values = {name: getattr(spec, name) for name in SPEC_FIELDS if name not in ("ratio_level", "kl_estimator", "agg")}
    assert all(type(v) is float for v in values.values()), values
    assert values == dict(eps_low=1.0, eps_high=pytest.approx(0.28), dual_clip=3.0, kl_coef=0.0, kl_clamp=10.0,
                          tis_cap=2.0, norm_length=512.0)
    assert all(type(v) is float for v in LossSpec().token_terms().values() if not isinstance(v, (str, type(None))))
    assert LossSpec(dual_clip=None, kl_clamp=None, tis_cap=None).dual_clip is None
    assert LossSpec(eps_low=1) == LossSpec(eps_low=1.0)  # equal values, so equal (and equally hashed) specs
    assert hash(LossSpec(eps_low=1)) == hash(LossSpec(eps_low=1.0))


def test_is_frozen_and_replace_validates():
    spec = LossSpec(eps_high=0.28)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.eps_high = 0.3
    wider = spec.replace(eps_high=1, agg="seq-mean-token-sum-norm", norm_length=64)
    assert wider.eps_high == 1.0 and type(wider.eps_high) is float and wider.norm_length == 64.0
    assert spec.eps_high == 0.28 and spec.agg == "token-mean"  # the original is unchanged
    with pytest.raises(LossSpecError, match="eps_low must be >= 0") as err:
        spec.replace(eps_low=-1)
    assert err.value.field == "eps_low"
    with pytest.raises(LossSpecError, match="norm_length is only used by agg in") as err:
        wider.replace(agg="token-mean")
    assert err.value.field == "norm_length"
    with pytest.raises(TypeError):
        spec.replace(global_tokens=4)  # a denominator is the call's, never the spec's


def test_token_terms_are_the_kernel_epilogue_keywords():
    from r1mega_kernels.grpo_loss import grpo_forward, grpo_token_terms

    not_options = {"temperature", "log_ratio_bound", "rows_per_program", "block_v", "block", "seq_log_ratio",
                   "ref_logp", "rollout_logp"}
    for kernel in (grpo_forward, grpo_token_terms):
        keywords = {name: p.default for name, p in inspect.signature(kernel).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in not_options}
        assert LossSpec().token_terms() == keywords, kernel.__name__  # same names, same defaults
    spec = LossSpec(ratio_level="sequence", eps_low=0.1, eps_high=0.3, dual_clip=2, kl_coef=0.1, kl_estimator="k1+",
                    kl_clamp=5, tis_cap=1.5, agg="seq-mean-token-sum-norm", norm_length=8)
    assert spec.token_terms() == dict(eps_low=0.1, eps_high=0.3, dual_clip=2.0, kl_estimator="k1+", kl_coef=0.1,
                                      kl_clamp=5.0, tis_cap=1.5)


def test_every_implementation_takes_the_same_loss_spec():
    """One value, after the positional tensors, defaulting to LossSpec(); no loss option is a keyword."""
    from r1mega.models.policy import Policy
    from r1mega.ops import grpo_loss, linear_grpo_loss, reference_grpo_loss, vocab_parallel_grpo_loss

    for fn, position in [(policy_loss, 4), (grpo_loss, 5), (reference_grpo_loss, 5), (linear_grpo_loss, 6),
                         (vocab_parallel_grpo_loss, 5), (Policy.train_step, 2)]:
        params = inspect.signature(fn).parameters
        name = fn.__qualname__
        assert list(params)[position] == "spec", name
        assert params["spec"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        if fn is not Policy.train_step:
            assert params["spec"].default == LossSpec(), name
        assert not set(params) & set(SPEC_FIELDS), name


def test_importing_loss_spec_does_not_import_torch():
    code = ("import sys; import r1mega.algo.loss_spec as m; m.LossSpec(eps_high=0.28); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_grpo_config_loss_spec_maps_the_config():
    from r1mega.config import GRPOConfig

    grpo = GRPOConfig(eps_low=0.1, eps_high=0.28, dual_clip=3.0, ratio_level="sequence", kl_coef=0.05,
                      kl_estimator="k3+", kl_clamp=10.0, tis=True, tis_cap=1.5, agg="seq-mean-token-mean")
    expected = LossSpec(ratio_level="sequence", eps_low=0.1, eps_high=0.28, dual_clip=3.0, kl_coef=0.05,
                        kl_estimator="k3+", kl_clamp=10.0, tis_cap=1.5, agg="seq-mean-token-mean")
    assert grpo.loss_spec(max_new_tokens=256, has_reference=True) == expected
    # No reference policy: no KL term.
    assert grpo.loss_spec(max_new_tokens=256, has_reference=False) == expected.replace(kl_coef=0.0)
    # grpo.tis false: no TIS cap (and none may be set).
    no_tis = GRPOConfig(tis=False, tis_cap=None)
    assert no_tis.loss_spec(max_new_tokens=256, has_reference=True).tis_cap is None
    assert GRPOConfig().loss_spec(max_new_tokens=256, has_reference=True).tis_cap == 2.0
    # Dr. GRPO: norm_length defaults to the completion budget; a set one is kept.
    dr = GRPOConfig(agg="seq-mean-token-sum-norm", adv_scale="none")
    spec = dr.loss_spec(max_new_tokens=256, has_reference=True)
    assert spec.agg == "seq-mean-token-sum-norm" and spec.norm_length == 256.0
    fixed = GRPOConfig(agg="seq-mean-token-sum-norm", norm_length=1024)
    assert fixed.loss_spec(max_new_tokens=256, has_reference=True).norm_length == 1024.0
    # Another aggregation has no norm_length.
    assert GRPOConfig().loss_spec(max_new_tokens=256, has_reference=True).norm_length is None
