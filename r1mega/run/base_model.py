"""``r1mega pretrain``: the embedded default's base model, made from scratch on 2 CPU cores.

A byte-level BPE tokenizer is trained on the base corpus (:mod:`r1mega.data.base_corpus`), then the
tiny Qwen3-MoE (:func:`r1mega.models.tiny.tiny_moe_config`), or for ``arch="llama"``/``"qwen2"``
the tiny dense student of distillation (:func:`r1mega.models.tiny.tiny_dense_config`,
:data:`STUDENT_SPEC`), learns the corpus as a language model (every token, AdamW, linear warm-up
then cosine decay) in plain PyTorch on the transformers model class. The tokenizer depends only on
the corpus fields of the spec (train_problems, noise, seed, vocab_size), so specs that share them,
such as the default and :data:`STUDENT_SPEC`, make models with the same vocabulary. The result is
an ordinary Hugging Face directory (config, safetensors, tokenizer, generation config) that
``transformers`` loads, written atomically, with ``pretrain.json`` recording how it was made.
Bitwise reproducible for a given spec on one machine (and torch build): pretraining runs
PretrainSpec.threads intra-op threads whatever ``OMP_NUM_THREADS`` is. Not across machines: their
kernels differ, and that cannot be part of the cache key.

:func:`ensure_base_model` builds it once into a cache directory keyed by the spec and reuses it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from r1mega.data import base_corpus
from r1mega.models.tiny import tiny_dense_config, tiny_moe_config
from r1mega.models.tokenizer import build_tokenizer
from r1mega.templates import R1_CHAT_TEMPLATE
from r1mega.utils.io import atomic_write_text

VERSION = 3  # bump when the corpus, the model or the recipe changes what a spec produces (3: PretrainSpec.threads)
ARCHS = ("qwen3_moe", "llama", "qwen2")  # PretrainSpec.arch: the MoE default, the dense students


@dataclass(frozen=True)
class PretrainSpec:
    """What the base model is made from; its hash names the cache entry."""

    steps: int = 1400
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    noise: float = 0.5  # share of corpus documents whose final answer is wrong
    train_problems: int = 5000
    vocab_size: int = 512
    seed: int = 0
    arch: str = "qwen3_moe"  # qwen3_moe (tiny_moe_config), or llama / qwen2 (tiny_dense_config)
    num_layers: Optional[int] = None  # dense archs: tiny_dense_config's sizes where None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    # The matmul kernels' reduction order, hence the weights, depends on the intra-op thread count:
    # pretraining always uses this many threads, whatever OMP_NUM_THREADS says, so that one machine
    # always builds the same base. What else changes the bits (the CPU's vector unit, the torch
    # build's kernels) cannot be hashed: the same spec gives other weights on another machine.
    threads: int = 2

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"PretrainSpec.arch: {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.arch == "qwen3_moe" and any(getattr(self, f) is not None for f in _SIZES):
            raise ValueError(f"PretrainSpec: {', '.join(_SIZES)} apply to the dense archs only")
        if self.threads < 1:
            raise ValueError(f"PretrainSpec.threads: {self.threads} < 1")

    def key(self) -> str:
        # Fields added after VERSION 2 (before VERSION 3) enter the hash only when they differ from
        # their defaults; threads always does.
        values = asdict(self)
        for f in fields(self):
            if f.name in _ADDED and values[f.name] == f.default:
                del values[f.name]
        text = json.dumps({"version": VERSION, **values}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def cache_name(self) -> str:
        """The cache entry's directory name: tiny-base-<key> for the MoE, tiny-<arch>-<key> else."""
        return f"tiny-base-{self.key()}" if self.arch == "qwen3_moe" else f"tiny-{self.arch}-{self.key()}"

    def model_config(self, tokenizer) -> dict:
        """The config.json (as a dict) of the model this spec pretrains, for `tokenizer`."""
        ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if self.arch == "qwen3_moe":
            cfg = tiny_moe_config(vocab_size=len(tokenizer), **ids)
        else:
            sizes = {f: getattr(self, f) for f in _SIZES if getattr(self, f) is not None}
            cfg = tiny_dense_config(vocab_size=len(tokenizer), arch=self.arch, **ids, **sizes)
        cfg["bos_token_id"] = tokenizer.bos_token_id
        return cfg


_SIZES = ("num_layers", "hidden_size", "intermediate_size")
_ADDED = ("arch", *_SIZES)

# The distillation student (r1mega distill): a dense Llama-3 of tiny_dense_config's sizes (a fifth
# of the teacher's parameters) on the same corpus, hence the same tokenizer as the default, for as
# many steps. Measured (2 cores, 2026-12-04): 68 s to pretrain; held-out pass@1 on the R1 split
# 0.207 (the teacher's base 0.235); distilled on the pipeline's stage-3 data 0.325. With 600
# steps its base was 0.177 and the distilled student fell to 0.075: too weak a base to learn
# where the boxed answer's digits come from.
STUDENT_SPEC = PretrainSpec(arch="llama", steps=1400)


def default_cache() -> Path:
    """$R1MEGA_CACHE, else ~/.cache/r1mega."""
    return Path(os.environ.get("R1MEGA_CACHE") or Path.home() / ".cache" / "r1mega")


