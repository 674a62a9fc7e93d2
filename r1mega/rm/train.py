"""Reward-model training (DeepSeek-R1 stage 4 scores general prompts with one): a causal LM's
backbone under a new one-logit score head, trained on (prompt, chosen, rejected) pairs with the
Bradley-Terry loss ``mean(-log sigmoid(r_chosen - r_rejected))``.

The model is transformers' ``AutoModelForSequenceClassification`` (``num_labels=1``, float32)
loaded from a causal-LM Hugging Face directory: the backbone's weights are reused, the score
head is new (drawn under ``torch.manual_seed(seed)``). A pair's text and tokens are exactly those
:class:`r1mega.rewards.reward_model.RewardModel` scores (its own ``text`` / ``token_ids`` code,
bound to the tokenizer: the chat template when the tokenizer has one, else prompt + completion
with the special tokens), truncated to the last ``max_length`` tokens and right-padded with
``config.pad_token_id`` as it does, so ``RewardModel(out_dir).score(prompts, completions)``
returns the scores the trainer's last forward computed. The prompt is the raw question
(``record.prompt``), as the RL trainer passes it to ``RewardModel.score``.

Optimisation: plain ``torch.optim.AdamW`` on every parameter, constant learning rate after a
short linear warm-up, gradient norm clipped at 1; each step's chosen and rejected completions go
through one forward. Deterministic for given inputs and settings on a given machine (the seed
draws the head; each epoch's order is a fixed shuffle of the seed and the epoch).

Per epoch: the mean loss, the train pair accuracy (share of pairs whose chosen completion scored
above the rejected one, counted in each step's forward, before its update), the held-out pair
accuracy (after the epoch, in eval mode); the held-out accuracy before training (the new head:
chance, about 0.5) is reported too. The output directory is an ordinary Hugging Face
sequence-classification directory (config, safetensors, tokenizer) plus ``rm.json`` (inputs,
settings, metrics, wall time) and ``metrics.jsonl`` (one row per epoch), written into a
temporary directory next to it and renamed into place (a reader sees all of it or none).

Measured on the embedded default (``r1mega rm --out DIR``: the tiny base of ``r1mega pretrain``;
514 train pairs of the "repeat" and "greet" general prompts, 52 held-out pairs on held-out
prompts) with the defaults below (4 epochs of 65 steps), torch 2.13.0 CPU, 2026-12-04, on the
2-core development machine while other jobs ran on it: with ``OMP_NUM_THREADS=1``, held-out pair
accuracy 0.404 before (the new head) -> 0.788, 0.923, 0.962, 0.981 after epochs 1-4, in 38 s wall
time (36 s training); with torch's 2 threads competing with those jobs (load average 4-6) the
same run took 271 s and reached 0.962 (thread counts change float reduction orders, hence the
trajectory).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from r1mega.config import RMConfig, RunConfig
from r1mega.data import r1_corpus
from r1mega.rewards.reward_model import RewardModel
from r1mega.rm.data import load_preference_pairs
from r1mega.run.rundir import resolve_model

# The embedded default's settings (see the module docstring for what they reach): the config's rm
# section (and run.seed) defaults, their one home.
EPOCHS = RMConfig().epochs
LR = RMConfig().lr
BATCH_SIZE = RMConfig().batch_size
MAX_LENGTH = RMConfig().max_length  # RewardModel's default, so its scores of long pairs match the training's
SEED = RunConfig().seed
WARMUP_STEPS = 10


def bradley_terry_loss(chosen_B: torch.Tensor, rejected_B: torch.Tensor) -> torch.Tensor:
    """``mean(-log sigmoid(chosen - rejected))`` over B pairs (computed as softplus, stable for
    any margin)."""
    if chosen_B.shape != rejected_B.shape or chosen_B.dim() != 1:
        raise ValueError(f"chosen_B and rejected_B must be 1-D of one shape, got {tuple(chosen_B.shape)} "
                         f"and {tuple(rejected_B.shape)}")
    return F.softplus(rejected_B - chosen_B).mean()


class PairTokens:
    """RewardModel's own ``text`` and ``token_ids`` for a tokenizer, without a model: the tokens
    of a (prompt, completion) pair exactly as ``RewardModel(path).score`` makes them (before
    its truncation to the last ``max_length`` tokens)."""

    text = RewardModel.text
    token_ids = RewardModel.token_ids

    def __init__(self, tokenizer, *, summary_only: bool = False) -> None:
        self.tokenizer = tokenizer
        self.summary_only = summary_only
        self.use_chat_template = getattr(tokenizer, "chat_template", None) is not None


def pad_id_of(config, tokenizer) -> int:
    """config.pad_token_id, else the tokenizer's pad, eos or unk id (RewardModel's choice), which
    is then set on the config: the head reads each sequence's last token that is not this id."""
    pad_id = getattr(config, "pad_token_id", None)
    if pad_id is None:
        pad_id = next((c for c in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
                       if c is not None), None)
        if pad_id is None:
            raise ValueError("the model has no pad_token_id and its tokenizer no pad, eos or unk token to pad "
                             "batches with")
        config.pad_token_id = pad_id
    return int(pad_id)


