"""Throughput regression check of the GRPO step (benchmarks/bench_step_phases.py): the real check
against the committed baseline, and its comparison logic and baseline-file validation on their own.

The check runs as a subprocess (it measures in fresh processes of its own); it fails the suite when
a phase (refit, rollout, logprobs, train) of the step is over 1.25x its baseline score twice in a
row. Its scores are normalised by a reference workload measured in the same process, interleaved,
so a slower or steadily loaded machine moves them little, and judged against the baseline of this
CPU model; where a phase's score interval straddles the limit (a load that comes and goes) or this
CPU has no baseline, the check judges nothing and the test skips, giving the reason. See the
script's docstring for what it measures and how to update the baseline.
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


# ---- noise: the confidence interval of each phase's score -----------------------------------------
def test_median_interval_is_the_order_statistics_of_a_binomial_95_percent_interval():
    # n = 10: P(Binomial(10, 1/2) <= 1) = 11/1024 <= 2.5% < P(<= 2) = 56/1024: the 2nd and 9th smallest
    assert bench.median_interval([float(x) for x in (9, 1, 10, 2, 8, 3, 7, 4, 6, 5)]) == (2.0, 9.0)
    assert bench.median_interval([1.0, 2, 3, 4, 5, 6]) == (1.0, 6.0)  # 1/64 <= 2.5%: the extremes
    assert bench.median_interval([float(x) for x in range(1, 21)]) == (6.0, 15.0)  # P(<= 5) = 2.1%
    # against a brute-force coverage: at least 95% of medians of random draws lie inside
    import random
    rng = random.Random(0)
    inside = sum(lo <= 0.5 <= hi for lo, hi in (bench.median_interval([rng.random() for _ in range(10)])
                                                 for _ in range(4000)))
    assert 0.965 <= inside / 4000 <= 0.99, inside  # 97.9% expected
    # one outlier (a preemption) moves neither bound far
    assert bench.median_interval([2.0] * 9 + [40.0]) == (2.0, 2.0)
    for bad in ([1.0] * 5, [1.0] * 5 + [0.0], [1.0] * 5 + [float("nan")]):
        with pytest.raises(ValueError, match=f"at least {bench.MIN_REPEATS} positive"):
            bench.median_interval(bad)


def test_a_phase_is_judged_only_when_its_interval_is_on_one_side_of_the_limit():
    base = {"rollout": 2.0, "train": 4.0}
    assert bench.undecided({"rollout": (1.9, 2.3), "train": (5.1, 5.5)}, base) == []  # within; surely over
    assert bench.undecided({"rollout": (2.4, 2.6), "train": (4.0, 4.2)}, base) == ["rollout"]  # 2.5 inside
    assert bench.noise_line({"rollout": (1.9, 2.3)}, base, 10) is None
    line = bench.noise_line({"rollout": (2.4, 2.6), "train": (4.0, 4.2)}, base, 10)
    assert line.startswith("too noisy to judge") and "\n" not in line
    assert "rollout 1.20-1.30x" in line and "10 steps" in line and "1.25x limit" in line and "train" not in line


def test_a_new_baseline_needs_processes_that_agree():
    assert bench.disagreement([{"rollout": 2.0, "train": 4.0}, {"rollout": 2.1, "train": 4.3}]) is None
    line = bench.disagreement([{"rollout": 2.0, "train": 4.0}, {"rollout": 2.4, "train": 4.1}, {"rollout": 2.1,
                                                                                            "train": 4.0}])
    assert line.startswith("too noisy to judge") and "rollout differ by 1.20x" in line and "train" not in line


def test_each_cpu_model_has_its_own_baseline_file():
    assert bench.baseline_path("AMD EPYC") == bench.BASELINE_DIR / "amd-epyc.json"
    assert bench.baseline_path("Intel(R) Xeon(R) Platinum 8480+") == \
        bench.BASELINE_DIR / "intel-r-xeon-r-platinum-8480.json"


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


def fake_measurement(ratio_of_base: dict[str, float] | None = None, jitter: float | dict[str, float] = 0.0) -> dict:
    """What one measuring process returns: 10 steps per phase at the given multiple of the baseline,
    the per-step ratios spread evenly over +-`jitter` (relative; one for all phases or per phase)."""
    ratio_of_base = ratio_of_base or {}
    spread = jitter if isinstance(jitter, dict) else dict.fromkeys(BASE, jitter)
    return {"phases": {name: [{"seconds": 0.1, "reference_s": 0.07,
                               "ratio": score * ratio_of_base.get(name, 1.0) * (1 + spread.get(name, 0.0) * (i - 4.5) / 4.5)}
                              for i in range(10)] for name, score in BASE.items()}}


@pytest.mark.parametrize("processes, code, expect", [
    ([fake_measurement(jitter=0.05)], 0, "throughput check passed"),
    # 1.2x with +-10%: the interval straddles 1.25x, so it judges nothing (neither pass nor fail)
    ([fake_measurement({"rollout": 1.2}, jitter=0.1)], bench.EXIT_TOO_NOISY,
     "throughput check skipped: too noisy to judge"),
    ([fake_measurement({"rollout": 2.0}, jitter=0.5)], bench.EXIT_TOO_NOISY, "rollout"),
    ([fake_measurement({"rollout": 2.0}), fake_measurement({"rollout": 1.9})], bench.EXIT_REGRESSION,
     "THROUGHPUT REGRESSION in phase 'rollout'"),
    ([fake_measurement({"rollout": 2.0}), fake_measurement({"rollout": 1.1})], 0, "throughput check passed"),
    # a regression whose re-measurement is undecided is not confirmed: skipped, neither failed nor passed
    ([fake_measurement({"rollout": 2.0}), fake_measurement({"rollout": 1.25}, jitter=0.2)], bench.EXIT_TOO_NOISY,
     "too noisy to judge"),
    # each phase on its own: a confirmed regression fails even where another phase is unsure
    ([fake_measurement({"rollout": 1.45, "refit": 1.1}, jitter={"refit": 0.3}),
      fake_measurement({"rollout": 1.4, "refit": 1.1}, jitter={"refit": 0.3})], bench.EXIT_REGRESSION,
     "THROUGHPUT REGRESSION in phase 'rollout'"),
], ids=["steady-pass", "straddles", "wide-regression", "steady-regression", "steady-blip", "noisy-remeasure",
        "regression-beside-an-unsure-phase"])
def test_only_decided_measurements_are_judged(tmp_path, monkeypatch, capsys, processes, code, expect):
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


def test_no_baseline_from_processes_that_disagree(tmp_path, monkeypatch, capsys):
    queue = [fake_measurement(), fake_measurement({"train": 1.2}), fake_measurement()]
    monkeypatch.setattr(bench, "build_random_model", lambda out, vocab: out)
    monkeypatch.setattr(bench, "measure_in_process", lambda model, repeats, result: queue.pop(0))
    new = tmp_path / "new.json"
    code = bench.main(["--update-baseline", "--reason", "r", "--baseline", str(new), "--out", str(tmp_path / "o")])
    assert code == bench.EXIT_TOO_NOISY and not new.exists() and not queue
    assert "no baseline written: too noisy to judge" in capsys.readouterr().out


def test_a_cpu_without_a_baseline_is_a_skip_saying_how_to_record_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "BASELINE_DIR", tmp_path)
    monkeypatch.setattr(bench, "cpu_model", lambda: "Some CPU 9000")
    monkeypatch.setattr(bench, "measure_in_process", lambda *a: pytest.fail("measured without a baseline"))
    assert bench.main(["--out", str(tmp_path / "rows.jsonl")]) == bench.EXIT_NO_BASELINE
    out = capsys.readouterr().out
    assert out.startswith("throughput check skipped: no baseline for this CPU (Some CPU 9000)") and out.count("\n") == 1
    assert str(tmp_path / "some-cpu-9000.json") in out and "--update-baseline" in out
    # --update-baseline writes that CPU's file
    monkeypatch.setattr(bench, "build_random_model", lambda out, vocab: out)
    monkeypatch.setattr(bench, "measure_in_process", lambda model, repeats, result: fake_measurement(jitter=0.02))
    monkeypatch.setattr(bench, "environment", lambda: {"date": "2026-01-01T00:00:00+00:00", "git_commit": "abc"})
    assert bench.main(["--update-baseline", "--reason", "first", "--out", str(tmp_path / "rows.jsonl")]) == 0
    written = bench.load_baseline(tmp_path / "some-cpu-9000.json")
    assert written["phases"] == pytest.approx(BASE, rel=1e-3) and written["reason"] == "first"


# ---- the baseline file ---------------------------------------------------------------------------
def test_the_committed_baselines_are_valid_and_cover_every_phase():
    files = sorted(bench.BASELINE_DIR.glob("*.json"))
    assert files, f"no baseline in {bench.BASELINE_DIR}"
    for path in files:
        data = bench.load_baseline(path)
        assert sorted(data["phases"]) == sorted(bench.PHASES)
        assert data["workload"] == bench.Workload().as_dict()
        assert bench.baseline_path(data["environment"]["cpu_model"]) == path  # measured on the CPU it is named for


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
@pytest.mark.alone
def test_no_phase_of_the_grpo_step_is_slower_than_its_baseline(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = run_script("--out", str(out))
    report = f"\n{result.stdout}\n{result.stderr[-3000:]}"
    if result.returncode in (bench.EXIT_TOO_NOISY, bench.EXIT_NO_BASELINE):  # noise; another CPU
        pytest.skip(next(line for line in result.stdout.splitlines() if "throughput check skipped" in line))
    assert result.returncode == 0, report
    print(report)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["phase"] for r in rows] == list(bench.PHASES)
    assert all(r["score"] > 0 and r["seconds"] > 0 for r in rows)
