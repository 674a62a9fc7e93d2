"""Helpers shared by the model worker scripts (imported from the workers' own directory)."""

from __future__ import annotations

import json
import struct
import sys
import warnings
from pathlib import Path

LOGIT_ATOL = 2e-5  # fp32 rounding: measured max |diff| <= 1e-6 at these sizes


def raw_tensors(directory: str | Path) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor in a safetensors directory."""
    out = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        data = file.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        header.pop("__metadata__", None)
        base = 8 + size
        for name, meta in header.items():
            start, end = meta["data_offsets"]
            assert name not in out, f"{name} twice in {directory}"
            out[name] = (meta["dtype"], tuple(meta["shape"]), data[base + start: base + end])
    return out


def same_tensors(src: str | Path, dst: str | Path) -> list[str]:
    """Differences between two safetensors directories, per tensor (names, dtypes, shapes, bytes)."""
    a, b = raw_tensors(src), raw_tensors(dst)
    problems = [f"missing {n}" for n in sorted(set(a) - set(b))] + [f"extra {n}" for n in sorted(set(b) - set(a))]
    problems += [f"differs {n}" for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    return problems


def worker_device() -> str:
    """The device a model worker runs on: R1MEGA_TEST_DEVICE ("cpu" or "cuda"; the gpu-marked
    variants set "cuda"), else where load_policy puts the model (CUDA when there is one)."""
    import os

    import torch

    return os.environ.get("R1MEGA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def transformers_logits(model_dir: str | Path, ids, device: str):
    """transformers' own model of ``model_dir`` (fp32, eager attention) on ``device``: the logits of
    ``ids``, on the CPU."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        return model.to(device).eval()(ids.to(device)).logits.float().cpu()


def reference(root: Path, name: str):
    import torch

    return torch.load(root / f"{name}.ref.pt")


def quiet_megatron() -> None:
    """Silence megatron's import-time notes (no TE/Apex) in a worker's logs."""
    warnings.filterwarnings("ignore", module=r"megatron\.")
    warnings.filterwarnings("ignore", message=".*ShardedTensor.*")


def log(*parts) -> None:
    print(*parts, flush=True)
    sys.stdout.flush()


def check_layout(model, desc, root: Path, name: str, tag: str, layout, out: Path, label: str) -> None:
    """Load fixture `name` into `model` (this layout), compare the last stage's logits with
    transformers' (max over ranks, logged by rank 0 as ``{label} {name} {tag} max_abs_diff D``),
    export into `out` and check the round trip bit for bit (``roundtrip {label} {name} {tag} ok files=N``)."""
    import torch
    import torch.distributed as dist

    from r1mega.models import export_hf_weights, forward_logits, load_hf_weights

    report = load_hf_weights(model, desc, root / name)
    ref = reference(root, name)
    logits = forward_logits(model, ref["ids"])
    diff = torch.zeros(())
    if layout.is_last_stage:
        diff += (logits.cpu() - ref["logits"]).abs().max()
        assert diff <= LOGIT_ATOL, f"{name} {tag}: max |logits - transformers| = {diff:.3g}"
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)  # so that rank 0 reports the last stage's
    if layout.rank == 0:
        log(f"{label} {name} {tag} max_abs_diff {diff.item():.3g}")
    export_hf_weights(model, desc, out, dtypes=report.dtypes)
    dist.barrier()
    if layout.rank == 0:
        problems = same_tensors(root / name, out)
        assert not problems, f"{name} {tag}: round trip differs: {problems[:5]}"
        log(f"roundtrip {label} {name} {tag} ok files={len(list(out.glob('*.safetensors')))}")
