"""Prompt datasets: local JSONL/Parquet files and shipped synthetic verifiable tasks.

- :func:`load_prompts` / :func:`write_prompts` (r1mega.data.loader): read and validate local
  datasets into :class:`PromptRecord` lists; malformed rows fail with one :class:`DataError` line
  naming the file, the row and the field.
- published formats (r1mega.data.formats: GSM8K, MATH, AIME/AMC, DeepScaleR, HumanEval, MBPP,
  APPS/TACO; ``data.format``), directories of shards and ``datasets`` save_to_disk directories;
- :func:`fit_prompts` (r1mega.data.budget): prompts against the token budget when the data loads
  (``data.overlong_prompts``: error or filter);
- :class:`PromptSampler` (r1mega.data.sampler): deterministic per-epoch shuffling in batches,
  with a resumable (epoch, position) state and optional data-parallel slicing.
- r1mega.data.synthetic: arithmetic, Countdown and programming generators with held-out splits
  and R1-format solution writers (imported on demand; nothing is downloaded).
"""

from r1mega.data.budget import fit_prompts, prompt_lengths
from r1mega.data.formats import FORMATS
from r1mega.data.loader import (DataError, RowError, load_completions, load_prompts, read_checked_rows, read_rows,
                                write_prompts)
from r1mega.data.records import LANGUAGES, TASKS, PromptRecord
from r1mega.data.sampler import PromptSampler, epoch_permutation

__all__ = ["FORMATS", "LANGUAGES", "TASKS", "DataError", "fit_prompts", "prompt_lengths", "PromptRecord", "RowError", "PromptSampler", "epoch_permutation", "load_completions",
           "load_prompts", "read_checked_rows", "read_rows", "write_prompts"]
