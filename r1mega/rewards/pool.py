"""Reward scoring in worker processes under per-task deadlines.

A verifier that hangs (sympy on an adversarial answer, a code test stuck in a loop) or kills its
process (a segfault, ``os._exit``) must cost one sample its reward, never stall or kill the
trainer. concurrent.futures.ProcessPoolExecutor cannot do this: it cannot cancel a running task,
and a dead worker breaks the whole executor. RewardPool therefore keeps its own worker processes,
each with its own pipe, so it always knows which task each worker runs and since when:

* every (sample, reward) pair is one task, so a hanging accuracy check does not also lose the
  sample's format reward, and the metrics say which reward timed out;
* a task still running at its deadline gets its worker killed (with any processes it started)
  and replaced; the task scores 0 with a timeout error;
* a worker that dies mid-task is replaced and the task given once more to a fresh worker (the
  OOM killer or an operator may have killed the worker, not the task); a task whose second
  worker dies too scores 0 with an error naming the exit code;
* a reward that raises scores 0 with the exception as its error; the worker stays.

Workers run rewards in their main thread, so math-verify's ``signal.alarm`` time bounds work
inside them; the pool's deadline is the hard bound behind them. Workers come from the
"forkserver" context (fresh single-threaded server, no inherited torch/CUDA threads) with
r1mega.rewards preloaded into the server, so a replacement worker starts in milliseconds; the
"spawn" context also works (each worker then imports sympy, about a second). Workers ignore
SIGINT and SIGTERM (the trainer decides when to stop) and exit when the pool's process does (a
lifeline pipe whose only write end the pool holds), even when busy in a hung task.

Results keep input order. RewardPool is not thread-safe: call ``score`` from one thread.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from r1mega.config import ConfigError, RewardsConfig
from r1mega.data.records import PromptRecord
from r1mega.rewards.base import RewardFn, check_completion, check_record
from r1mega.rewards.composite import (
    ScoredSample,
    call_reward,
    check_options,
    error_message,
    weighted_total,
)
from r1mega.rewards.registry import check_weights, get_reward, load_reward

CONTEXTS = ("forkserver", "spawn")
DEATH_RETRIES = 1  # a task whose worker died is run again this many times, on fresh workers
_MAX_START_FAILURES = 3  # consecutive workers dying before they are ready: a broken setup


def pool_kwargs(rewards: RewardsConfig) -> dict:
    """RewardPool's keyword arguments (``weights`` among them) for a config's rewards section; imports
    rewards.custom (ConfigError naming it when that fails)."""
    weights = rewards.weights()
    options = {"accuracy": {"math_timeout_s": rewards.math_timeout_s, "code_timeout_s": rewards.code_timeout_s,
                            "code_memory_mb": rewards.code_memory_mb,
                            "skip_general": rewards.reward_model is not None}} if "accuracy" in weights else None
    try:
        extra = {"custom": load_reward(rewards.custom)} if "custom" in weights else None
    except ValueError as err:
        raise ConfigError(f"rewards.custom: {err}") from None
    return {"weights": weights, "workers": rewards.workers or None, "timeout_s": rewards.timeout_s,
            "options": options, "rewards": extra}


def default_workers() -> int:
    """Half the CPUs (at least 1, at most 8): rewards share the host with the trainer."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# ---- worker side ------------------------------------------------------------------------------


def _exit_when_orphaned(lifeline) -> None:
    # A worker busy in a hung task never sees its task pipe close, and its parent may be the
    # forkserver (which outlives the trainer while any worker lives). Only the pool's process
    # holds the write end of the lifeline, so EOF here means the pool's process is gone.
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os._exit(0)


