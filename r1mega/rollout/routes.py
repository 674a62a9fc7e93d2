"""Router replay (R3), the engine side: record which experts every token was routed to.

MoE log-probs are discontinuous in the router: a token whose top-k choice differs between the
rollout engine and the trainer gets a different expert mix, and the importance ratio of that token
is noise. Recording the engine's choices and replaying them in the trainer's forward
(:meth:`r1mega.models.Policy.logprobs` with ``routes=``) removes that source of mismatch.

:class:`RouteRecorder` hooks the router of every MoE layer of a transformers Qwen3-MoE or
DeepSeek-V3 model (transformers >= 5: the router is a module returning ``(logits, weights,
indices)``) and keeps the last forward's top-k indices per layer.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate$")


def moe_gates(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """HF layer index -> the router module of every MoE layer of `model`."""
    gates = {}
    for name, module in model.named_modules():
        m = _GATE.match(name)
        if m is not None and hasattr(module, "top_k") and not isinstance(module, torch.nn.Linear):
            gates[int(m.group(1))] = module
    return dict(sorted(gates.items()))


class RouteRecorder:
    """Forward hooks that keep, per MoE layer, the [tokens, top_k] expert indices of the last forward."""

    def __init__(self, model: torch.nn.Module):
        self.gates = moe_gates(model)
        if not self.gates:
            raise ValueError(f"router replay: {type(model).__name__} has no MoE router modules this recorder knows "
                             "(Qwen3-MoE and DeepSeek-V3 on transformers >= 5)")
        self.layers = tuple(self.gates)
        self.top_k = int(next(iter(self.gates.values())).top_k)
        self.last: dict[int, torch.Tensor] = {}
        self.enabled = False
        self._handles = [gate.register_forward_hook(self._hook(layer)) for layer, gate in self.gates.items()]

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self.enabled:
                self.last[layer] = output[2].detach()
        return hook

    def take(self, rows: int, positions: int) -> Optional[torch.Tensor]:
        """The last forward's routes as int16 [rows, positions, layers, top_k] (None if disabled)."""
        if not self.enabled:
            return None
        missing = [layer for layer in self.layers if layer not in self.last]
        if missing:
            raise RuntimeError(f"router replay: layer {missing[0]} recorded no routes in the last forward")
        out = torch.stack([self.last[layer].reshape(rows, positions, self.top_k) for layer in self.layers], dim=2)
        self.last.clear()
        return out.to(torch.int16)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
