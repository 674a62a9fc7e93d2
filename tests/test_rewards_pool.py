"""CompositeReward (weighted sums) and RewardPool (worker processes with deadlines).

The misbehaving rewards are module-level so the pool's workers can import them from here.
"""

from __future__ import annotations

import os
import time

import pytest

from r1mega.data.records import PromptRecord
from r1mega.rewards import CompositeReward, RewardOutput, RewardPool, weighted_total


def hang_reward(record, completion):
    """Sleeps forever on completions saying "hang"."""
    if "hang" in completion:
        while True:
            time.sleep(60)
    return RewardOutput(1.0, {"pid": os.getpid()})


def crash_reward(record, completion):
    """Kills its process on completions saying "crash" (as a segfault would)."""
    if "crash" in completion:
        os._exit(3)
    return RewardOutput(0.5)


def raise_reward(record, completion):
    if "raise" in completion:
        raise RuntimeError("verifier bug")
    return RewardOutput(0.25)


def id_reward(record, completion, *, scale=1.0):
    """The record's numeric id, to check the order of results."""
    return RewardOutput(float(record.id) * scale)


def child_reward(record, completion):
    """Starts a child process that would outlive a killed worker, then hangs."""
    import subprocess

    child = subprocess.Popen(["sleep", "300"])
    with open(completion, "w") as f:
        f.write(str(child.pid))
    time.sleep(300)
    return RewardOutput(0.0)


def killed_once_reward(record, completion):
    """Its worker is killed (SIGKILL, as by the OOM killer) the first time it scores `completion`,
    a marker file's path; the second time it scores 1."""
    if not os.path.exists(completion):
        open(completion, "w").close()
        os.kill(os.getpid(), 9)
    return RewardOutput(1.0)


EXTRA = {"hang": hang_reward, "crash": crash_reward, "raise": raise_reward, "id": id_reward,
         "child": child_reward, "killed_once": killed_once_reward}
GOOD = "<think>1 + 1 makes two</think> <answer>2</answer>"


def math_record(i: int, language: str | None = "en") -> PromptRecord:
    return PromptRecord(id=str(i), prompt="What is 1 + 1?", task="math", answer="2", language=language)


@pytest.fixture(scope="module")
def pool():
    with RewardPool({"accuracy": 1.0, "format": 0.5, "language": 0.1, "hang": 1.0, "crash": 1.0,
                     "raise": 1.0, "id": 0.0},
                    rewards=EXTRA, workers=2, timeout_s=60.0, timeouts={"hang": 1.0}) as pool:
        yield pool  # only "hang" needs its deadline to fire; the others get headroom on a loaded machine


# ---- composite ----------------------------------------------------------------------------------


