"""Training checkpoints of a :class:`~r1mega.models.policy.Policy`: atomic, and loadable into any layout.

Directory layout (``root`` is the run's checkpoint directory)::

    root/latest                        "step_00000012\\n": the newest complete checkpoint (atomic)
    root/step_00000012/
        r1mega_checkpoint.json         written last: step, Adam step, scheduler state, the caller's
                                       data position (``data_state``), source dtypes, the layout
                                       it was written from, what is inside
        weights/                       megatron dist_checkpointing: the model's sharded state dict
                                       and, for a trainable policy, the optimizer state
        hf/                            config.json (+ tokenizer and other non-weight files) of the
                                       source model: the checkpoint describes itself
        rng/rank_00000.safetensors     each rank's RNG states without pickle: the tensors (torch,
        rng/rank_00000.json ...        megatron's tracker, numpy's keys) and the rest as JSON

Atomicity: every rank writes into ``root/step_N.tmp-XXXXXXXX/`` and fsyncs what it wrote; when
all ranks are done rank 0 writes the JSON, fsyncs the files, renames the directory to ``step_N/`` (one rename: the step
directory exists complete or not at all) and then replaces ``latest`` atomically
(:func:`r1mega.utils.io.atomic_write_text`). A crash at any point leaves the previous checkpoint
and ``latest`` untouched; leftover ``*.tmp-*`` directories are ignored by loads and removed by
the next save.

Any layout: the model is megatron's sharded state dict (global tensor keys with offsets), so
dist_checkpointing reshards it to the loading layout. The optimizer state is stored the same
way, in *model space*: for every parameter, its Adam moments (and fp32 main copy) as tensors of
the parameter's own global shape and key (``optimizer.state.exp_avg.<param key>``...), from
megatron's ``fully_reshardable`` distributed-optimizer format, one DistributedOptimizer at a time.
megatron-core 0.16.1's own chained-optimizer checkpoint cannot be used across layouts: its
common (non-tensor) part depends on how many optimizers the layout creates (one on a single
rank, dense + expert with EP), and its torch-Adam load path fails on the ``step`` key without
Transformer Engine or Apex. The Adam step and the scheduler go into the JSON instead.

Memory: saving gathers each DistributedOptimizer's shards over its data-parallel group (megatron's
``get_parameter_state_dp_zero``), so every rank briefly holds the Adam state of its whole TP/PP/EP
shard (3 x its parameters in fp32); loading reads the same and keeps its own slice.

RNG states are per rank and only meaningful in the same layout: a load in the same layout
restores them; in another layout every rank is re-seeded from (seed, step) and the load report
says so. (The model has no dropout, so training does not consume randomness.)
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from r1mega.models.errors import CheckpointError
from r1mega.utils.io import atomic_write_text, fsync_dir

FORMAT = 1
META_NAME = "r1mega_checkpoint.json"
LATEST_NAME = "latest"
WEIGHTS_DIR = "weights"
HF_DIR = "hf"
RNG_DIR = "rng"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^step_\d{8,}\.tmp-[0-9a-f]+$")
OPTIMIZER_PREFIX = "optimizer.state"  # megatron's fully_reshardable key prefix


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` restored."""

    path: Path
    step: int
    data_state: Optional[dict]
    optimizer: bool  # optimizer state (moments, Adam step) and scheduler restored
    rng: str  # "restored" | "reseeded (...)" | "not restored"
    meta: dict = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------
def is_checkpoint_dir(path: str | Path) -> bool:
    """True for a complete step directory (its JSON is written last, before the rename)."""
    return (Path(path) / META_NAME).is_file()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete ``step_N/`` under `root`, oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_RE.match(child.name)
            if match and is_checkpoint_dir(child):
                found.append((int(match.group(1)), child))
    return sorted(found)


def checkpoint_problem(step_dir: str | Path) -> Optional[str]:
    """Why the step directory cannot be loaded (unreadable metadata, a file missing or of another
    size than the save wrote: a disk that lost or truncated it), or None when it looks whole."""
    step_dir = Path(step_dir)
    try:
        meta = read_meta(step_dir)
    except CheckpointError as err:
        return str(err)
    for name, size in (meta.get("files") or {}).items():
        file = step_dir / name
        try:
            found = file.stat().st_size
        except OSError:
            return f"{file} is missing"
        if found != size:
            return f"{file} has {found} bytes, the save wrote {size}"
    return None


