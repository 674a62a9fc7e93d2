"""r1mega's one boundary with megatron-core 0.16.1: every workaround for its bugs and gaps.

Modules (each names the megatron code it patches and the failure it fixes):

* :mod:`~r1mega.megatron_compat.version` — the version the workarounds were written for
  (``MEGATRON_VERSION``) and the guard (``R1MEGA_ALLOW_MEGATRON_VERSION=1`` to try another);
* :mod:`~r1mega.megatron_compat.te_probe` — megatron's own Transformer Engine probe;
* :mod:`~r1mega.megatron_compat.local_spec` — process-wide patches for megatron without
  Transformer Engine (GPU users too);
* :mod:`~r1mega.megatron_compat.cpu_shim` — process-wide patches for megatron without CUDA (gloo);
* :mod:`~r1mega.megatron_compat.prepare` — :func:`prepare_megatron`, which applies what this
  machine needs;
* :mod:`~r1mega.megatron_compat.router` and :mod:`~r1mega.megatron_compat.mla` — fixes applied to
  one built model (MoE expert bias under padding; MLA's rope-key gradient with tp > 1);
* :mod:`~r1mega.megatron_compat.masks` — the dense mask of a THD batch (patch 12's attention);
* :mod:`~r1mega.megatron_compat.applied` — which process-wide groups ran.

Nothing here imports other r1mega packages, megatron (until a function runs) or
transformer_engine.
"""

from r1mega.megatron_compat.applied import applied_patches
from r1mega.megatron_compat.cpu_shim import apply_cpu_shim
from r1mega.megatron_compat.local_spec import apply_local_spec_workarounds
from r1mega.megatron_compat.masks import thd_causal_mask
from r1mega.megatron_compat.mla import fix_mla_rope_key_grad
from r1mega.megatron_compat.prepare import prepare_megatron
from r1mega.megatron_compat.router import fix_expert_bias_padding
from r1mega.megatron_compat.te_probe import megatron_has_te
from r1mega.megatron_compat.version import (
    ALLOW_ENV,
    MEGATRON_VERSION,
    ShimVersionError,
    check_megatron_version,
    installed_megatron_version,
    megatron_version_matches,
)

__all__ = ["ALLOW_ENV", "MEGATRON_VERSION", "ShimVersionError", "applied_patches", "apply_cpu_shim",
           "apply_local_spec_workarounds", "check_megatron_version", "fix_expert_bias_padding",
           "fix_mla_rope_key_grad", "installed_megatron_version", "megatron_has_te",
           "megatron_version_matches", "prepare_megatron", "thd_causal_mask"]
