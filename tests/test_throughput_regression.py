"""Throughput regression check of the GRPO step (benchmarks/bench_step_phases.py): the real check
against the committed baseline, and its comparison logic and baseline-file validation on their own.

The check runs as a subprocess (it measures in fresh processes of its own); it fails the suite when
a phase (refit, rollout, logprobs, train) of the step is over 1.25x its baseline score twice in a
row. Its scores are normalised by a reference workload measured in the same process, interleaved,
so a slower or steadily loaded machine moves them little; where the reference's own timings vary
too much (a load that comes and goes) the check judges nothing and the test skips, giving the
measured spread. See the script's docstring for what it measures and how to update the baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_step_phases.py"
sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling _common

import bench_step_phases as bench  # noqa: E402


def valid_baseline(**changes) -> dict:
    data = {"phases": {"refit": 0.15, "rollout": 2.0, "logprobs": 2.4, "train": 3.4},
            "workload": bench.Workload().as_dict(), "reason": "first baseline", "date": "2026-01-01T00:00:00+00:00",
            "commit": "0" * 40}
    data.update(changes)
    return data


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---- the comparison ------------------------------------------------------------------------------
def test_within_the_threshold_passes_and_past_it_fails_naming_the_phase():
    base = {"refit": 0.1, "rollout": 2.0, "logprobs": 2.0, "train": 4.0}
    at_limit = {name: score * bench.REGRESSION_FACTOR for name, score in base.items()}
    verdict = bench.compare(at_limit, base)
    assert verdict.ok and verdict.lines == []

    slower = dict(base, train=4.0 * bench.REGRESSION_FACTOR * 1.01)
    verdict = bench.compare(slower, base, source="b.json")
    assert not verdict.ok and verdict.regressions == ["train"]
    (line,) = verdict.lines
    assert "phase 'train'" in line and "5.050" in line and "4.000" in line and "b.json" in line
    assert "--update-baseline --reason" in line


def test_a_remeasured_phase_reports_both_measurements():
    verdict = bench.compare({"train": 6.0}, {"train": 4.0}, remeasured={"train": (6.5, 6.0)})
    assert verdict.regressions == ["train"]
    assert "6.500, then 6.000" in verdict.lines[0] and "the lower counts" in verdict.lines[0]


def test_much_faster_is_a_note_not_a_failure():
    verdict = bench.compare({"rollout": 0.9, "train": 4.0}, {"rollout": 2.0, "train": 4.0})
    assert verdict.ok and verdict.faster == ["rollout"]
    (line,) = verdict.lines
    assert line.startswith("note: phase 'rollout' is much faster") and "--update-baseline" in line


def test_a_phase_missing_on_either_side_fails():
    verdict = bench.compare({"rollout": 2.0, "new_phase": 1.0}, {"rollout": 2.0, "train": 4.0}, source="b.json")
    assert not verdict.ok and sorted(verdict.problems) == ["new_phase", "train"]
    assert any("'train' is in the baseline b.json but was not measured" in line for line in verdict.lines)
    assert any("'new_phase' has no baseline score in b.json" in line for line in verdict.lines)


def test_another_environment_is_a_note():
    env = {"python": "3.11.7", "torch": "2.13.0", "machine": "x86_64", "cpu_count": 2}
    assert bench.environment_notes(env, dict(env)) == []
    (note,) = bench.environment_notes(env, dict(env, torch="2.11.0", cpu_count=16))
    assert note.startswith("note:") and "torch '2.13.0' -> '2.11.0'" in note and "cpu_count 2 -> 16" in note
    assert bench.environment_notes(None, env) == ["note: the baseline records no environment"]


# ---- noise: the reference workload's spread ------------------------------------------------------
def test_reference_spread_is_the_upper_over_the_lower_quartile():
    assert bench.reference_spread([0.07] * 50) == pytest.approx(1.0)
    assert bench.reference_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0)  # quartiles 2 and 4
    # a few outliers (a page fault, one preemption) do not make a steady process noisy
    steady = [0.070 + 0.001 * (i % 5) for i in range(48)] + [0.5, 0.9]
    assert bench.reference_spread(steady) < 1.05
    # a load that comes and goes does
    assert bench.reference_spread([0.07, 0.14] * 25) == pytest.approx(2.0)
    for bad in ([0.1, 0.1, 0.1], [0.1, 0.1, 0.0, 0.1], [0.1, float("nan"), 0.1, 0.1]):
        with pytest.raises(ValueError, match="at least 4 positive timings"):
            bench.reference_spread(bad)


def test_the_spread_is_taken_per_position_of_the_step():
    # After train the reference is steadily slower than after refit: that is no noise, and a quiet
    # machine must not be judged too noisy for it; a position whose timings jump is.
    steady_but_shifted = [[0.070, 0.071, 0.070, 0.071, 0.070], [0.095, 0.096, 0.095, 0.096, 0.095]]
    assert bench.position_spread(steady_but_shifted) < 1.02
    assert bench.reference_spread([t for ts in steady_but_shifted for t in ts]) > 1.3
    jumping = [[0.070, 0.071, 0.070, 0.071, 0.070], [0.07, 0.14, 0.07, 0.14, 0.07, 0.14]]
    assert bench.position_spread(jumping) == pytest.approx(2.0)


def test_a_spread_over_the_limit_is_one_line_giving_it():
    assert bench.noise_line(1.0, 50) is None
    assert bench.noise_line(bench.NOISE_LIMIT, 50) is None
    line = bench.noise_line(1.234, 50)
    assert line.startswith("too noisy to judge") and "\n" not in line
    assert "1.23x" in line and "50 calls" in line and f"limit {bench.NOISE_LIMIT:.2f}x" in line
    assert bench.noise_line(1.05, 50, limit=1.02) is not None


def test_the_deliberate_slowdown_variable():
    assert bench.parse_slowdown(None) == {} and bench.parse_slowdown(" ") == {}
    assert bench.parse_slowdown("rollout=1.4") == {"rollout": 1.4}
    assert bench.parse_slowdown("rollout=2, train=1.3") == {"rollout": 2.0, "train": 1.3}
    for bad in ("rollout", "decode=2", "rollout=0.5", "rollout=fast", "rollout=inf"):
        with pytest.raises(ValueError, match=bench.SLOWDOWN_ENV):
            bench.parse_slowdown(bad)
    import time

    assert bench._timed(lambda: time.sleep(0.02), 2.0) >= 0.04  # busy-waits to factor x the call


BASE = {"refit": 0.15, "rollout": 1.9, "logprobs": 2.3, "train": 3.3}


def fake_measurement(ratio_of_base: dict[str, float] | None = None, spread: float = 1.0) -> dict:
    """What one measuring process returns: 10 steps at the given multiple of the baseline per phase,
    and reference timings whose upper/lower quartile ratio is `spread`."""
    ratio_of_base = ratio_of_base or {}
    phases = {name: [{"seconds": 0.1, "reference_s": 0.07, "ratio": score * ratio_of_base.get(name, 1.0)}] * 10
              for name, score in BASE.items()}
    positions = len(bench.PHASES) + 1
    return {"phases": phases, "reference_s": [[0.07] * 5 + [0.07 * spread] * 5 for _ in range(positions)]}


@pytest.mark.parametrize("processes, code, expect", [
    ([fake_measurement(spread=1.02)], 0, "throughput check passed"),
    ([fake_measurement(spread=1.6)], bench.EXIT_TOO_NOISY, "throughput check skipped: too noisy to judge"),
    # a noisy process judges nothing, even a 2x "regression" (it is not measured again)
    ([fake_measurement({"rollout": 2.0}, spread=1.6)], bench.EXIT_TOO_NOISY, "spread 1.60x"),
    ([fake_measurement({"rollout": 2.0}), fake_measurement({"rollout": 1.9})], bench.EXIT_REGRESSION,
     "THROUGHPUT REGRESSION in phase 'rollout'"),
    ([fake_measurement({"rollout": 2.0}), fake_measurement({"rollout": 1.1})], 0, "throughput check passed"),
    # a regression whose re-measurement is noisy is not confirmed: skipped, neither failed nor passed
    ([fake_measurement({"rollout": 2.0}), fake_measurement({"rollout": 2.0}, spread=1.3)], bench.EXIT_TOO_NOISY,
     "too noisy to judge"),
], ids=["steady-pass", "noisy", "noisy-regression", "steady-regression", "steady-blip", "noisy-remeasure"])
def test_only_steady_measurements_are_judged(tmp_path, monkeypatch, capsys, processes, code, expect):
    base = write(tmp_path / "b.json", valid_baseline(phases=BASE))
    queue = list(processes)
    monkeypatch.setattr(bench, "build_random_model", lambda out, vocab: out)
    monkeypatch.setattr(bench, "measure_in_process", lambda model, repeats, result: queue.pop(0))
    monkeypatch.setattr(bench, "environment", lambda: {"date": "2026-01-01T00:00:00+00:00", "git_commit": None})
    assert bench.main(["--baseline", str(base), "--out", str(tmp_path / "rows.jsonl")]) == code
    assert not queue  # every expected process was measured, none more
    out = capsys.readouterr().out
    assert expect in out, out
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {r["too_noisy"] for r in rows} == {code == bench.EXIT_TOO_NOISY}


def test_no_baseline_from_a_noisy_process(tmp_path, monkeypatch, capsys):
    queue = [fake_measurement(), fake_measurement(spread=1.5)]
    monkeypatch.setattr(bench, "build_random_model", lambda out, vocab: out)
    monkeypatch.setattr(bench, "measure_in_process", lambda model, repeats, result: queue.pop(0))
    new = tmp_path / "new.json"
    code = bench.main(["--update-baseline", "--reason", "r", "--baseline", str(new), "--out", str(tmp_path / "o")])
    assert code == bench.EXIT_TOO_NOISY and not new.exists() and not queue
    assert "no baseline written: too noisy to judge" in capsys.readouterr().out


# ---- the baseline file ---------------------------------------------------------------------------
def test_the_committed_baseline_is_valid_and_covers_every_phase():
    data = bench.load_baseline(bench.BASELINE)
    assert sorted(data["phases"]) == sorted(bench.PHASES)
    assert data["workload"] == bench.Workload().as_dict()


@pytest.mark.parametrize("content, field", [
    ("{not json", "not JSON"),
    ([1, 2], "must be a JSON object"),
    (valid_baseline(phases={}), "field 'phases'"),
    (valid_baseline(phases=[1.0]), "field 'phases'"),
    (valid_baseline(phases={"train": "fast"}), "field 'phases.train'"),
    (valid_baseline(phases={"train": -1.0}), "field 'phases.train'"),
    (valid_baseline(phases={"train": True}), "field 'phases.train'"),
    (valid_baseline(workload=None), "field 'workload'"),
    (valid_baseline(reason="  "), "field 'reason'"),
    (valid_baseline(commit=None), "field 'commit'"),
])
def test_a_malformed_baseline_is_one_line_naming_the_file_and_field(tmp_path, content, field):
    path = write(tmp_path / "baseline.json", content)
    with pytest.raises(bench.BaselineError) as err:
        bench.load_baseline(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and field in message


def test_a_missing_baseline_says_how_to_make_one(tmp_path):
    with pytest.raises(bench.BaselineError, match="no baseline file.*--update-baseline"):
        bench.load_baseline(tmp_path / "absent.json")


def run_script(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_bad_inputs_are_refused_before_any_measurement(tmp_path):
    out = tmp_path / "rows.jsonl"
    bad = run_script("--baseline", str(write(tmp_path / "b.json", valid_baseline(phases={"train": 0}))),
                     "--out", str(out), timeout=60)
    assert bad.returncode == 2 and "field 'phases.train'" in bad.stderr and not out.exists()
    other = valid_baseline(workload=dict(bench.Workload().as_dict(), new_tokens=999))
    mismatch = run_script("--baseline", str(write(tmp_path / "w.json", other)), "--out", str(out), timeout=60)
    assert mismatch.returncode == 2 and "field 'workload'" in mismatch.stderr and not out.exists()
    no_reason = run_script("--update-baseline", "--baseline", str(tmp_path / "new.json"), timeout=60)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr and not (tmp_path / "new.json").exists()


# ---- the check itself ----------------------------------------------------------------------------
def test_no_phase_of_the_grpo_step_is_slower_than_its_baseline(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = run_script("--out", str(out))
    report = f"\n{result.stdout}\n{result.stderr[-3000:]}"
    if result.returncode == bench.EXIT_TOO_NOISY:  # the machine's noise hides a 1.25x slowdown
        pytest.skip(next(line for line in result.stdout.splitlines() if "too noisy to judge" in line))
    assert result.returncode == 0, report
    print(report)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["phase"] for r in rows] == list(bench.PHASES)
    assert all(r["score"] > 0 and r["seconds"] > 0 for r in rows)