def _warn(message: str) -> None:
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        sys.stderr.write(f"r1mega: warning: {message}\n")


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory `path` names: itself, or the newest usable one of a checkpoint root.

    For a root, the one its ``latest`` file points to comes first, then the others newest first;
    one that is incomplete or damaged (:func:`checkpoint_problem`) is passed over with a warning
    naming it, so a run resumes from the last good checkpoint. A root without ``latest`` (a crash
    between the rename and the pointer update, or a copy) resolves the same way. CheckpointError
    when there is none, or when `path` is itself a damaged step directory.
    """
    path = Path(path)
    if is_checkpoint_dir(path):
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"{path}: damaged checkpoint ({problem})")
        return path
    candidates: list[Path] = []
    pointer = path / LATEST_NAME
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = path / name
        if _STEP_RE.match(name) and is_checkpoint_dir(target):
            candidates.append(target)
        else:
            _warn(f"{pointer}: points to {name!r}, which is not a complete checkpoint in {path}")
    candidates += [p for _, p in reversed(list_checkpoints(path)) if p not in candidates]
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            for bad, why in skipped:
                _warn(f"checkpoint {bad} is damaged ({why}); loading {candidate} instead")
            return candidate
        skipped.append((candidate, problem))
    if skipped:
        raise CheckpointError(f"{path}: every checkpoint is damaged (newest: {skipped[0][0]}: {skipped[0][1]})")
    if pointer.is_file():
        raise CheckpointError(f"{pointer}: points to {pointer.read_text().strip()!r}, which is not a complete "
                              f"checkpoint in {path}, and there is no other")
    raise CheckpointError(f"{path}: not an r1mega checkpoint (no {META_NAME}, no {LATEST_NAME} file and no "
                          "complete step_N directory)")


def read_meta(step_dir: str | Path) -> dict:
    file = Path(step_dir) / META_NAME
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable checkpoint metadata ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {meta.get('format')!r}, this r1mega reads format {FORMAT}")
    return meta


# ---------------------------------------------------------------------------------------------
# Optimizer state in model space
# ---------------------------------------------------------------------------------------------
def _distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers of a (chained) megatron optimizer that hold parameters here."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    out = []
    for opt in inner:
        if not isinstance(opt, DistributedOptimizer):
            raise CheckpointError("internal: checkpoints need megatron's DistributedOptimizer, "
                                  f"got {type(opt).__name__}")
        if not getattr(opt, "is_stub_optimizer", False):
            out.append(opt)
    return out


def optimizer_sharded_state(optimizer, model_sharded_state_dict: dict, *, is_loading: bool) -> dict:
    """{index: megatron fully_reshardable param state} of every DistributedOptimizer here.

    Each value maps parameters to ShardedTensors keyed ``optimizer.state.<exp_avg|exp_avg_sq|param>.
    <model key>`` with the parameter's global shape: layout independent.
    """
    if is_loading:
        _allocate_moments(optimizer)
    return {i: opt.sharded_param_state_fully_reshardable(model_sharded_state_dict, is_loading, {})
            for i, opt in enumerate(_distributed_optimizers(optimizer))}


def _allocate_moments(optimizer) -> None:
    # Adam's state must exist before megatron copies loaded shards into it; "step" is set after
    # (megatron's copy loop would look for a loaded "step" tensor, which this format has not).
    for opt in _distributed_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                state = opt.optimizer.state[param]
                state.pop("step", None)
                state.setdefault("exp_avg", torch.zeros_like(param))
                state.setdefault("exp_avg_sq", torch.zeros_like(param))


def load_optimizer_state(optimizer, loaded: dict, adam_step: int) -> None:
    """Copy the loaded model-space state into this rank's optimizer shards; set Adam's step."""
    for i, opt in enumerate(_distributed_optimizers(optimizer)):
        opt.load_parameter_state_from_fully_reshardable(loaded[i])
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                opt.optimizer.state[param]["step"] = torch.tensor(float(adam_step), dtype=torch.float32)


def adam_step(optimizer) -> int:
    """Adam's step count on this rank (0 before the first update)."""
    steps = {int(state["step"]) for opt in _distributed_optimizers(optimizer)
             for state in opt.optimizer.state.values() if "step" in state}
    return max(steps, default=0)


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------
def rng_state_files(state: dict, stem: Path) -> tuple[Path, Path]:
    """Write an :func:`rng_state` dict without pickle: its tensors (torch, CUDA, megatron's
    tracker, numpy's key array) to ``stem.safetensors``, the rest (Python's Mersenne state, numpy's
    position and Gaussian cache) to ``stem.json``; both through a temporary name and a rename."""
    import numpy as np
    from safetensors.torch import save_file

    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], "numpy.keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32))}
    tensors.update({f"tracker.{name}": t for name, t in state["tracker"].items()})
    if "cuda" in state:
        tensors["cuda"] = state["cuda"]
    version, internal, gauss_next = state["python"]
    meta = {"python": [version, list(internal), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "tracker": sorted(state["tracker"])}
    tensor_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    tmp = tensor_path.with_name(tensor_path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, tensor_path)
    atomic_write_text(json_path, json.dumps(meta) + "\n")
    return tensor_path, json_path


def read_rng_state_files(stem: Path) -> dict:
    """The :func:`rng_state` dict that :func:`rng_state_files` wrote (no unpickling)."""
    import numpy as np
    from safetensors.torch import load_file

    tensors = load_file(str(stem.with_suffix(".safetensors")))
    meta = json.loads(stem.with_suffix(".json").read_text())
    version, internal, gauss_next = meta["python"]
    kind, pos, has_gauss, cached = meta["numpy"]
    state = {"torch": tensors["torch"], "python": (version, tuple(internal), gauss_next),
             "numpy": (kind, tensors["numpy.keys"].numpy().view(np.uint32).copy(), pos, has_gauss, cached),
             "tracker": {name: tensors[f"tracker.{name}"] for name in meta["tracker"]}}
    if "cuda" in tensors:
        state["cuda"] = tensors["cuda"]
    return state


def rng_state() -> dict:
    import numpy as np
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def reseed(seed: int) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------
def _fsync_tree(path: Path, *, racing: bool = False) -> None:
    """fsync every file and directory under `path`. `racing`: other ranks may still be writing
    there, so a file renamed away meanwhile (their temporary names) is skipped."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except FileNotFoundError:
                if not racing:
                    raise
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _broadcast_from_zero(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _agree(error: Optional[str], *, discard: Optional[Path] = None) -> None:
    """Raise the same error on every rank when any rank has one (no rank hangs in a collective);
    `discard`: the unfinished save directory to remove first (rank 0), so that a failed save
    gives back the space it took and leaves the previous checkpoint and ``latest`` as they were."""
    import torch.distributed as dist

    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        if discard is not None:
            shutil.rmtree(discard, ignore_errors=True)
        raise CheckpointError(f"{first}; the previous checkpoint is intact")


def save_checkpoint(policy, root: str | Path, *, data_state: Optional[dict] = None,
                    keep_last: Optional[int] = None) -> Path:
    """Write `policy` (model, optimizer, scheduler, RNG, `data_state`) as ``root/step_N/``; every rank.

    N is ``policy.step``. `data_state` is the caller's JSON-safe resume position (e.g.
    ``PromptSampler.state_dict()``), returned by the load. ``keep_last``: afterwards delete all
    but the newest that many step directories. Refuses (CheckpointError, before anything is
    written) a step that already exists or a `data_state` that is not JSON. Returns the step
    directory.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank = dist.get_rank()
    step = policy.step
    final = root / step_dir_name(step)
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an integer >= 1 or None, got {keep_last!r}")
    error, tmp_name = None, None
    if rank == 0:
        try:
            data_json = json.dumps(data_state, allow_nan=False)
            if data_state is not None and not isinstance(data_state, dict):
                raise TypeError(f"a dict, got {type(data_state).__name__}")
            json.loads(data_json)
        except (TypeError, ValueError) as err:
            error = f"save_checkpoint: data_state must be a JSON-safe dict ({err})"
        if error is None and final.exists():
            problem = checkpoint_problem(final)
            if problem is None:
                error = f"save_checkpoint: {final} already exists; each step is saved once"
            else:  # the damaged one a resume passed over: kept aside for inspection, never loaded
                aside = final.with_name(f"{final.name}.damaged-{secrets.token_hex(4)}")
                os.rename(final, aside)
                _warn(f"moved the damaged {final.name} aside to {aside.name} ({problem})")
        if error is None:
            tmp_name = f"{final.name}.tmp-{secrets.token_hex(4)}"
            try:
                (root / tmp_name).mkdir(parents=True)
                (root / tmp_name / RNG_DIR).mkdir()
                (root / tmp_name / WEIGHTS_DIR).mkdir()
            except OSError as err:
                error = f"save_checkpoint: cannot create {root / tmp_name} ({err})"
    _agree(error)
    tmp = root / _broadcast_from_zero(tmp_name)

    model_sd = policy.model.sharded_state_dict()
    state = {"model": model_sd}
    if policy.optimizer is not None:
        state["optimizer"] = optimizer_sharded_state(policy.optimizer, model_sd, is_loading=False)
    error = None
    try:
        dist_checkpointing.save(state, str(tmp / WEIGHTS_DIR))
        rng_state_files(rng_state(), tmp / RNG_DIR / f"rank_{rank:05d}")
        # Every rank makes its own writes durable before the barrier below: on a file system shared
        # by several nodes, rank 0's fsync does not flush the pages another node holds.
        _fsync_tree(tmp, racing=True)
    except OSError as err:  # a full disk, a lost mount: this save fails, nothing saved before does
        error = f"save_checkpoint: writing {final.name} failed on rank {rank} ({err})"
    _agree(error, discard=tmp if rank == 0 else None)

    adam = adam_step(policy.optimizer) if policy.optimizer is not None else 0
    steps = [None] * dist.get_world_size()
    dist.all_gather_object(steps, adam)
    error = None
    if rank == 0:
        try:
            policy.write_side_files(tmp / HF_DIR)
            layout = policy.layout
            meta = {
                "format": FORMAT, "step": step, "arch": policy.desc.arch, "params_dtype": policy.dtype_name,
                "hf_dtypes": policy.hf_dtypes, "data_state": data_state,
                "optimizer": None if policy.optimizer is None else {
                    "adam_step": max(steps), "scheduler": policy.scheduler.state_dict()},
                "written_with": {"world": layout.world, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                                 "etp": layout.etp, "dp": layout.dp},
                "seed": policy.seed,
                # what a load checks first (checkpoint_problem): a file lost or truncated on disk
                "files": {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()},
            }
            atomic_write_text(tmp / META_NAME, json.dumps(meta, indent=2) + "\n")
            _fsync_tree(tmp)
            os.rename(tmp, final)
            fsync_dir(root)
            atomic_write_text(root / LATEST_NAME, final.name + "\n")
            _cleanup(root, keep_last, keep=final)
        except OSError as err:
            error = f"save_checkpoint: {err}"
    _agree(error, discard=tmp if rank == 0 and not final.exists() else None)
    return final


