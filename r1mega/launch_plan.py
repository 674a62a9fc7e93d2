"""The per-rank plan of a launch, made without a GPU or a cluster (``r1mega plan``, ``DRY_RUN=1``).

:func:`make_plan` takes a :class:`~r1mega.config.ParallelConfig`, the number of nodes and of
processes per node and, when known, the model's :class:`~r1mega.models.hf_config.ModelDesc`. It
runs the checks the real run makes before any work (``ParallelConfig.check_world``; for a model,
:func:`r1mega.models.build.check_model_split` and the layer split of
:func:`r1mega.models.transformer_config.make_transformer_config`) and gives every global rank its
node, local rank, place in every megatron group, its pipeline stage's layers, its experts, and
whether it hosts a rollout engine.

The groups are megatron-core's own: ``megatron.core.parallel_state.RankGenerator`` with the sizes
and the order ``initialize_model_parallel`` uses (r1mega passes no order, so its default,
``tp-cp-ep-dp-pp``, read from the signature; context parallel 1): one generator for the dense
part (tp, dp, pp), one for the experts (etp, ep, expert dp, pp). A rank's index in a group is its
place in the sorted group, as ``torch.distributed.new_group`` numbers it. The stage layer ranges
come from megatron's ``get_transformer_layer_offset`` and ``get_num_layers_to_build`` on the
TransformerConfig the trainer builds; the experts from the MoE layer's rule (ep rank times the
experts per rank). torchrun's static rendezvous (what ``launchers/torchrun.sh`` uses on several
nodes) and its standalone one number ranks node by node: rank = node_rank * nproc_per_node +
local_rank. Rollout engines live on the first rank (tp rank 0, pp rank 0) of each data-parallel
replica, as :func:`r1mega.parallel.collectives.engine_ranks` chooses them.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from r1mega.config import ConfigError, ParallelConfig
from r1mega.models.build import check_model_split
from r1mega.models.hf_config import describe_hf_model
from r1mega.models.transformer_config import make_transformer_config
from r1mega.run.base_model import PretrainSpec, default_cache
from r1mega.run.rundir import resolve_model
from r1mega.utils.io import atomic_write_text

GROUPS = ("tp", "pp", "dp", "ep", "etp", "expert_dp")
FULL_TABLE_MAX_RANKS = 64  # above this the table has one row per node


@dataclass(frozen=True)
class RankPlan:
    """One global rank: where it runs and what it holds. `layers` and `experts` are [start, stop)
    (None when the model is unknown or, for experts, dense)."""

    rank: int
    node: int
    local_rank: int
    coords: dict[str, int]  # index in each of GROUPS
    groups: dict[str, tuple[int, ...]]  # the ranks of each of its GROUPS
    layers: Optional[tuple[int, int]]
    experts: Optional[tuple[int, int]]
    engine: bool


@dataclass(frozen=True)
class Plan:
    """Every rank of a launch of `parallel` on nnodes x nproc_per_node, and each node's command."""

    nnodes: int
    nproc_per_node: int
    parallel: ParallelConfig
    order: str
    sizes: dict[str, int]  # each of GROUPS' size
    model: Optional[dict]  # what was checked of the model (None: not known)
    model_note: str
    stages: Optional[list[tuple[int, int]]]  # layers [start, stop) per pipeline stage
    ranks: list[RankPlan]
    launch: tuple[str, ...] = field(default=())  # one shell command per node

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def engines(self) -> list[int]:
        return [r.rank for r in self.ranks if r.engine]

    def to_dict(self) -> dict:
        return {"nnodes": self.nnodes, "nproc_per_node": self.nproc_per_node, "world": self.world,
                "order": self.order, "parallel": asdict(self.parallel), "sizes": self.sizes,
                "model": self.model, "model_note": self.model_note,
                "stages": None if self.stages is None else [list(s) for s in self.stages],
                "engines": self.engines, "launch": list(self.launch),
                "ranks": [{**asdict(r), "layers": r.layers and list(r.layers),
                           "experts": r.experts and list(r.experts)} for r in self.ranks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def render(self, full: Optional[bool] = None) -> str:
        """The plan as text: the layout, the model check, the stages, a table (one row per rank
        when `full`, default: up to FULL_TABLE_MAX_RANKS ranks; else one row per node) and the
        node commands."""
        full = self.world <= FULL_TABLE_MAX_RANKS if full is None else full
        s, p = self.sizes, self.parallel
        lines = [f"plan: {self.nnodes} node(s) x {self.nproc_per_node} process(es) = {self.world} ranks "
                 f"(megatron order {self.order})",
                 f"layout: tp {s['tp']}, pp {s['pp']}, ep {s['ep']}, etp {s['etp']}, dp {s['dp']}, "
                 f"expert dp {s['expert_dp']}; sequence parallel {'on' if p.uses_sequence_parallel else 'off'}",
                 f"model: {self.model_note}"]
        if self.stages is not None:
            lines.append("stages: " + "; ".join(
                f"{i}: layers {_span(a, b)} ({b - a})" + (" +embedding" if i == 0 else "")
                + (" +output" if i == len(self.stages) - 1 else "") for i, (a, b) in enumerate(self.stages)))
        lines.append(f"rollout engines: {len(self.engines)}, on rank(s) {_spans(self.engines)} "
                     "(the first rank of each data-parallel replica)")
        lines.append("")
        lines += self._rank_table() if full else self._node_table()
        if self.launch:
            lines.append("")
            shown = range(self.nnodes) if full or self.nnodes <= 2 else (0, self.nnodes - 1)
            for node in shown:
                if node == self.nnodes - 1 and len(shown) == 2 and self.nnodes > 2:
                    lines.append(f"(nodes 1-{self.nnodes - 2}: the same command with their own node rank; "
                                 "--plan-json lists every node's)")
                lines.append(f"node {node}: {self.launch[node]}")
        return "\n".join(lines) + "\n"

    def _rank_table(self) -> list[str]:
        head = ["rank", "node", "local", *GROUPS, "layers", "experts", "engine"]
        rows = [[str(r.rank), str(r.node), str(r.local_rank), *(str(r.coords[g]) for g in GROUPS),
                 "-" if r.layers is None else _span(*r.layers), "-" if r.experts is None else _span(*r.experts),
                 "yes" if r.engine else ""] for r in self.ranks]
        return _table(head, rows)

    def _node_table(self) -> list[str]:
        head = ["node", "ranks", *GROUPS, "layers", "experts", "engines"]
        rows = []
        for node in range(self.nnodes):
            mine = self.ranks[node * self.nproc_per_node:(node + 1) * self.nproc_per_node]
            layers = [i for r in mine if r.layers is not None for i in range(*r.layers)]
            experts = [i for r in mine if r.experts is not None for i in range(*r.experts)]
            rows.append([str(node), _spans([r.rank for r in mine]),
                         *(_spans([r.coords[g] for r in mine]) for g in GROUPS),
                         _spans(layers) or "-", _spans(experts) or "-",
                         _spans([r.rank for r in mine if r.engine]) or "-"])
        return _table(head, rows)


def megatron_order() -> str:
    """The rank order ``initialize_model_parallel`` uses when given none (as r1mega calls it)."""
    from megatron.core import parallel_state as ps

    return inspect.signature(ps.initialize_model_parallel).parameters["order"].default


def megatron_groups(parallel: ParallelConfig, world: int, order: Optional[str] = None) -> dict[str, list[list[int]]]:
    """Every group of each kind in GROUPS that ``initialize_model_parallel`` builds for `parallel`
    on `world` ranks (the world is checked first), from megatron's RankGenerator."""
    from megatron.core.parallel_state import RankGenerator

    parallel.check_world(world)
    order = order or megatron_order()
    dp = world // (parallel.tp * parallel.pp)
    expert_dp = world // (parallel.expert_tp * parallel.ep * parallel.pp)
    dense = RankGenerator(tp=parallel.tp, ep=1, dp=dp, pp=parallel.pp, cp=1, order=order)
    expert = RankGenerator(tp=parallel.expert_tp, ep=parallel.ep, dp=expert_dp, pp=parallel.pp, cp=1, order=order)
    return {"tp": dense.get_ranks("tp"), "pp": dense.get_ranks("pp"), "dp": dense.get_ranks("dp"),
            "ep": expert.get_ranks("ep"), "etp": expert.get_ranks("tp"), "expert_dp": expert.get_ranks("dp")}


def stage_layers(desc, parallel: ParallelConfig) -> list[tuple[int, int]]:
    """[start, stop) of the layers of each pipeline stage, from megatron's own split of the
    TransformerConfig the trainer builds (ConfigError when `parallel` cannot split the model)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = make_transformer_config(desc, parallel)
    stages = []
    for pp_rank in range(parallel.pp):
        start = get_transformer_layer_offset(config, pp_rank=pp_rank)
        stages.append((start, start + get_num_layers_to_build(config, pp_rank=pp_rank)))
    return stages


def make_plan(parallel: ParallelConfig, nnodes: int, nproc_per_node: int, *, desc=None, model_note: str = "",
              launch: tuple[str, ...] = ()) -> Plan:
    """The plan of `parallel` on `nnodes` x `nproc_per_node` ranks.

    ConfigError (one line) when the world does not fit the layout, or `desc` (a ModelDesc) cannot
    be split by it; ValueError when `launch` does not hold one command per node.
    """
    for name, value in (("nnodes", nnodes), ("nproc_per_node", nproc_per_node)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"plan: {name} must be a positive integer, got {value!r}")
    if launch and len(launch) != nnodes:
        raise ValueError(f"plan: {len(launch)} launch command(s) for {nnodes} node(s)")
    world = nnodes * nproc_per_node
    order = megatron_order()
    groups = megatron_groups(parallel, world, order)
    stages, model = None, None
    if desc is not None:
        check_model_split(desc, parallel)
        stages = stage_layers(desc, parallel)
        model = {"arch": desc.arch, "num_layers": desc.num_layers, "num_heads": desc.num_heads,
                 "num_kv_heads": desc.num_kv_heads, "vocab_size": desc.vocab_size,
                 "num_experts": desc.moe.num_experts if desc.moe else None,
                 "topk": desc.moe.topk if desc.moe else None}
    local_experts = desc.moe.num_experts // parallel.ep if desc is not None and desc.moe else None
    member = {kind: {rank: sorted(g) for g in gs for rank in g} for kind, gs in groups.items()}
    ranks = []
    for rank in range(world):
        mine = {kind: tuple(member[kind][rank]) for kind in GROUPS}
        coords = {kind: mine[kind].index(rank) for kind in GROUPS}
        ranks.append(RankPlan(
            rank=rank, node=rank // nproc_per_node, local_rank=rank % nproc_per_node, coords=coords, groups=mine,
            layers=None if stages is None else stages[coords["pp"]],
            experts=None if local_experts is None else (coords["ep"] * local_experts,
                                                         (coords["ep"] + 1) * local_experts),
            # r1mega.parallel.collectives.engine_ranks: tp rank 0 and pp rank 0, one per data-parallel replica
            engine=coords["tp"] == 0 and coords["pp"] == 0))
    sizes = {kind: len(groups[kind][0]) for kind in GROUPS}
    return Plan(nnodes=nnodes, nproc_per_node=nproc_per_node, parallel=parallel, order=order, sizes=sizes,
                model=model, model_note=model_note or ("not checked" if desc is None else desc.arch),
                stages=stages, ranks=ranks, launch=tuple(launch))


def describe_run_model(model: Optional[str]):
    """(ModelDesc or None, a line saying what was read) for a run's model, cheaply: only a
    config.json is read. `model` None is the embedded base model, known once it is built."""
    if model is None:
        path = default_cache() / PretrainSpec().cache_name()
        if not (path / "config.json").is_file():
            return None, (f"the embedded base model is not built yet ({path}; `r1mega pretrain` builds it): "
                          "layers, heads and experts not checked")
        where = f"the embedded base model {path}"
    else:
        _, path = resolve_model(model)
        where = str(model)
    desc = describe_hf_model(path)
    experts = f", {desc.moe.num_experts} experts top-{desc.moe.topk}" if desc.moe else ""
    heads = f"{desc.num_heads} heads" + ("" if desc.mla else f" ({desc.num_kv_heads} key/value)")
    return desc, (f"{where} ({desc.arch}: {desc.num_layers} layers, {heads}{experts}, "
                  f"vocabulary {desc.vocab_size}): fits the layout")


def write_plan_json(plan: Plan, path: str | Path) -> None:
    atomic_write_text(path, plan.to_json())


def _span(start: int, stop: int) -> str:
    return str(start) if stop - start == 1 else f"{start}-{stop - 1}"


def _spans(values) -> str:
    """Sorted distinct integers as runs: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    out, values = [], sorted(set(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(_span(values[i], values[j] + 1))
        i = j + 1
    return ",".join(out)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return ["  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]


def plan_command(cfg, *, command: Optional[str], command_cfg=None, hf: Optional[str] = None,
                 megatron: Optional[str] = None, launch: tuple = (), plan_json: Optional[str] = None) -> int:
    """``r1mega plan``: print (and with `plan_json` write) the plan of launching `command` on
    cfg.plan.nnodes x cfg.plan.nproc_per_node ranks, in `command_cfg`'s layout (the config that
    command resolves to); for convert the model is its --hf source."""
    import sys

    if command not in ("train", "sft", "convert"):
        raise ValueError(f"plan: {command or 'no command'!r} is not a distributed command; "
                         "train, sft and convert run under torchrun")
    parallel = command_cfg.parallel
    model = hf if command == "convert" else command_cfg.run.model
    p = cfg.plan
    parallel.check_world(p.nnodes * p.nproc_per_node)  # before reading any model
    if command == "convert" and model is None:
        desc, note = None, f"{megatron}: a megatron checkpoint, not read by the plan"
    else:
        desc, note = describe_run_model(model)
    plan = make_plan(parallel, p.nnodes, p.nproc_per_node, desc=desc, model_note=note, launch=tuple(launch or ()))
    sys.stdout.write(plan.render(full=p.full or None))
    if plan_json:
        write_plan_json(plan, plan_json)
        print(f"wrote {plan_json}")
    return 0
