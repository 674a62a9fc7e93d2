"""Hugging Face checkpoint names -> the tensors of a transformers model that hold them.

The weight stream (and a checkpoint on disk) names every tensor as the checkpoint does; the
transformers model class may keep some of them fused: since transformers 5 the routed experts of
Qwen3-MoE and DeepSeek-V3 are 3-D parameters ``mlp.experts.gate_up_proj [E, 2F, H]`` (gate rows
first) and ``mlp.experts.down_proj [E, H, F]``, while the checkpoint has
``mlp.experts.E.{gate,up,down}_proj.weight``. :func:`weight_views` maps each checkpoint name to a
view of the model tensor it lives in, so a load is one ``copy_`` per tensor and reading the views
back reconstructs the checkpoint tensors exactly.
"""

from __future__ import annotations

import re

import torch

_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def weight_views(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """name -> a view of the parameter or buffer of `model` holding checkpoint tensor `name`.

    Raises KeyError naming a checkpoint tensor the model has no place for.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    views: dict[str, torch.Tensor] = {}
    for name in names:
        if name in tensors:
            views[name] = tensors[name].data
            continue
        m = _EXPERT.match(name)
        if m is not None:
            e, proj = int(m["e"]), m["proj"]
            if proj == "down":
                fused = tensors.get(m["prefix"] + ".down_proj")
                if fused is not None:
                    views[name] = fused.data[e]
                    continue
            else:
                fused = tensors.get(m["prefix"] + ".gate_up_proj")
                if fused is not None:
                    half = fused.shape[1] // 2
                    views[name] = fused.data[e, :half] if proj == "gate" else fused.data[e, half:]
                    continue
        raise KeyError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
    return views
