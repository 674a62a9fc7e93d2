"""Router replay (R3), the trainer side: megatron's MoE routers take recorded expert choices.

The rollout engine records, per position and MoE layer, the top-k experts it routed to
(:class:`r1mega.rollout.Completion.routes`, int16 ``[P + L, moe_layers, top_k]``). With replay,
the policy's forward uses exactly those experts; the mixture weights are still computed from the
policy's own router (gathered at the replayed experts and normalised as the model normalises), so
gradients reach the router as usual.

megatron-core 0.16.1's ``topk_routing_with_score_function`` asks ``router.router_replay`` (when
set) for the top-k; :class:`RouterReplay` sets an object of its own on this model's routers only
(megatron's own ``RouterReplay`` keeps every instance in a class-level list shared by all models
of the process). Megatron orders a router's tokens as ``[sequence, batch]`` flattened, the
sequence split over the tensor-parallel ranks under sequence parallelism; :meth:`RouterReplay.set`
lays a micro-batch's routes out the same way.
"""

from __future__ import annotations

from typing import Optional

import torch

from r1mega.megatron_compat import MEGATRON_VERSION, installed_megatron_version


class _LayerReplay:
    """What one router asks for its top-k (the interface of megatron's RouterReplay)."""

    def __init__(self):
        self.target: Optional[torch.Tensor] = None  # [tokens, top_k] int64

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.target is None:
            return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.target.shape != (scores.shape[0], topk):
            raise RuntimeError(f"router replay: {tuple(self.target.shape)} routes for {scores.shape[0]} tokens x "
                               f"top-{topk}")
        idx = self.target.to(scores.device)
        return scores.gather(1, idx), idx


class RouterReplay:
    """Replay hooks on every MoE router of one megatron model (this rank's pipeline stage)."""

    def __init__(self, model, moe_layers: tuple[int, ...], top_k: int):
        from megatron.core.transformer.moe.router import TopKRouter

        if installed_megatron_version() != MEGATRON_VERSION:
            raise RuntimeError(f"router replay is written for megatron-core {MEGATRON_VERSION}, found "
                               f"{installed_megatron_version()}")
        self.moe_layers = tuple(moe_layers)  # HF layer indices, the order of a routes tensor's dim 2
        self.top_k = top_k
        self.layers: dict[int, _LayerReplay] = {}
        for module in model.modules():
            if isinstance(module, TopKRouter):
                layer = module.layer_number - 1
                if layer not in self.moe_layers:
                    raise RuntimeError(f"router replay: megatron MoE layer {layer} is not an MoE layer of the model")
                module.router_replay = self.layers[layer] = _LayerReplay()

    def set(self, routes: Optional[torch.Tensor], attention_mask: torch.Tensor, *, tp: int, tp_rank: int,
            sequence_parallel: bool) -> None:
        """Routes of one micro-batch, int [B, T, moe_layers, top_k] aligned with its input ids
        (None: route normally). Padding positions get experts 0..k-1 (their outputs are masked)."""
        if routes is None:
            self.clear()
            return
        b, t = attention_mask.shape
        routes = routes.to(torch.long)
        filler = torch.arange(self.top_k, device=routes.device)
        routes = torch.where(attention_mask[:, :, None, None].to(routes.device), routes, filler)
        by_token = routes.transpose(0, 1)  # [T, B, L, K]: megatron's sequence-first token order
        if sequence_parallel and tp > 1:
            chunk = t // tp
            by_token = by_token[tp_rank * chunk: (tp_rank + 1) * chunk]
        flat = by_token.reshape(-1, len(self.moe_layers), self.top_k)
        for i, layer in enumerate(self.moe_layers):
            if layer in self.layers:
                self.layers[layer].target = flat[:, i].contiguous()

    def clear(self) -> None:
        for replay in self.layers.values():
            replay.target = None


def check_routes(routes: torch.Tensor, shape: tuple[int, int], moe_layers: int, top_k: int, num_experts: int) -> None:
    """ValueError unless `routes` is an integer [S, T, moe_layers, top_k] tensor of expert ids."""
    want = (*shape, moe_layers, top_k)
    if not isinstance(routes, torch.Tensor) or routes.is_floating_point() or tuple(routes.shape) != want:
        got = tuple(routes.shape) if isinstance(routes, torch.Tensor) else type(routes).__name__
        raise ValueError(f"routes must be an integer tensor of shape [S, T, moe_layers, top_k] {want}, got {got}")
    if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= num_experts):
        raise ValueError(f"routes: expert ids must be in [0, {num_experts})")
