"""What a user watches: metrics.jsonl, TensorBoard events, samples.jsonl, eval.jsonl, a progress
line, and a PNG of the curves (``r1mega plot RUN``). Only rank 0 writes.

Every file is append-only JSON lines, one object per step; on resume each is cut back to the
checkpoint's step first (:func:`truncate_after`), so a resumed run's files equal an uninterrupted
run's.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from r1mega.utils.io import atomic_write_bytes

METRICS, SAMPLES, EVAL = "metrics.jsonl", "samples.jsonl", "eval.jsonl"


def is_timing(key: str) -> bool:
    """Whether a metric is a timing (time_*, *seconds, *tokens_per_s): timings differ between runs of
    the same computation; every other metric in metrics.jsonl must not."""
    return key.startswith("time_") or key.endswith("seconds") or key.endswith("tokens_per_s")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def truncate_after(path: Path, step: int) -> None:
    """Keep the lines of a JSONL file whose "step" is <= step (atomically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if row.get("step", -1) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


class RunLog:
    """The run directory's logs; a no-op object on ranks other than 0."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, wandb: bool, config: dict,
                 total_steps: int):
        self.run_dir, self.enabled, self.total_steps = Path(run_dir), enabled, total_steps
        self.tb = self.wb = None
        self.start = time.perf_counter()
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise RuntimeError("run.wandb: true, but the wandb package is not installed (pip install wandb)") from None
            self.wb = wandb_module.init(project="r1mega", name=self.run_dir.name, config=config)

    def _append(self, name: str, row: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            self._append(METRICS, {"step": step, **metrics})
            self._scalars(metrics, step)

    def samples(self, step: int, rows: list[dict]) -> None:
        if self.enabled:
            for row in rows:
                self._append(SAMPLES, {"step": step, **row})

    def evaluation(self, step: int, result: dict[str, float]) -> None:
        if self.enabled:
            self._append(EVAL, {"step": step, **result})
            self._scalars({f"eval/{k}": v for k, v in result.items()}, step)

    def _scalars(self, values: dict[str, Any], step: int) -> None:
        """TensorBoard (the finite numbers; "." in a key becomes "/") and W&B."""
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key.replace(".", "/"), value, step)
            self.tb.flush()
        if self.wb is not None:
            self.wb.log(values, step=step)

    def progress(self, step: int, metrics: dict[str, float], first_step: int, *, line: Optional[str] = None) -> None:
        """The progress line: bar, `line` (default: the GRPO reward, accuracy and rollout speed), eta."""
        if not self.enabled:
            return
        done = step + 1 - first_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (self.total_steps - step - 1)
        bar = "#" * int(24 * (step + 1) / self.total_steps)
        if line is None:
            line = (f"reward {metrics.get('reward_mean', 0):.3f} acc {metrics.get('accuracy', float('nan')):.3f} "
                    f"tok/s {metrics.get('rollout_tokens_per_s', 0):.0f}")
        sys.stderr.write(f"\rstep {step + 1}/{self.total_steps} [{bar:<24}] {line} eta {eta:.0f}s   ")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\n" + text + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] if Path(path).is_file() else []


def plot_run(run_dir: str | Path, out: Optional[str | Path] = None, *, panels: tuple[tuple[str, str], ...]) -> Path:
    """A PNG of the main curves of a run directory: `panels`, (metric, title) pairs of the job that
    wrote it (at most 6: r1mega.run.panels), then held-out pass@1 and the gradient norm; written to `out` (default run_dir/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / METRICS)
    evals = read_jsonl(run_dir / EVAL)
    if not metrics:
        raise FileNotFoundError(f"{run_dir}: no {METRICS} (is it a run directory?)")
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        ys = [m.get(key) for m in metrics]
        ax.plot(steps, [y if y is not None else float("nan") for y in ys])
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes.flat[len(panels)]
    if evals:
        ax.plot([e["step"] for e in evals], [e["pass_at_1"] for e in evals], marker="o")
    ax.set_title("held-out pass@1")
    ax.set_xlabel("step")
    ax = axes.flat[len(panels) + 1]
    ax.plot(steps, [m.get("grad_norm") or float("nan") for m in metrics])
    ax.set_title("grad norm")
    ax.set_xlabel("step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out