def _cleanup(root: Path, keep_last: Optional[int], keep: Path) -> None:
    """Remove leftovers of interrupted saves and, with keep_last, the oldest step directories."""
    for child in root.iterdir():
        if _TMP_RE.match(child.name) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    if keep_last is not None:
        found = list_checkpoints(root)
        for _, path in found[:-keep_last]:
            if path != keep:
                # rename first, so that a crash mid-delete leaves no half step directory
                doomed = path.with_name(path.name + ".tmp-" + secrets.token_hex(4))
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def load_model_weights(model, weights_dir: str | Path) -> None:
    """Fill `model` (a GPTModel, this layout) from a dist_checkpointing directory."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(weights_dir))
    model.load_state_dict(state["model"])


def load_checkpoint(policy, path: str | Path, *, load_optimizer: bool = True, load_model: bool = True) -> LoadReport:
    """Restore `policy` from a step directory (or a root with ``latest``); every rank.

    The layout may differ from the one the checkpoint was written with. `load_optimizer`
    (only for a trainable policy): the optimizer moments, Adam step, scheduler and RNG too.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    weights = step_dir / WEIGHTS_DIR
    if load_model:
        load_model_weights(policy.model, weights)
    policy.step = int(meta["step"])
    restore = load_optimizer and policy.optimizer is not None and meta.get("optimizer") is not None
    rng = "not restored"
    if restore:
        model_sd = policy.model.sharded_state_dict()
        request = {"optimizer": optimizer_sharded_state(policy.optimizer, model_sd, is_loading=True)}
        loaded = dist_checkpointing.load(request, str(weights))
        load_optimizer_state(policy.optimizer, loaded["optimizer"], meta["optimizer"]["adam_step"])
        policy.scheduler.load_state_dict(meta["optimizer"]["scheduler"])
        layout, written = policy.layout, meta["written_with"]
        same = all(written.get(k) == getattr(layout, k) for k in ("world", "tp", "pp", "ep", "etp", "dp"))
        stem = step_dir / RNG_DIR / f"rank_{dist.get_rank():05d}"
        has_files = stem.with_suffix(".safetensors").is_file() and stem.with_suffix(".json").is_file()
        if same and has_files:
            set_rng_state(read_rng_state_files(stem))
            rng = "restored"
        else:
            reseed(int(meta.get("seed", 0)) + 1_000_003 * policy.step)
            if not same:
                rng = f"reseeded (written with {written}, loaded as tp={layout.tp} pp={layout.pp} ep={layout.ep} " \
                      f"dp={layout.dp})"
            elif stem.with_suffix(".pt").is_file():  # written before the pickle-free format: never unpickled
                rng = f"reseeded ({stem.with_suffix('.pt')} is a pickle, which is not loaded)"
            else:
                rng = f"reseeded (no RNG state {stem.with_suffix('.safetensors')})"
    return LoadReport(path=step_dir, step=policy.step, data_state=meta.get("data_state"), optimizer=restore,
                      rng=rng, meta=meta)
