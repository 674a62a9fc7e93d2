"""What every trainer (``r1mega train``, ``r1mega sft``) does with its model and run directory."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

from r1mega.models.checkpoint import HF_DIR, list_checkpoints, resolve_checkpoint
from r1mega.run.base_model import ensure_base_model
from r1mega.run.logs import METRICS


def quiet_known_warnings() -> None:
    """Known and harmless on CPU: megatron's notes about missing Transformer Engine / Apex, a .grad
    read of a non-leaf tensor inside megatron, torch's deprecation notes on the collectives it
    calls. A user's job should not start with them."""
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")


def resolve_model(model: Optional[str], *, chat: bool = False) -> tuple[Path, Path]:
    """(the policy's source, the HF directory holding its config and tokenizer) for run.model:
    the embedded base model when None (built once; `chat`: with the R1 chat template), else a
    Hugging Face directory or an r1mega checkpoint."""
    if model is None:
        model_dir = ensure_base_model(chat=chat)
    else:
        model_dir = Path(model)
    hf_dir = model_dir
    if not (hf_dir / "config.json").is_file():
        hf_dir = resolve_checkpoint(model_dir) / HF_DIR
    return model_dir, hf_dir


def export_final(policy, run_dir: Path, *, replace: bool = False) -> Path:
    """run_dir/final, the policy as a Hugging Face directory, written atomically (collective).
    An existing one is kept (a run killed after its export) unless `replace`."""
    import torch.distributed as dist

    final = run_dir / "final"
    if (final / "config.json").exists() and not replace:
        return final
    rank0 = dist.get_rank() == 0
    tmp = run_dir / ".final.tmp"
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    policy.export_hf(tmp)
    if rank0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def resume_source(run_dir: Path, *, resuming: bool) -> Optional[Path]:
    """Where a run in `run_dir` starts: its checkpoint directory when `resuming` and a checkpoint
    was saved, else None (from the model; also a resumed run stopped before its first
    checkpoint). ValueError (one line) for a resume of a directory that is no run, or a new run
    where one already is."""
    checkpoints = run_dir / "checkpoints"
    if resuming:
        if not (run_dir / "config.json").is_file():
            raise ValueError(f"--resume {run_dir}: not a run directory (no config.json)")
        return checkpoints if checkpoints.is_dir() and list_checkpoints(checkpoints) else None
    if (run_dir / METRICS).exists():
        raise ValueError(f"{run_dir}: a run is already there; resume it with --resume {run_dir} or set run.name")
    return None