def right_padded(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (S, T_max), right-padded with `pad_id`."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        attention_mask[row, :len(x)] = 1
    return input_ids, attention_mask


def _forward(model, ids: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    input_ids, attention_mask = right_padded(ids, pad_id)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0]


@torch.no_grad()
def score_pairs(model, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int,
                batch_size: int) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of encoded pairs, in eval mode."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        scores = _forward(model, [c for c, _ in batch] + [r for _, r in batch], pad_id).float()
        chosen += scores[:len(batch)].tolist()
        rejected += scores[len(batch):].tolist()
    model.train(was_training)
    return chosen, rejected


def pair_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs whose chosen completion scored strictly above the rejected one."""
    return sum(c > r for c, r in zip(chosen, rejected)) / max(len(chosen), 1)


def _progress(step: int, total: int, loss: float, acc: float, start: float) -> None:
    elapsed = time.perf_counter() - start
    eta = elapsed / max(step, 1) * (total - step)
    bar = "#" * int(30 * step / total)
    sys.stderr.write(f"\rrm [{bar:<30}] {step}/{total} loss {loss:.3f} acc {acc:.2f} {elapsed:.0f}s, eta {eta:.0f}s ")
    sys.stderr.flush()


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _check_settings(epochs: int, lr: float, batch_size: int, max_length: int, seed: int) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


def train_reward_model(model_dir: str | Path, train_pairs: Sequence[dict], heldout_pairs: Sequence[dict],
                       out_dir: str | Path, *, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE,
                       max_length: int = MAX_LENGTH, seed: int = SEED, progress: bool = True,
                       sources: Optional[dict[str, Any]] = None) -> dict:
    """Train a reward model on `train_pairs` (dicts with ``prompt``, ``chosen``, ``rejected``,
    as :func:`r1mega.rm.data.load_preference_pairs` returns) from the causal LM at `model_dir`,
    evaluate it on `heldout_pairs` (may be empty) and write it to `out_dir` (must not exist, or be
    empty). `sources`: where the model and pairs came from, recorded in rm.json.

    Returns rm.json's content plus ``heldout_scores``: {"chosen": [...], "rejected": [...]}, the
    final model's scores of the held-out pairs (what RewardModel(out_dir).score gives).
    Raises ValueError on bad settings, no train pairs or an existing non-empty `out_dir`, before
    any training.
    """
    import transformers

    start = time.perf_counter()
    _check_settings(epochs, lr, batch_size, max_length, seed)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: already exists; remove it or choose another output directory")
    if not train_pairs:
        raise ValueError("no train pairs")

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    encoder = PairTokens(tokenizer)
    truncated = 0

    def encode(pairs: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
        nonlocal truncated
        out = []
        for p in pairs:
            chosen = encoder.token_ids(p["prompt"], p["chosen"])
            rejected = encoder.token_ids(p["prompt"], p["rejected"])
            truncated += (len(chosen) > max_length) + (len(rejected) > max_length)
            out.append((chosen[-max_length:], rejected[-max_length:]))
        return out

    train_enc, heldout_enc = encode(train_pairs), encode(heldout_pairs)

    torch.manual_seed(seed)
    with _quiet_transformers():  # not the load report of the (expected) new score head, nor tqdm bars
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, local_files_only=True, dtype=torch.float32)
    pad_id = pad_id_of(model.config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def heldout_accuracy() -> tuple[Optional[float], tuple[list[float], list[float]]]:
        if not heldout_enc:
            return None, ([], [])
        scores = score_pairs(model, heldout_enc, pad_id, batch_size)
        return pair_accuracy(*scores), scores

    before, _ = heldout_accuracy()
    history: list[dict] = [{"epoch": 0, "heldout_acc": before}]
    steps_per_epoch = math.ceil(len(train_enc) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    model.train()
    train_start = time.perf_counter()
    scores: tuple[list[float], list[float]] = ([], [])
    for epoch in range(1, epochs + 1):
        order = list(range(len(train_enc)))
        random.Random(f"r1mega.rm/{seed}/{epoch}").shuffle(order)
        loss_sum, correct, epoch_start = 0.0, 0, time.perf_counter()
        for first in range(0, len(order), batch_size):
            batch = [train_enc[k] for k in order[first:first + batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / WARMUP_STEPS)
            rewards = _forward(model, [c for c, _ in batch] + [r for _, r in batch], pad_id)
            chosen_B, rejected_B = rewards[:len(batch)], rewards[len(batch):]
            loss = bradley_terry_loss(chosen_B, rejected_B)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss.item() * len(batch)
            correct += int((chosen_B > rejected_B).sum())
            if progress:
                _progress(step, total, loss.item(), correct / min(first + batch_size, len(order)), train_start)
        acc, scores = heldout_accuracy()
        history.append({"epoch": epoch, "loss": loss_sum / len(order), "train_acc": correct / len(order),
                        "heldout_acc": acc, "seconds": time.perf_counter() - epoch_start})
    if progress:
        sys.stderr.write("\n")
    model.eval()

    result = {
        "inputs": {"model": str(model_dir), **(sources or {}), "train_pairs": len(train_enc),
                   "heldout_pairs": len(heldout_enc), "truncated_completions": truncated},
        "settings": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length, "seed": seed,
                     "warmup_steps": WARMUP_STEPS, "optimizer": "AdamW", "grad_clip": 1.0,
                     "loss": "bradley_terry", "use_chat_template": encoder.use_chat_template, "pad_id": pad_id},
        "metrics": {"heldout_acc_before": before, "heldout_acc": history[-1]["heldout_acc"],
                    "train_acc": history[-1]["train_acc"], "loss": history[-1]["loss"], "epochs": history[1:]},
        "seconds": {"train": time.perf_counter() - train_start},
    }
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
        result["seconds"]["total"] = time.perf_counter() - start
        (tmp / "rm.json").write_text(json.dumps(result, indent=2) + "\n")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():  # empty (checked above)
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**result, "out_dir": str(out_dir), "heldout_scores": {"chosen": scores[0], "rejected": scores[1]}}


def embedded_pairs() -> tuple[list[dict], list[dict]]:
    """The embedded default's (train, held-out) pairs: r1mega.data.r1_corpus.preference_pairs of
    the general prompts' train and test splits."""
    return (r1_corpus.preference_pairs(r1_corpus.general_prompts("train")),
            r1_corpus.preference_pairs(r1_corpus.general_prompts("test")))


def rm_command(cfg, *, out: str | Path, progress: bool = True) -> int:
    """``r1mega rm``: a reward model from cfg.run.model (None: the embedded base model) trained on
    cfg.rm.data (None: the embedded pairs) with cfg.rm's settings and the seed run.seed, written to
    `out`; prints its figures."""
    r = cfg.rm
    # every pair checked before any work (the model too is built only after)
    embedded = "r1mega.data.r1_corpus.preference_pairs(general_prompts({!r}))"
    embedded_train, embedded_heldout = embedded_pairs()
    train_pairs = load_preference_pairs(r.data) if r.data else embedded_train
    if r.heldout:
        heldout_pairs = load_preference_pairs(r.heldout)
    else:
        heldout_pairs = [] if r.data else embedded_heldout
    sources = {"data": r.data or embedded.format("train"),
               "heldout": r.heldout or (None if r.data else embedded.format("test"))}
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise ValueError(f"--out {out}: already exists; remove it or choose another directory")
    _, hf_dir = resolve_model(cfg.run.model)
    result = train_reward_model(hf_dir, train_pairs, heldout_pairs, out, progress=progress, sources=sources,
                                epochs=r.epochs, lr=r.lr, batch_size=r.batch_size, max_length=r.max_length,
                                seed=cfg.run.seed)
    m = result["metrics"]
    acc = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"{'held-out pairs':<24}{result['inputs']['heldout_pairs']}")
    print(f"{'held-out accuracy':<24}{acc(m['heldout_acc_before'])} -> {acc(m['heldout_acc'])}")
    print(f"{'train accuracy, loss':<24}{acc(m['train_acc'])}, {m['loss']:.4f} (last epoch)")
    print(f"{'wall time':<24}{result['seconds']['total']:.1f} s ({result['seconds']['train']:.1f} s training)")
    print(f"wrote the reward model to {result['out_dir']}")
    return 0
