"""Shared by the Policy workers: the training recipe every layout runs, and the comparisons."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

STEPS = 3  # training steps of the trajectory
RESUME_AT = 1  # the reference saves a checkpoint after this step
MICRO_BATCH = 2
ROWS, SEQ = 6, 13  # odd T: padded to a multiple of tp under sequence parallelism; 3 rows per DP rank
BUCKET_BYTES = 48 * 1024
REL_TOL = 1e-5

# Per family: the loss options, LossSpec's fields (each aggregation's global denominator gets exercised).
LOSS = {
    "deepseek_v3": dict(agg="token-mean", kl_coef=0.05, kl_estimator="k3", tis_cap=2.0, dual_clip=3.0),
    "qwen3_moe": dict(agg="seq-mean-token-mean", kl_coef=0.05, kl_estimator="k1+"),
    "qwen2": dict(agg="seq-mean-token-sum-norm", norm_length=8, eps_high=0.28),
}
# adam_eps=1e-3: see tests/test_models_policy.py (Adam's sign-like update amplifies last-bit differences)
OPTIM = dict(lr=2e-4, weight_decay=0.01, grad_clip=1.0, adam_eps=1e-3)
DATA_STATE = {"version": 1, "epoch": 0, "position": 6, "seed": 7}

# name -> (family, ParallelConfig kwargs)
LAYOUTS = {
    "ds-tp2": ("deepseek_v3", dict(tp=2)),
    "ds-ep2": ("deepseek_v3", dict(ep=2)),
    "ds-pp2": ("deepseek_v3", dict(pp=2, pp_first_stage_layers=1)),
    "ds-tp2ep2": ("deepseek_v3", dict(tp=2, ep=2)),
    "ds-tp2pp2": ("deepseek_v3", dict(tp=2, pp=2, pp_first_stage_layers=1)),
    "qwen3-ep2": ("qwen3_moe", dict(ep=2)),
    "qwen3-tp2": ("qwen3_moe", dict(tp=2)),
    "qwen2-pp2": ("qwen2", dict(pp=2)),
    "qwen2-tp2": ("qwen2", dict(tp=2)),
}


def loss_spec(family: str):
    """The family's r1mega.algo.LossSpec (the batch carries tensors only)."""
    from r1mega.algo import LossSpec

    return LossSpec(**LOSS[family])


def make_batch(vocab: int, seed: int = 11):
    """input_ids [ROWS, SEQ] with right-padded rows; the log-prob inputs come from the policy."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (ROWS, SEQ), generator=g)
    lengths = torch.tensor([SEQ, SEQ - 3, SEQ, SEQ - 5, SEQ - 1, SEQ])
    am = torch.arange(SEQ)[None, :] < lengths[:, None]
    cm = am & (torch.arange(SEQ)[None, :] >= 4)
    adv = torch.randn(ROWS, generator=g)
    return ids, am, cm, adv, g


def full_batch(family: str, ids, am, cm, adv, logp, g):
    """The training batch (tensors only; the loss options are :func:`loss_spec`'s): old/ref/rollout
    log-probs are perturbations of the policy's own."""
    import torch

    noise = lambda scale: scale * torch.randn(logp.shape, generator=g)  # noqa: E731
    batch = dict(input_ids=ids, attention_mask=am, completion_mask=cm, advantages=adv,
                 old_logp=logp + noise(0.05), ref_logp=logp + noise(0.1))
    if "tis_cap" in LOSS[family]:
        batch["rollout_logp"] = batch["old_logp"] + noise(0.1)
    return batch


def rel(a, b) -> float:
    """max |a - b| / max |b| (tensors or numbers)."""
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def rel_params(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    return max(rel(a[n], b[n]) for n in b)


def collect_buckets(policy, bucket_bytes: int = BUCKET_BYTES):
    """name -> (dtype, shape, bytes) of the bucket stream, the bucket count and the largest bucket."""
    out, count, largest = {}, 0, 0
    for bucket in policy.hf_weight_buckets(bucket_bytes):
        count += 1
        size = 0
        for name, tensor in bucket:
            assert name not in out, f"{name} yielded twice"
            host = tensor.detach().cpu()  # the stream may yield device tensors (CUDA)
            raw = host.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
            out[name] = (str(tensor.dtype), tuple(tensor.shape), raw, host.clone())
            size += len(raw)
        largest = max(largest, size if len(bucket) > 1 else 0)
    return out, count, largest


def digest(buckets: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(buckets):
        dtype, shape, raw, _ = buckets[name]
        h.update(json.dumps([name, dtype, shape]).encode())
        h.update(raw)
    return h.hexdigest()


def compare_with_export(buckets: dict, export_dir: Path) -> list[str]:
    """Differences between the bucket stream and an HF export directory (names, dtypes, shapes, bytes)."""
    from _models_common import raw_tensors

    st_names = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}
    exported = raw_tensors(export_dir)
    problems = [f"missing from buckets {n}" for n in sorted(set(exported) - set(buckets))]
    problems += [f"not exported {n}" for n in sorted(set(buckets) - set(exported))]
    for name in sorted(set(exported) & set(buckets)):
        dtype, shape, raw, _ = buckets[name]
        if (st_names[dtype], shape, raw) != exported[name]:
            problems.append(f"differs {name}")
    return problems