def _worker_main(conn, lifeline, fns: dict[str, RewardFn], options: dict[str, dict[str, Any]],
                 memory_mb: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a SIGTERM to the job: the trainer stops cleanly
    if memory_mb is not None:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    threading.Thread(target=_exit_when_orphaned, args=(lifeline,), daemon=True, name="lifeline").start()
    # Import the rule modules (sympy) before saying ready, so no task's deadline pays for it.
    import r1mega.rewards.accuracy  # noqa: F401

    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        serial, name, record, completion = msg
        start = time.perf_counter()
        try:
            out = call_reward(fns[name], record, completion, options.get(name, {}))
            reply = ("done", serial, out.value, out.info, out.skipped, time.perf_counter() - start)
            try:
                conn.send(reply)
                continue
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                reply = ("error", serial, f"reward info is not picklable: {error_message(e)}",
                         time.perf_counter() - start)
        except BaseException as e:  # SystemExit, KeyboardInterrupt too: the worker must survive
            reply = ("error", serial, error_message(e), time.perf_counter() - start)
        conn.send(reply)


# ---- parent side ------------------------------------------------------------------------------


@dataclass
class _Worker:
    process: Any
    conn: Any
    ready: bool = False
    serial: int | None = None  # task being run
    task: tuple[int, str] | None = None  # (sample index, reward name)
    dispatched: float = 0.0
    deadline: float = math.inf


@dataclass
class _Outcome:
    value: float | None
    info: dict[str, Any]
    error: str | None = None
    timed_out: bool = False
    seconds: float = 0.0


def _kill(worker: _Worker) -> None:
    """Kill a worker and every process it started (a code sandbox's children)."""
    try:
        import psutil

        children = psutil.Process(worker.process.pid).children(recursive=True)
    except Exception:
        children = []
    try:
        worker.process.kill()
    except Exception:
        pass
    for child in children:
        try:
            child.kill()
        except Exception:
            pass
    worker.process.join(timeout=5)
    try:
        worker.conn.close()
    except Exception:
        pass


def _shutdown(workers: list, lifeline: tuple) -> None:
    for i, worker in enumerate(workers):
        if worker is not None:
            _kill(worker)
            workers[i] = None
    for conn in lifeline:
        conn.close()


class RewardPool:
    """Weighted rewards computed in worker processes, with per-task deadlines.

    Args:
        weights: {reward name: weight}, as for CompositeReward: names from the registry or
            ``rewards``; every named reward is computed, the total is the weighted sum.
        workers: number of worker processes (default: :func:`default_workers`).
        timeout_s: deadline of one reward on one sample, from dispatch to result. It bounds each
            (sample, reward) task separately. Keep the rewards' own bounds below it (e.g.
            options={"accuracy": {"math_timeout_s": 3}}): a bound that fires inside the reward
            scores 0 without costing a worker restart.
        timeouts: per-reward overrides of ``timeout_s``, e.g. {"accuracy": 60.0} when code tests
            run under accuracy (they need the sum of their test timeouts).
        rewards: extra {name: fn} rewards; ``fn`` must be a module-level function (it is pickled
            by reference and imported by the workers).
        options: {reward name: keyword arguments for it}, e.g. {"accuracy": {"code_timeout_s": 5}}.
        context: "forkserver" (default where available) or "spawn".
        memory_mb: address-space limit (RLIMIT_AS) of each worker, or None; an allocation past
            it raises MemoryError in the reward, which then scores 0 with that error. A worker
            with sympy loaded already maps a few hundred MB: leave room (1024 is comfortable).
        start_timeout_s: how long a new worker may take to import its modules and report ready.

    Workers start at construction; ``close()`` (or leaving a ``with`` block) stops them, and they
    are stopped at interpreter exit if still running.
    """

    def __init__(self, weights: Mapping[str, float], *, workers: int | None = None,
                 timeout_s: float = 10.0, timeouts: Mapping[str, float] | None = None,
                 rewards: Mapping[str, RewardFn] | None = None,
                 options: Mapping[str, Mapping[str, Any]] | None = None,
                 context: str | None = None, memory_mb: int | None = None,
                 start_timeout_s: float = 120.0) -> None:
        self.weights = check_weights(weights, rewards)
        self.fns = {name: get_reward(name, rewards) for name in self.weights}
        self.options = check_options(options, self.weights)
        self.num_workers = default_workers() if workers is None else workers
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self.timeout_s = _positive("timeout_s", timeout_s)
        self.timeouts = {}
        for name, value in (timeouts or {}).items():
            if name not in self.weights:
                raise ValueError(f"timeouts[{name!r}] is given but {name!r} is not in weights "
                                 f"({', '.join(self.weights)})")
            self.timeouts[name] = _positive(f"timeouts[{name!r}]", value)
        self.start_timeout_s = _positive("start_timeout_s", start_timeout_s)
        if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, int)
                                      or memory_mb < 64):
            raise ValueError(f"memory_mb must be an int >= 64 or None, got {memory_mb!r}")
        self.memory_mb = memory_mb
        for name, fn in self.fns.items():
            try:
                pickle.dumps(fn)
            except Exception as e:
                raise ValueError(f"reward {name!r} cannot be sent to worker processes (it must be a "
                                 f"module-level function): {error_message(e)}") from None
        try:
            pickle.dumps(self.options)
        except Exception as e:
            raise ValueError(f"options must be picklable: {error_message(e)}") from None

        if context is None:
            context = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        self.context = context
        self._ctx = multiprocessing.get_context(context)
        if context == "forkserver":
            # Takes effect when the forkserver starts (the first forkserver process of this
            # program); "__main__" keeps rewards defined in the main script importable.
            self._ctx.set_forkserver_preload(["__main__", "r1mega.rewards"])

        self._workers: list[_Worker | None] = [None] * self.num_workers
        # Every worker gets the read end; the write end never leaves this process.
        self._lifeline_r, self._lifeline_w = self._ctx.Pipe(duplex=False)
        self._finalizer = multiprocessing.util.Finalize(
            self, _shutdown, args=(self._workers, (self._lifeline_r, self._lifeline_w)), exitpriority=10)
        self._serial = 0
        self._start_failures = 0
        self._busy = False
        self.restarts = 0
        self._stats = self._empty_stats()
        for i in range(self.num_workers):
            self._start(i)

    # ---- public --------------------------------------------------------------------------------

    def score(self, records: Sequence[PromptRecord], completions: Sequence[str]) -> list[ScoredSample]:
        """One ScoredSample per (record, completion) pair, in input order.

        Never raises for what a reward does (exception, hang, crash): those score 0 and are
        reported in ``errors`` / ``timeouts``. Raises ValueError for mismatched or malformed
        inputs, RuntimeError if the pool is closed or workers keep dying before they are ready.
        """
        if len(records) != len(completions):
            raise ValueError(f"records and completions must have the same length, got "
                             f"{len(records)} and {len(completions)}")
        for record, completion in zip(records, completions):
            check_record(record)
            check_completion(completion)
        if not self._finalizer.still_active():
            raise RuntimeError("RewardPool is closed")
        if self._busy:
            raise RuntimeError("RewardPool.score is already running (the pool is not thread-safe)")
        self._busy = True
        try:
            outcomes = self._run(records, completions)
        except BaseException:
            # Interrupted: tasks still running would answer a later call; drop those workers.
            for i, worker in enumerate(self._workers):
                if worker is not None and worker.task is not None:
                    _kill(worker)
                    self._workers[i] = None
            raise
        finally:
            self._busy = False

        samples = []
        for i in range(len(records)):
            values: dict[str, float | None] = {}
            errors: dict[str, str] = {}
            info: dict[str, dict[str, Any]] = {}
            timeouts = []
            for name in self.weights:
                outcome = outcomes[(i, name)]
                values[name] = outcome.value
                info[name] = outcome.info
                if outcome.error is not None:
                    errors[name] = outcome.error
                if outcome.timed_out:
                    timeouts.append(name)
                self._record_stats(name, outcome)
            samples.append(ScoredSample(weighted_total(self.weights, values), values, errors, info,
                                        tuple(timeouts)))
        return samples

    def summary(self, reset: bool = True) -> dict[str, dict[str, float]]:
        """Per reward, over the tasks scored since the last reset: ``mean`` (of the values that
        were not skipped, errors and timeouts counting as 0; NaN if none), ``count`` (those
        values), ``skipped``, ``errors`` (timeouts included), ``timeouts`` and ``seconds`` (task
        time summed over workers: compute time, or time to the deadline for a timeout)."""
        out = {}
        for name, s in self._stats.items():
            out[name] = {"mean": s["sum"] / s["count"] if s["count"] else math.nan,
                         "count": s["count"], "skipped": s["skipped"], "errors": s["errors"],
                         "timeouts": s["timeouts"], "seconds": s["seconds"]}
        if reset:
            self._stats = self._empty_stats()
        return out

    def close(self) -> None:
        """Stop the workers (killing any running task). The pool cannot be used afterwards."""
        self._finalizer()

    @classmethod
    def from_config(cls, rewards: RewardsConfig, **overrides: Any) -> RewardPool:
        """The pool a config's rewards section describes (:func:`pool_kwargs`); `overrides` replace
        keyword arguments (e.g. workers=1)."""
        kwargs = {**pool_kwargs(rewards), **overrides}
        return cls(kwargs.pop("weights"), **kwargs)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------

    def _empty_stats(self) -> dict[str, dict[str, float]]:
        return {name: {"sum": 0.0, "count": 0, "skipped": 0, "errors": 0, "timeouts": 0,
                       "seconds": 0.0} for name in self.weights}

    def _record_stats(self, name: str, outcome: _Outcome) -> None:
        s = self._stats[name]
        s["seconds"] += outcome.seconds
        if outcome.value is None:
            s["skipped"] += 1
            return
        s["count"] += 1
        s["sum"] += outcome.value
        s["errors"] += outcome.error is not None
        s["timeouts"] += outcome.timed_out

    def _start(self, i: int) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._lifeline_r, self.fns, self.options, self.memory_mb),
            name=f"r1mega-reward-{i}", daemon=False)
        process.start()
        child_conn.close()  # the worker holds its end; closing ours makes its death an EOF here
        self._workers[i] = _Worker(process, parent_conn, deadline=time.monotonic() + self.start_timeout_s)

    def _replace(self, i: int) -> None:
        worker = self._workers[i]
        if worker is not None:
            _kill(worker)
            if not worker.ready:
                self._start_failures += 1
                if self._start_failures >= _MAX_START_FAILURES:
                    self._workers[i] = None
                    raise RuntimeError(
                        f"reward workers failed to start {self._start_failures} times in a row "
                        f"(last exit code {worker.process.exitcode}); see their stderr above")
        self.restarts += 1
        self._start(i)

    def _run(self, records, completions) -> dict[tuple[int, str], _Outcome]:
        self._start_failures = 0
        for i, worker in enumerate(self._workers):
            if worker is None:
                self._start(i)
        pending = deque((i, name) for i in range(len(records)) for name in self.weights)
        outcomes: dict[tuple[int, str], _Outcome] = {}
        total = len(pending)
        deaths: dict[tuple[int, str], int] = {}

        def finish(i: int, outcome: _Outcome) -> None:
            worker = self._workers[i]
            outcomes[worker.task] = outcome
            worker.task, worker.serial, worker.deadline = None, None, math.inf

        while len(outcomes) < total:
            for i, worker in enumerate(self._workers):
                if pending and worker.ready and worker.task is None:
                    sample, name = pending.popleft()
                    self._serial += 1
                    try:
                        worker.conn.send((self._serial, name, records[sample], completions[sample]))
                    except (pickle.PicklingError, TypeError, AttributeError) as e:
                        outcomes[(sample, name)] = _Outcome(0.0, {}, f"record is not picklable: "
                                                                     f"{error_message(e)}")
                        continue
                    except OSError:  # the worker died while idle; the task never started
                        pending.appendleft((sample, name))
                        self._replace(i)
                        continue
                    now = time.monotonic()
                    worker.task, worker.serial, worker.dispatched = (sample, name), self._serial, now
                    worker.deadline = now + self.timeouts.get(name, self.timeout_s)
            if len(outcomes) >= total:
                break

            now = time.monotonic()
            waits = [w.deadline for w in self._workers if w.task is not None or not w.ready]
            timeout = max(0.0, min(waits) - now) if waits else None
            handles = {}
            for i, worker in enumerate(self._workers):
                handles[worker.conn] = i
                handles[worker.process.sentinel] = i
            ready = multiprocessing.connection.wait(list(handles), timeout)

            dead = set()
            for handle in ready:
                i = handles[handle]
                worker = self._workers[i]
                if handle is not worker.conn or i in dead:
                    continue
                try:
                    while worker.conn.poll():
                        self._on_message(i, worker.conn.recv(), finish)
                except (EOFError, OSError):
                    dead.add(i)
            for handle in ready:
                i = handles[handle]
                if handle is self._workers[i].process.sentinel:
                    dead.add(i)
            for i in sorted(dead):
                worker = self._workers[i]
                worker.process.join(timeout=1)
                task = worker.task
                if task is not None:
                    deaths[task] = deaths.get(task, 0) + 1
                    if deaths[task] <= DEATH_RETRIES:
                        pending.appendleft(task)
                        worker.task, worker.serial, worker.deadline = None, None, math.inf
                    else:
                        finish(i, _Outcome(0.0, {}, f"worker process died (exit code "
                                                    f"{worker.process.exitcode}), "
                                                    f"{deaths[task]} times on this task",
                                           seconds=time.monotonic() - worker.dispatched))
                self._replace(i)

            now = time.monotonic()
            for i, worker in enumerate(self._workers):
                if worker.deadline > now:
                    continue
                if worker.task is not None:
                    limit = self.timeouts.get(worker.task[1], self.timeout_s)
                    finish(i, _Outcome(0.0, {}, f"timed out after {limit:g} s (worker killed)",
                                       timed_out=True, seconds=now - worker.dispatched))
                self._replace(i)
        return outcomes

    def _on_message(self, i: int, msg: tuple, finish) -> None:
        worker = self._workers[i]
        kind = msg[0]
        if kind == "ready":
            worker.ready, worker.deadline = True, math.inf
            self._start_failures = 0
            return
        serial = msg[1]
        if serial != worker.serial:  # an answer for a task given up on by an interrupted call
            return
        if kind == "done":
            _, _, value, info, skipped, seconds = msg
            finish(i, _Outcome(None if skipped else value, info, seconds=seconds))
        else:
            _, _, message, seconds = msg
            finish(i, _Outcome(0.0, {}, message, seconds=seconds))


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