def test_composite_weighted_sum():
    composite = CompositeReward({"accuracy": 1.0, "format": 0.5, "language": 0.25})
    good = composite(math_record(0), GOOD)
    assert good.values == {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    assert good.total == pytest.approx(1.75)
    wrong = composite(math_record(0), "<think>我们算一下</think> <answer>3</answer>")
    assert wrong.values == {"accuracy": 0.0, "format": 1.0, "language": 0.0}
    assert wrong.total == pytest.approx(0.5)
    assert wrong.info["accuracy"]["reason"] == "not equivalent"


def test_composite_skipped_errors_and_zero_weights():
    composite = CompositeReward({"accuracy": 2.0, "language": 1.0, "raise": 1.0, "id": 0.0},
                                rewards=EXTRA, options={"id": {"scale": 10.0}})
    out = composite(math_record(7, language=None), "\\boxed{2} raise")
    assert out.values == {"accuracy": 1.0, "language": None, "raise": 0.0, "id": 70.0}
    assert out.total == pytest.approx(2.0)  # weight 0: reported, not added; skipped adds nothing
    assert out.errors == {"raise": "RuntimeError: verifier bug"}
    assert weighted_total({"a": 2.0, "b": 1.0}, {"a": 0.5, "b": None}) == 1.0
    # A bad gold answer is an error of that reward, not of the composite.
    bad = composite(PromptRecord(id="1", prompt="", task="math", answer="\\frac{"), "\\boxed{1}")
    assert bad.values["accuracy"] == 0.0 and "GoldAnswerError" in bad.errors["accuracy"]


def test_weights_validation():
    with pytest.raises(ValueError, match="non-empty mapping"):
        CompositeReward({})
    with pytest.raises(ValueError, match="unknown reward 'acuracy'; did you mean 'accuracy'"):
        CompositeReward({"acuracy": 1.0})
    with pytest.raises(ValueError, match=r"weights\['format'\] must be a finite number"):
        CompositeReward({"format": float("nan")})
    with pytest.raises(ValueError, match=r"options\['language'\] is given but"):
        CompositeReward({"format": 1.0}, options={"language": {}})
    with pytest.raises(ValueError, match="module-level function"):
        RewardPool({"lambda": 1.0}, rewards={"lambda": lambda r, c: RewardOutput(1.0)})
    with pytest.raises(ValueError, match=r"timeouts\['format'\]"):
        RewardPool({"accuracy": 1.0}, timeouts={"format": 1.0})
    with pytest.raises(ValueError, match="workers"):
        RewardPool({"accuracy": 1.0}, workers=0)


# ---- pool ---------------------------------------------------------------------------------------


def test_pool_matches_composite_and_keeps_order(pool):
    records = [math_record(i, language=None if i % 3 == 0 else "en") for i in range(12)]
    completions = [GOOD if i % 2 else f"<think>guess</think> <answer>{i}</answer>" for i in range(12)]
    scored = pool.score(records, completions)
    composite = CompositeReward(pool.weights, rewards=EXTRA)
    for i, (sample, record, completion) in enumerate(zip(scored, records, completions)):
        expected = composite(record, completion)
        assert sample.values == expected.values
        assert sample.total == pytest.approx(expected.total)
        assert sample.values["id"] == float(i)  # input order
        assert sample.errors == {} and sample.timeouts == ()
    assert pool.score([], []) == []


def test_hang_is_timed_out_and_the_pool_keeps_working(pool):
    pool.summary()  # reset
    restarts = pool.restarts
    records = [math_record(i) for i in range(4)]
    start = time.monotonic()
    scored = pool.score(records, [GOOD, "hang", GOOD, "\\boxed{2} hang"])
    assert time.monotonic() - start < 60  # the 1 s deadlines fired: not the 60 s default
    for i in (1, 3):
        assert scored[i].values["hang"] == 0.0
        assert scored[i].timeouts == ("hang",)
        assert "timed out after 1 s" in scored[i].errors["hang"]
        assert scored[i].values["crash"] == 0.5  # the sample's other rewards still count
    assert scored[3].values["accuracy"] == 1.0
    assert scored[3].total == pytest.approx(1.0 + 0.5 + 0.25 + 0.1 * 1.0)
    assert [s.values["hang"] for s in scored] == [1.0, 0.0, 1.0, 0.0]
    assert pool.restarts == restarts + 2
    summary = pool.summary()
    assert summary["hang"]["timeouts"] == 2 and summary["hang"]["errors"] == 2
    assert summary["hang"]["mean"] == 0.5 and summary["hang"]["seconds"] >= 2.0
    assert summary["accuracy"]["errors"] == 0
    # The next batch runs normally on the replacement workers.
    assert [s.values["hang"] for s in pool.score(records[:2], [GOOD, GOOD])] == [1.0, 1.0]


def test_crashing_worker_gives_zero_and_error(pool):
    records = [math_record(i) for i in range(5)]
    scored = pool.score(records, [GOOD, "crash", GOOD, "raise", "crash"])
    for i in (1, 4):
        assert scored[i].values["crash"] == 0.0
        assert scored[i].errors["crash"] == "worker process died (exit code 3), 2 times on this task"
        assert scored[i].timeouts == ()
    assert scored[3].values["raise"] == 0.0 and scored[3].errors == {"raise": "RuntimeError: verifier bug"}
    assert [s.values["id"] for s in scored] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert scored[0].values["crash"] == 0.5 and scored[0].errors == {}
    assert pool.score(records[:1], [GOOD])[0].errors == {}


def test_a_worker_killed_mid_batch_costs_nothing(tmp_path):
    """A worker killed from outside while scoring (the OOM killer, an operator): its task is run
    again on a fresh worker and scores as if nothing happened; the rest of the batch too."""
    markers = [str(tmp_path / f"m{i}") for i in range(4)]
    with RewardPool({"killed_once": 1.0}, rewards=EXTRA, workers=2, timeout_s=30.0) as pool:
        scored = pool.score([math_record(i) for i in range(4)], markers)
        assert [s.values["killed_once"] for s in scored] == [1.0] * 4
        assert all(s.errors == {} for s in scored) and pool.restarts == 4
    assert all(os.path.exists(m) for m in markers)


def test_summary_counts(pool):
    pool.summary()
    pool.score([math_record(0, language=None), math_record(1)], [GOOD, "<answer>2</answer>"])
    summary = pool.summary()
    assert summary["accuracy"] == pytest.approx(
        {"mean": 1.0, "count": 2, "skipped": 0, "errors": 0, "timeouts": 0,
         "seconds": summary["accuracy"]["seconds"]})
    assert summary["format"]["mean"] == 0.5
    assert summary["language"]["count"] == 1 and summary["language"]["skipped"] == 1
    assert pool.summary()["accuracy"]["count"] == 0  # reset by the previous call


def test_killed_worker_takes_its_children(tmp_path):
    psutil = pytest.importorskip("psutil")
    pid_file = tmp_path / "child.pid"
    with RewardPool({"child": 1.0}, rewards=EXTRA, workers=1, timeout_s=5.0) as pool:
        scored = pool.score([math_record(0)], [str(pid_file)])
        assert scored[0].timeouts == ("child",)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 60  # a bound for a hang, not a speed claim
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the hung reward's child process survived"
        time.sleep(0.05)


def test_closed_pool_refuses_work():
    pool = RewardPool({"format": 1.0}, workers=1)
    assert pool.score([math_record(0)], [GOOD])[0].total == 1.0
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score([math_record(0)], [GOOD])
    with pytest.raises(ValueError, match="same length"):
        pool.score([math_record(0)], [])


def test_spawn_context():
    with RewardPool({"crash": 1.0, "id": 1.0}, rewards=EXTRA, workers=1, timeout_s=5.0,
                    context="spawn") as pool:
        scored = pool.score([math_record(0), math_record(1), math_record(2)], [GOOD, "crash", GOOD])
    assert [s.values["crash"] for s in scored] == [0.5, 0.0, 0.5]
    assert [s.values["id"] for s in scored] == [0.0, 1.0, 2.0]
    assert "exit code 3" in scored[1].errors["crash"]


def test_workers_that_cannot_start_are_an_error(monkeypatch):
    # A reward whose module exists only in this process: workers die unpickling it, before ready.
    import sys
    import types

    phantom = types.ModuleType("r1mega_phantom_rewards")

    def phantom_reward(record, completion):
        return RewardOutput(1.0)

    phantom_reward.__module__ = "r1mega_phantom_rewards"
    phantom_reward.__qualname__ = "phantom_reward"
    phantom.phantom_reward = phantom_reward
    monkeypatch.setitem(sys.modules, "r1mega_phantom_rewards", phantom)
    with RewardPool({"phantom": 1.0}, rewards={"phantom": phantom_reward}, workers=1) as pool:
        with pytest.raises(RuntimeError, match="failed to start 3 times"):
            pool.score([math_record(0)], [GOOD])


def alloc_reward(record, completion):
    """Allocates 2 GiB."""
    return RewardOutput(float(len(bytearray(2 << 30))))


def test_memory_limit_turns_a_huge_allocation_into_an_error():
    with RewardPool({"alloc": 1.0}, rewards={"alloc": alloc_reward}, workers=1, memory_mb=1024) as pool:
        scored = pool.score([math_record(0)], [GOOD])
    assert scored[0].values == {"alloc": 0.0} and scored[0].errors["alloc"].startswith("MemoryError")


ORPHAN_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_rewards_pool import EXTRA, GOOD, RewardPool, math_record
pool = RewardPool({{"hang": 1.0}}, rewards=EXTRA, workers=2, timeout_s=300)
pool.score([math_record(0)], [GOOD])  # both workers are up once one has answered and
time.sleep(0.5)                       # the other had time to report ready
print(" ".join(str(w.process.pid) for w in pool._workers), flush=True)
pool.score([math_record(0), math_record(1)], ["hang", "hang"])
"""


def test_workers_exit_when_the_trainer_is_killed():
    psutil = pytest.importorskip("psutil")
    import select
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    trainer = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT.format(root=root)],
                               stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([trainer.stdout], [], [], 60)
        assert ready, "the trainer script did not start its pool"
        pids = [int(p) for p in trainer.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(0.3)  # both workers are now inside the hanging reward
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    deadline = time.monotonic() + 60
    for pid in pids:
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "a reward worker outlived the killed trainer"
            time.sleep(0.05)
