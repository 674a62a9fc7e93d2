"""LossSpec: the GRPO policy loss's options, one typed value, validated once at construction.

Every implementation of the loss takes it as it is (:func:`r1mega.algo.policy_loss`, the three
fused ops of :mod:`r1mega.ops`, ``Policy.train_step``), so they accept and refuse exactly the same
options with the same messages, and none of them re-validates. The tensors (log-probs, advantages,
masks) and the global denominators of a mini-batch are the call's arguments, never part of it.

A new loss variant is one more value of a field here (with its math in ``policy_loss`` and its
kernel epilogue in ``r1mega_kernels``), not a keyword added to eight signatures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from r1mega.algo.checks import check_choice, positive, real

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "k1+", "k3+")
RATIO_LEVELS = ("token", "sequence")


class LossSpecError(ValueError):
    """An invalid loss option; ``field`` names it and the message says why, in one line."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class LossSpec:
    """What the clipped policy loss computes; see :func:`r1mega.algo.policy_loss` for the formulas.

    Attributes:
        ratio_level: the variant: "token" (PPO/GRPO ratio per token) or "sequence" (GSPO).
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high], both >= 0 (eps_low >= 1: no
            lower clip, R1-Zero's 10).
        dual_clip: None, or c > 1 for dual-clip PPO on negative advantages.
        kl_coef: beta of the KL penalty to the reference; nonzero needs ref_logp at the call.
        kl_estimator: one of KL_ESTIMATORS ("+": the estimator's value with k2's gradient).
        kl_clamp: None, or c > 0 clamping the KL value to [-c, c].
        tis_cap: None (TIS uncapped when rollout_logp is given) or C > 0; needs rollout_logp.
        agg: one of AGG_MODES, how per-token losses become the mini-batch loss.
        norm_length: the constant length of "seq-mean-token-sum-norm" (Dr. GRPO); None: the
            micro-batch's T. Only that aggregation takes it.
    """

    ratio_level: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: Optional[float] = None
    tis_cap: Optional[float] = None
    agg: str = "token-mean"
    norm_length: Optional[float] = None

    def __post_init__(self) -> None:
        for name in (f.name for f in dataclasses.fields(self)):
            try:
                object.__setattr__(self, name, self._checked(name, getattr(self, name)))
            except ValueError as err:
                raise LossSpecError(name, str(err)) from None
        if self.norm_length is not None and self.agg != "seq-mean-token-sum-norm":
            raise LossSpecError("norm_length", f"norm_length is only used by agg in ('seq-mean-token-sum-norm',), "
                                f"not by agg={self.agg!r}")

    @staticmethod
    def _checked(name: str, value):
        if name in _CHOICES:
            check_choice(name, value, _CHOICES[name])
            return value
        if value is None and name in ("dual_clip", "kl_clamp", "tis_cap", "norm_length"):
            return None
        if name in ("kl_clamp", "tis_cap", "norm_length"):
            return positive(name, value)
        value = real(name, value)
        # eps_low >= 1 is allowed: ratios are positive, so it means "no lower clip" (R1-Zero's eps 10).
        if name in ("eps_low", "eps_high") and value < 0.0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        if name == "dual_clip" and value <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {value!r}")
        return value

    def replace(self, **changes) -> "LossSpec":
        """A copy with `changes` (validated like any other)."""
        return dataclasses.replace(self, **changes)

    def token_terms(self) -> dict:
        """The options of the per-token loss L_t (everything but the variant and the aggregation):
        the scalar keywords of the Triton kernels' epilogue (r1mega_kernels.grpo_loss)."""
        return dict(eps_low=self.eps_low, eps_high=self.eps_high, dual_clip=self.dual_clip,
                    kl_estimator=self.kl_estimator, kl_coef=self.kl_coef, kl_clamp=self.kl_clamp,
                    tis_cap=self.tis_cap)

    def check_inputs(self, *, has_ref: bool, has_rollout: bool) -> None:
        """ValueError unless the call's optional tensors are those this spec needs."""
        if self.kl_coef != 0.0 and not has_ref:
            raise ValueError(f"kl_coef={self.kl_coef!r} needs ref_logp")
        if self.tis_cap is not None and not has_rollout:
            raise ValueError("tis_cap needs rollout_logp")

    def denominators(self, global_tokens=None, global_sequences=None) -> dict[str, float]:
        """The aggregation's denominators given at a call, checked (> 0, used by this ``agg``) and
        made floats, with ``norm_length``: the keywords of :func:`r1mega.algo.clipped_loss.aggregate`."""
        out: dict[str, float] = {}
        for name, value, users in (("global_tokens", global_tokens, ("token-mean",)),
                                   ("global_sequences", global_sequences, AGG_MODES[1:])):
            if value is not None:
                if self.agg not in users:
                    raise ValueError(f"{name} is only used by agg in {users}, not by agg={self.agg!r}")
                out[name] = positive(name, value)
        if self.norm_length is not None:
            out["norm_length"] = self.norm_length
        return out


_CHOICES = {"ratio_level": RATIO_LEVELS, "kl_estimator": KL_ESTIMATORS, "agg": AGG_MODES}

__all__ = ["AGG_MODES", "KL_ESTIMATORS", "LossSpec", "LossSpecError", "RATIO_LEVELS"]
