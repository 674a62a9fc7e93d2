"""Group-relative (GRPO) advantages from outcome rewards.

Shape legend: S sequences (completions) in the batch, G distinct groups (prompts).
"""

from __future__ import annotations

import torch

from r1mega.algo.checks import check_choice, check_floating, check_integer, check_shape, positive

ADV_SCALES = ("group", "batch", "none")


def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    Args:
        rewards: [S] floating tensor, one scalar reward per completion. NaN marks a completion
            that could not be scored: it is left out of its group's statistics (and of the batch
            std) and gets advantage 0, so it contributes no policy gradient.
        group_ids: [S] integer tensor naming each completion's group (prompt). Any integer values,
            in any order; the completions of a group need not be contiguous.
        scale: how the centred reward r - mean_group is scaled:
            "group": divided by (std_group + eps), the DeepSeek-R1 / GRPO paper form (verl
                default, TRL scale_rewards="group").
            "batch": divided by (std of all scored rewards of the batch + eps), the group mean
                still being subtracted (TRL scale_rewards="batch").
            "none": not scaled (Dr. GRPO; verl norm_adv_by_std_in_grpo=False, TRL
                scale_rewards="none").
            Every std is the unbiased (Bessel-corrected) one, as in verl and TRL.
        eps: positive constant added to the std. verl uses 1e-6 (the default), TRL 1e-4.
            Unused by scale="none".

    Returns:
        [S] advantages in the dtype of ``rewards``; the statistics are computed in float64. A
        group whose scored rewards are all equal, including a group with a single scored
        completion, gives its completions advantage exactly 0: there is nothing to learn from
        it. (verl instead uses mean 0, std 1 for a one-completion group, i.e. A = r / (1 + eps);
        GRPO batches always have groups of several completions.)
    """
    check_floating("rewards", rewards, ndim=1)
    check_integer("group_ids", group_ids)
    check_shape("group_ids", group_ids, rewards.shape, like="rewards")
    check_choice("scale", scale, ADV_SCALES)
    positive("eps", eps)

    r_S = rewards.detach().double()
    scored_S = ~torch.isnan(r_S)
    r_S = torch.where(scored_S, r_S, 0.0)
    _, group_S = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_S.max()) + 1 if group_S.numel() else 0

    def group_sum(x_S: torch.Tensor) -> torch.Tensor:
        return x_S.new_zeros(num_groups).index_add_(0, group_S, x_S)

    count_G = group_sum(scored_S.double())
    mean_G = group_sum(r_S) / count_G.clamp(min=1)
    # Two-pass variance (centre, then square) keeps precision when rewards are large.
    centred_S = torch.where(scored_S, r_S - mean_G[group_S], 0.0)
    if scale == "group":
        var_G = group_sum(centred_S.square()) / (count_G - 1).clamp(min=1)
        adv_S = centred_S / (var_G.sqrt()[group_S] + eps)
    elif scale == "batch":
        scored_r = r_S[scored_S]
        batch_std = scored_r.std() if scored_r.numel() > 1 else r_S.new_zeros(())
        adv_S = centred_S / (batch_std + eps)
    else:
        adv_S = centred_S
    # Groups whose scored rewards are all equal get exactly 0, not the rounding noise of
    # r - mean (e.g. 0.2 - (0.2 + 0.2 + 0.2) / 3 != 0), so they give exactly no gradient.
    low_G = r_S.new_full((num_groups,), torch.inf).scatter_reduce_(
        0, group_S, torch.where(scored_S, r_S, torch.inf), "amin"
    )
    high_G = r_S.new_full((num_groups,), -torch.inf).scatter_reduce_(
        0, group_S, torch.where(scored_S, r_S, -torch.inf), "amax"
    )
    informative_S = scored_S & (low_G < high_G)[group_S]
    return torch.where(informative_S, adv_S, 0.0).to(rewards.dtype)
