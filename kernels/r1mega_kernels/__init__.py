"""Triton kernels for the GRPO loss. Imports only torch and triton.

    r1mega_kernels.logprob     token log-probs and entropies from logits: online log-sum-exp
                               forward, one-pass backward (optionally in place into the logits)
    r1mega_kernels.grpo_loss   the fused per-token GRPO/PPO terms (ratio, clips, KL, TIS, dL/dlogp)
    r1mega_kernels.vocab_parallel
                               per-token partials (max, sum-exp, entropy term, target logit) of a
                               vocabulary shard, combined across tensor-parallel ranks by r1mega.ops

Each module has private ``_..._kernel`` functions and launchers that check shapes, dtypes,
devices and contiguity, naming the offending argument. Grids are one-dimensional over tokens
with a constexpr number of tokens per program. The submodules are not imported here: Triton
reads TRITON_INTERPRET when a kernel module is imported (see r1mega.utils.triton_env).
The autograd and torch.compile wrappers live in r1mega.ops.
"""
