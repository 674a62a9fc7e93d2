"""Worker: data-parallel policy_loss with global denominators equals the single-process full batch.

Every rank builds the same seeded float64 batch and takes an uneven slice of its sequences. For
every aggregation (and both ratio levels) the ranks all_reduce their local denominators, compute
their loss, and backpropagate; the gradient pieces, scattered into full-size tensors, and the
losses are SUM-reduced. Every rank then checks them against the full batch computed in one
process: the gradient of the full batch must be the sum of the ranks' gradients.
"""

import torch
import torch.distributed as dist

from r1mega.algo import AGG_MODES, LossSpec, local_denominators, policy_loss

S, T = 11, 9
# Uneven slices of the S sequences, per world size; sequence 3 is empty (it lands on rank 0 or 1).
CUTS = {2: [0, 4, S], 3: [0, 2, 7, S]}

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
rows = slice(CUTS[world][rank], CUTS[world][rank + 1])

gen = torch.Generator().manual_seed(1234)
logp_full = -3 * torch.rand(S, T, generator=gen, dtype=torch.float64)
old = logp_full + 0.6 * torch.randn(S, T, generator=gen, dtype=torch.float64)
ref = logp_full + 0.5 * torch.randn(S, T, generator=gen, dtype=torch.float64)
rollout = old + 0.3 * torch.randn(S, T, generator=gen, dtype=torch.float64)
adv = torch.randn(S, generator=gen, dtype=torch.float64)
lengths = torch.randint(1, T + 1, (S,), generator=gen)
lengths[3] = 0
mask = torch.arange(T)[None, :] < lengths[:, None]
options = LossSpec(eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", kl_clamp=10.0, tis_cap=2.0)

for ratio_level in ("token", "sequence"):
    for agg in AGG_MODES:
        spec = options.replace(ratio_level=ratio_level, agg=agg)
        # The trainer's job, not algo's: turn local counts into mini-batch denominators.
        denominators = local_denominators(mask[rows], agg)
        for count in denominators.values():
            dist.all_reduce(count)

        logp = logp_full.clone().requires_grad_()
        loss, _ = policy_loss(
            logp[rows], old[rows], adv[rows], mask[rows], spec, ref_logp=ref[rows], rollout_logp=rollout[rows],
            **denominators,
        )
        (grad,) = torch.autograd.grad(loss, logp)  # zero outside this rank's rows
        summed_loss = loss.detach().clone()
        dist.all_reduce(grad)
        dist.all_reduce(summed_loss)

        full = logp_full.clone().requires_grad_()
        full_loss, _ = policy_loss(full, old, adv, mask, spec, ref_logp=ref, rollout_logp=rollout)
        (full_grad,) = torch.autograd.grad(full_loss, full)
        torch.testing.assert_close(summed_loss, full_loss.detach(), rtol=1e-12, atol=1e-14, msg=f"{agg} loss")
        torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-14, msg=f"{agg} {ratio_level} grad")
        assert grad.abs().sum() > 0

if rank == 0:
    print(f"algo dp grad ok on {world} ranks")
dist.destroy_process_group()