def _progress(step: int, total: int, loss: float, start: float) -> None:
    elapsed = time.perf_counter() - start
    eta = elapsed / max(step, 1) * (total - step)
    bar = "#" * int(30 * step / total)
    sys.stderr.write(f"\rpretrain [{bar:<30}] {step}/{total} loss {loss:.3f} {elapsed:.0f}s, eta {eta:.0f}s ")
    sys.stderr.flush()


def pretrain_base_model(out_dir: str | Path, spec: PretrainSpec = PretrainSpec(), *, progress: bool = True) -> Path:
    """Build the tokenizer and pretrain the base model into `out_dir` (must not exist), with
    spec.threads intra-op threads (restored after)."""
    import torch

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists")
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        return _pretrain(out_dir, spec, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(out_dir: Path, spec: PretrainSpec, *, progress: bool) -> Path:
    import torch
    import transformers

    start = time.perf_counter()
    records = base_corpus.problems("train", spec.train_problems, seed=spec.seed)
    texts = base_corpus.corpus(records, noise=spec.noise, seed=spec.seed)
    tokenizer = build_tokenizer(texts, vocab_size=spec.vocab_size)
    docs = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    cfg = spec.model_config(tokenizer)
    torch.manual_seed(spec.seed)
    config = transformers.AutoConfig.for_model(**cfg)
    extra = {"experts_implementation": "grouped_mm"} if spec.arch == "qwen3_moe" else {}
    model = transformers.AutoModelForCausalLM.from_config(config, **extra).float()
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                  lr=spec.lr, betas=(0.9, 0.95))
    rng = random.Random(spec.seed)
    pad = tokenizer.pad_token_id
    loss_value = float("nan")
    for step in range(spec.steps):
        batch = rng.sample(docs, spec.batch_size)
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        for i, doc in enumerate(batch):
            ids[i, :len(doc)] = torch.tensor(doc)
            labels[i, :len(doc)] = ids[i, :len(doc)]
        warm = min(1.0, (step + 1) / spec.warmup_steps)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * warm * cosine
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if progress and (step % 10 == 0 or step + 1 == spec.steps):
            _progress(step + 1, spec.steps, loss_value, start)
    if progress:
        sys.stderr.write("\n")

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / "pretrain.json", json.dumps({
        "spec": asdict(spec), "version": VERSION, "key": spec.key(), "final_loss": loss_value,
        "documents": len(docs), "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "corpus": "r1mega.data.base_corpus (two-digit addition, R1-Zero template, compact completions)",
    }, indent=2) + "\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def spec_from_config(cfg) -> PretrainSpec:
    """The PretrainSpec of a config's pretrain section (its defaults are PretrainSpec's)."""
    p = cfg.pretrain
    return PretrainSpec(steps=p.steps, batch_size=p.batch_size, lr=p.lr, warmup_steps=p.warmup_steps, noise=p.noise,
                        train_problems=p.train_problems, vocab_size=p.vocab_size, seed=p.seed, arch=p.arch,
                        num_layers=p.num_layers, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                        threads=p.threads)


def pretrain_command(cfg, *, progress: bool = True) -> int:
    """``r1mega pretrain``: the base model cfg.pretrain describes, into cfg.pretrain.out or (None)
    the cache; prints its path."""
    spec = spec_from_config(cfg)
    out = cfg.pretrain.out
    print(pretrain_base_model(out, spec, progress=progress) if out else ensure_base_model(spec=spec, progress=progress))
    return 0


def ensure_base_model(cache: Optional[str | Path] = None, spec: PretrainSpec = PretrainSpec(), *,
                      progress: bool = True, chat: bool = False) -> Path:
    """The cached base model of `spec`, pretrained first if absent (minutes, once). `chat`: the
    same weights with r1mega.templates.R1_CHAT_TEMPLATE as the tokenizer's chat template (the
    R1 stages' prompt format; see :func:`with_chat_template`)."""
    root = Path(cache) if cache is not None else default_cache()
    path = root / spec.cache_name()
    chat_path = root / f"{spec.cache_name()}-chat"
    want = chat_path if chat else path
    if (want / "pretrain.json").is_file():
        return want
    root.mkdir(parents=True, exist_ok=True)
    # Two processes asking for the same entry (two pipelines side by side): the second waits for
    # the first to build it instead of building it again and failing to move it into place.
    with open(root / f".{spec.cache_name()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "pretrain.json").is_file():
            if progress:
                what = "base model" if spec.arch == "qwen3_moe" else f"dense {spec.arch} student base"
                sys.stderr.write(f"building the embedded {what} into {path} (once; a few minutes on 2 cores)\n")
            pretrain_base_model(path, spec, progress=progress)
        if chat and not (chat_path / "pretrain.json").is_file():
            with_chat_template(path, chat_path)
    return want


def ensure_student_base(cache: Optional[str | Path] = None, *, progress: bool = True) -> Path:
    """The cached base model of :data:`STUDENT_SPEC` (the dense distillation student, same
    tokenizer as the default base), pretrained first if absent (about a minute, once)."""
    return ensure_base_model(cache, STUDENT_SPEC, progress=progress)


def with_chat_template(src: str | Path, dst: str | Path, template: Optional[str] = None) -> Path:
    """A copy of the HF directory `src` at `dst` (written atomically) whose tokenizer has the chat
    template `template` (default r1mega.templates.R1_CHAT_TEMPLATE)."""
    import transformers

    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    tokenizer.chat_template = template or R1_CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst
