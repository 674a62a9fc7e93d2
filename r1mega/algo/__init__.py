"""Pure-tensor GRPO math: advantages, the clipped policy loss with KL and TIS, log-probs.

Everything here is a function of tensors and scalars: no config objects, no torch.distributed
communication. Denominators that span micro-batches or ranks are arguments.
"""

from r1mega.algo.advantages import ADV_SCALES, grpo_advantages
from r1mega.algo.logprob import entropy_from_logits, token_logprobs
from r1mega.algo.policy_loss import (
    AGG_MODES,
    KL_ESTIMATORS,
    RATIO_LEVELS,
    local_denominators,
    policy_loss,
)

__all__ = [
    "ADV_SCALES",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "RATIO_LEVELS",
    "entropy_from_logits",
    "grpo_advantages",
    "local_denominators",
    "policy_loss",
    "token_logprobs",
]
