"""Whole-directory conversion, the ``r1mega convert`` command: HF <-> megatron distributed checkpoints.

A converted checkpoint (:func:`convert_hf_to_megatron`) is a directory with ``weights/`` (megatron
``dist_checkpointing``, loadable into any layout), ``hf/`` (the source's non-weight files) and
``r1mega_megatron.json`` (the source dtypes and how it was written); :func:`convert_megatron_to_hf`
turns it back into a Hugging Face directory, bit-identical per tensor, and :func:`convert_hf_to_hf`
rewrites a Hugging Face directory through a model in memory (an end-to-end check of a layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from r1mega.models.build import build_model
from r1mega.models.errors import CheckpointError
from r1mega.models.hf_checkpoint import (
    check_export_target,
    check_hf_checkpoint,
    copy_files,
    export_hf_weights,
    hf_side_files,
    load_hf_weights,
)
from r1mega.models.hf_config import describe_hf_model
from r1mega.parallel import destroy_parallel
from r1mega.parallel.state import init_parallel
from r1mega.utils.io import atomic_write_text

MEGATRON_META = "r1mega_megatron.json"
MEGATRON_WEIGHTS = "weights"  # megatron dist_checkpointing directory inside a converted checkpoint
HF_FILES = "hf"  # the source's non-weight files (config.json verbatim, tokenizer, ...)


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, parallel, *, dtype: Optional[str] = None) -> dict:
    """HF safetensors directory -> megatron distributed checkpoint; call on every rank.

    `out_dir` receives ``weights/`` (megatron ``dist_checkpointing`` of the model's sharded state
    dict: loadable into any layout), ``hf/`` (the source's config.json verbatim and its other
    non-weight files) and ``r1mega_megatron.json`` (source dtypes per tensor, the parameter dtype,
    the layout written from, ignored tensors). The source is checked before any process group or
    model is set up. Returns the metadata written.
    """
    import torch.distributed as dist
    from megatron.core import __version__ as mcore_version
    from megatron.core import dist_checkpointing

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    desc = describe_hf_model(hf_dir)
    check_hf_checkpoint(hf_dir, desc)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: not empty; convert into a new directory")
    init_parallel(parallel)
    model = build_model(desc, parallel, dtype=dtype)
    report = load_hf_weights(model, desc, hf_dir)
    meta = {"format": 1, "arch": desc.arch, "params_dtype": dtype or desc.dtype, "dtypes": report.dtypes,
            "ignored": report.ignored, "megatron_core": mcore_version,
            "written_with": {"tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep, "etp": parallel.expert_tp}}
    if dist.get_rank() == 0:
        (out_dir / MEGATRON_WEIGHTS).mkdir(parents=True, exist_ok=True)
        copy_files(hf_side_files(hf_dir), out_dir / HF_FILES)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(out_dir / MEGATRON_WEIGHTS))
    if dist.get_rank() == 0:
        atomic_write_text(out_dir / MEGATRON_META, json.dumps(meta, indent=2) + "\n")
    dist.barrier()
    return meta


def convert_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, parallel) -> list[str]:
    """A checkpoint written by convert_hf_to_megatron -> HF safetensors directory; every rank.

    The layout may differ from the one it was written with. The source's config.json and other
    non-weight files are copied back verbatim; tensors are written in their source dtypes.
    Returns the weight files this rank wrote.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    megatron_dir, out_dir = Path(megatron_dir), Path(out_dir)
    meta_file = megatron_dir / MEGATRON_META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{megatron_dir}: not a checkpoint written by `r1mega convert --to-megatron` "
                              f"({meta_file.name}: {err})") from None
    desc = describe_hf_model(megatron_dir / HF_FILES)
    check_export_target(out_dir)
    init_parallel(parallel)
    model = build_model(desc, parallel, dtype=meta["params_dtype"])
    state = dist_checkpointing.load(model.sharded_state_dict(), str(megatron_dir / MEGATRON_WEIGHTS))
    model.load_state_dict(state)
    side = hf_side_files(megatron_dir / HF_FILES)
    config_text = (megatron_dir / HF_FILES / "config.json").read_text()
    written = export_hf_weights(model, desc, out_dir, dtypes=meta["dtypes"], config_json=config_text)
    if dist.get_rank() == 0:
        copy_files([f for f in side if f.name != "config.json"], out_dir)
    dist.barrier()
    return written


def convert_hf_to_hf(hf_dir: str | Path, out_dir: str | Path, parallel, *, dtype: Optional[str] = None) -> list[str]:
    """HF directory -> megatron model in memory (this layout) -> HF directory; every rank.

    Checks a layout end to end and rewrites the weight files (one per writing rank); the other
    files are copied verbatim. Returns the weight files this rank wrote.
    """
    import torch.distributed as dist

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    desc = describe_hf_model(hf_dir)
    check_hf_checkpoint(hf_dir, desc)
    check_export_target(out_dir)
    init_parallel(parallel)
    model = build_model(desc, parallel, dtype=dtype)
    report = load_hf_weights(model, desc, hf_dir)
    written = export_hf_weights(model, desc, out_dir, dtypes=report.dtypes,
                                config_json=(hf_dir / "config.json").read_text())
    if dist.get_rank() == 0:
        copy_files([f for f in hf_side_files(hf_dir) if f.name != "config.json"], out_dir)
    dist.barrier()
    return written


def convert_command(cfg, *, hf: Optional[str] = None, megatron: Optional[str] = None,
                    to_megatron: Optional[str] = None, to_hf: Optional[str] = None) -> int:
    """``r1mega convert``: `hf` or `megatron` (the source) to `to_megatron` or `to_hf` (the target),
    in the layout cfg.parallel (one process, or one per rank under torchrun), megatron parameters in
    cfg.convert.dtype (None: the Hugging Face config's)."""
    import warnings

    if (hf is None) == (megatron is None) or (to_megatron is None) == (to_hf is None):
        raise ValueError("convert: give one source (--hf DIR or --megatron DIR) and one target "
                         "(--to-megatron OUT or --to-hf OUT)")
    if to_megatron and not hf:
        raise ValueError("convert: --to-megatron needs --hf DIR")
    parallel, dtype = cfg.parallel, cfg.convert.dtype
    if hf:  # refuse a broken or unsupported directory before any process group or model exists
        check_hf_checkpoint(hf, describe_hf_model(hf))
    warnings.filterwarnings("ignore", module=r"megatron\.")  # its import-time notes about TE/Apex
    import torch.distributed as dist

    try:
        if to_megatron:
            convert_hf_to_megatron(hf, to_megatron, parallel, dtype=dtype)
        elif megatron:
            convert_megatron_to_hf(megatron, to_hf, parallel)
        else:
            convert_hf_to_hf(hf, to_hf, parallel, dtype=dtype)
        if dist.get_rank() == 0:
            target = to_megatron or to_hf
            kind = "megatron checkpoint" if to_megatron else "Hugging Face directory"
            print(f"wrote {kind} {target} (tp={parallel.tp} pp={parallel.pp} ep={parallel.ep} "
                  f"on {dist.get_world_size()} rank(s))")
    finally:
        destroy_parallel(process_group=True)
    return 0
