"""Pure-tensor GRPO math: advantages, the clipped policy loss with KL and TIS, log-probs.

Everything here is a function of tensors and scalars: no config objects, no torch.distributed
communication. Denominators that span micro-batches or ranks are arguments. The loss options are
one value, :class:`LossSpec` (torch-free, so the config can build and check it without torch).

The names below load their module on first use (PEP 562), so ``r1mega.algo.loss_spec`` can be
imported without importing torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "ADV_SCALES": "advantages", "grpo_advantages": "advantages",
    "entropy_from_logits": "logprob", "token_logprobs": "logprob",
    "AGG_MODES": "loss_spec", "KL_ESTIMATORS": "loss_spec", "RATIO_LEVELS": "loss_spec", "LossSpec": "loss_spec",
    "LossSpecError": "loss_spec",
    "local_denominators": "clipped_loss", "policy_loss": "clipped_loss",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'r1mega.algo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"r1mega.algo.{_HOMES[name]}"), name)


__all__ = sorted(_HOMES)
