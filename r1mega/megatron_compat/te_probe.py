"""Whether megatron-core found Transformer Engine: megatron's own probe, read without importing TE.

``megatron.core.extensions.transformer_engine`` imports transformer_engine when it is installed and
sets ``HAVE_TE``; r1mega never imports transformer_engine itself. The local-spec workarounds
(:mod:`r1mega.megatron_compat.local_spec`) apply exactly when this says TE is absent, and
``r1mega.models.transformer_config.transformer_engine_available`` adds the CUDA check.
"""

from __future__ import annotations


def megatron_has_te() -> bool:
    """megatron's own verdict on Transformer Engine (its extension module imports TE when present)."""
    from megatron.core.extensions import transformer_engine as te_ext

    return bool(getattr(te_ext, "HAVE_TE", False))
