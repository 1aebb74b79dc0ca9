"""Runs the benchmark: the plan of runs, the worker pool, resume from the results file, the wall-time budget.

The plan, per (model, d_model): one run per learning rate at the first seed (the sweep), then, once the sweep is
done, the best learning rate on the validation split again at seeds seed + 1, ..., seed + seeds - 1. Every
finished run goes into the results file at once (atomically); a later call with the same settings trains only the
runs that are missing. Ctrl-C stops every worker process at once and raises KeyboardInterrupt; the runs finished
before it are in the file.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue as queues
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from memmix.evaluation.recall.models import (
    BUILTIN_MODELS,
    RECALL_MODELS,
    ModelSize,
    count_parameters,
)
from memmix.evaluation.recall.report import (
    RecallReport,
    aggregate,
    fmt_seconds,
    plot_accuracy,
    plot_state_accuracy,
)
from memmix.evaluation.recall.results import (
    ResultsFile,
    RunResult,
    RunSpec,
    fallback_path,
    load_finished,
    note,
    select_best,
)
from memmix.evaluation.recall.settings import (
    RecallSettingError,
    RecallSettings,
    fast_path,
    learning_rates,
    validate_settings,
)
from memmix.evaluation.recall.tasks import MQARTask
from memmix.evaluation.recall.training import Recipe, train_steps

# ----------------------------------------------------------------------------------------------- the plan


class Plan:
    """Which runs the settings ask for, which are finished, and which may start now."""

    def __init__(self, s: RecallSettings, finished: dict[str, RunResult]):
        self.s, self.finished = s, dict(finished)
        self.lrs = learning_rates(s)
        self.groups = [(name, d) for d in s.d_models for name in s.models]

    @property
    def total(self) -> int:
        return len(self.groups) * (len(self.lrs) + self.s.seeds - 1)

    def sweep(self, model: str, d_model: int) -> list[RunSpec]:
        return [RunSpec(model, d_model, lr, self.s.seed, "sweep") for lr in self.lrs]

    def best_lr(self, model: str, d_model: int) -> float | None:
        """The chosen learning rate, or None while the group's sweep is not finished."""
        runs = [self.finished.get(spec.key) for spec in self.sweep(model, d_model)]
        if any(r is None for r in runs):
            return None
        return select_best(runs, self.lrs).spec.lr

    def seed_runs(self, model: str, d_model: int) -> list[RunSpec] | None:
        lr = self.best_lr(model, d_model)
        if lr is None:
            return None
        return [RunSpec(model, d_model, lr, self.s.seed + i, "seed") for i in range(1, self.s.seeds)]

    def next_ready(self, running: set[str] | dict, fits: Callable[[RunSpec], bool] | None = None) -> RunSpec | None:
        """The first run, in plan order, that is neither finished nor running, whose inputs are known and that
        ``fits`` (the time left)."""
        for model, d_model in self.groups:
            for spec in self.sweep(model, d_model) + (self.seed_runs(model, d_model) or []):
                if spec.key not in self.finished and spec.key not in running and (fits is None or fits(spec)):
                    return spec
        return None

    def measured_seconds(self, spec: RunSpec) -> float | None:
        """How long ``spec`` takes at the step cap, from the finished runs of its model and width (None: none)."""
        rates = [r.train_seconds / max(1, r.steps_trained) for r in self.finished.values()
                 if (r.spec.model, r.spec.d_model) == (spec.model, spec.d_model)]
        return self.s.steps * sum(rates) / len(rates) if rates else None

    def add(self, result: RunResult) -> None:
        self.finished[result.spec.key] = result

    def ordered_runs(self) -> list[RunResult]:
        """Finished runs in plan order, then finished runs that the settings no longer ask for (kept in the file)."""
        keys = []
        for model, d_model in self.groups:
            keys += [spec.key for spec in self.sweep(model, d_model) + (self.seed_runs(model, d_model) or [])]
        planned, known = [self.finished[k] for k in keys if k in self.finished], set(keys)
        return planned + [r for k, r in self.finished.items() if k not in known]

    def remaining(self) -> list[str]:
        """Runs not finished yet, by key (a seed run whose learning rate is not chosen yet: 'lr=?')."""
        return [key for keys in self.remaining_by_group().values() for key in keys]

    def remaining_by_group(self) -> dict[tuple[str, int], list[str]]:
        """(model, d_model) -> the keys of its runs not finished yet."""
        left = {}
        for model, d_model in self.groups:
            keys = [spec.key for spec in self.sweep(model, d_model) if spec.key not in self.finished]
            seeds = self.seed_runs(model, d_model)
            if seeds is None:
                keys += [f"{model} d={d_model} lr=? seed={self.s.seed + i}" for i in range(1, self.s.seeds)]
            else:
                keys += [spec.key for spec in seeds if spec.key not in self.finished]
            left[(model, d_model)] = keys
        return left


# ----------------------------------------------------------------------------------------------- one run


def train_and_test(spec: RunSpec, s: RecallSettings, task: MQARTask,
                   on_log: Callable[[int, float], None] | None = None) -> RunResult:
    """Build ``spec.model`` at its width (weights from spec.seed), train it, pick nothing: report its validation
    accuracy (if there is a validation split) and its test accuracy at every tested setting."""
    entry = RECALL_MODELS[spec.model]
    torch.manual_seed(spec.seed)  # the same initial weights for the same model and seed
    model = entry.build(ModelSize(s.vocab_size, spec.d_model, s.num_layers, s.head_dim)).to(s.device)
    splits = task.splits(s.device)
    recipe = Recipe(steps=s.steps, lr=spec.lr, weight_decay=s.weight_decay, warmup_fraction=s.warmup_fraction,
                    batch_size=s.batch_size, seed=spec.seed, log_every=s.log_every, eval_every=s.eval_every,
                    stop_accuracy=s.stop_accuracy, cuda_graph=fast_path(s, "cuda_graph"),
                    query_head=fast_path(s, "query_head"))
    validate = (lambda: task.pooled_accuracy(model, splits.valid)) if splits.valid else None
    started = time.perf_counter()
    log = train_steps(model, splits.train, task.inputs, recipe, on_log, validate)
    seconds = time.perf_counter() - started
    valid_accuracy = None
    if validate is not None:
        last = log.valid_curve[-1] if log.valid_curve else None
        valid_accuracy = last[1] if last is not None and last[0] == log.steps else validate()
    accuracy = {key: task.accuracy(model, data) for key, data in splits.test.items()}
    tail = log.losses[-max(1, len(log.losses) // 20):]
    return RunResult(spec=spec, summary=entry.summary, num_layers=s.num_layers, params=count_parameters(model),
                     state=entry.state_size(model), accuracy=accuracy, valid_accuracy=valid_accuracy,
                     valid_curve=log.valid_curve, steps_trained=log.steps, stopped_early=log.stopped_early,
                     final_loss=sum(tail) / len(tail), train_seconds=seconds, loss_curve=_thin(log.losses, 200))


def _thin(values: list[float], keep: int) -> list[float]:
    stride = max(1, math.ceil(len(values) / keep))
    return [round(v, 5) for v in values[::stride]]


# ----------------------------------------------------------------------------------------------- the benchmark

_clock = time.monotonic  # the wall clock of the budget and of wall_seconds (tests replace it)


def run_recall(s: RecallSettings, progress: bool = True,
               on_result: Callable[[RunResult], None] | None = None) -> RecallReport:
    """Train every model of ``s`` at every d_model (learning-rate sweep, then seeds of the best) and test every
    setting; returns every number. With s.json_path, finished runs are written there as they finish and runs
    already there are not trained again. With several workers the runs train in parallel processes.
    on_result(run) is called as each run finishes (after it is saved)."""
    validate_settings(s)
    start = _clock()
    plan = Plan(s, load_finished(s))
    out = ResultsFile(s.json_path)
    left = len(plan.remaining())
    workers = worker_count(s, max(1, left))
    tracker = _Progress(left, s.steps, workers, progress)
    budget = s.budget_minutes * 60 if s.budget_minutes > 0 else math.inf

    def finished(result: RunResult) -> None:
        plan.add(result)
        if result.diverged:
            note(out.messages, f"run {result.spec.key} diverged (training loss {result.final_loss}): its accuracy "
                               "is no result; lower --lr")
        out.write(_report(s, plan, _clock() - start, out.messages).as_dict())
        if on_result is not None:
            on_result(result)

    def may_start(spec: RunSpec) -> bool:
        """Within the budget, and (when runs of its model and width were measured) finishing within it, unless it
        could never fit one."""
        elapsed = _clock() - start
        need = plan.measured_seconds(spec)
        return elapsed < budget and (need is None or need > budget or elapsed + need <= budget)

    if left and workers > 1:
        _train_in_processes(plan, s, workers, tracker, finished, may_start)
    elif left:
        with _threads(s.num_threads):
            _train_here(plan, s, tracker, finished, may_start)
    tracker.close()
    report = _report(s, plan, _clock() - start, out.messages)
    if report.pending:
        where = f"; they are in '{out.where}'" if out.where else " (no json_path: they are not kept)"
        note(out.messages, f"wall-time budget of {s.budget_minutes:g} min used: {len(report.runs)} of {plan.total} "
                           f"runs done, {len(report.pending)} left{where}; run the same command again to continue")
    _write_plots(report, out.messages)
    out.write(report.as_dict())
    return report


def _report(s: RecallSettings, plan: Plan, wall_seconds: float, messages: list[str]) -> RecallReport:
    runs = plan.ordered_runs()
    return RecallReport(settings=s, results=aggregate(s, runs), wall_seconds=wall_seconds, runs=runs,
                        pending=plan.remaining(), total_runs=plan.total, notes=list(messages))


def _write_plots(report: RecallReport, messages: list[str]) -> None:
    """The plots the settings ask for; a failed write goes to a fallback path named in a message."""
    s = report.settings
    for path, draw in ((s.plot_path, plot_accuracy), (s.state_plot_path, plot_state_accuracy)):
        if not path or not report.results:
            continue
        try:
            draw(report, path)
        except OSError as err:
            fallback = fallback_path(path)
            draw(report, fallback)
            note(messages, f"could not write '{path}' ({err.strerror or err}); the plot is in '{fallback}'")
    report.notes = list(messages)


def worker_count(s: RecallSettings, num_runs: int) -> int:
    """Processes that train at once: s.workers, or (0) one per s.num_threads CPU cores (1 on CUDA, with
    torch's default thread count, or with a model registered at run time), never more than the runs."""
    late = [name for name in s.models if BUILTIN_MODELS.get(name) is not RECALL_MODELS.get(name)]
    if s.workers > 1 and late:
        raise RecallSettingError("workers", f"model {late[0]!r} is registered at run time, which worker processes "
                                            "do not see; allowed with it: 0 or 1")
    if s.workers:
        return max(1, min(s.workers, num_runs))
    if late or torch.device(s.device).type != "cpu" or s.num_threads == 0:
        return 1
    return max(1, min(num_runs, (os.cpu_count() or 1) // s.num_threads))


@contextlib.contextmanager
def _threads(count: int):
    """Within the block torch uses `count` intra-op threads (0: leave torch's setting)."""
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_here(plan: Plan, s: RecallSettings, tracker: _Progress, finished, may_start) -> None:
    """The runs one after another in this process (Ctrl-C interrupts the run in progress at once)."""
    task = MQARTask(s)
    while True:
        spec = plan.next_ready(set(), may_start)
        if spec is None:
            return
        index = tracker.start(spec, plan)
        result = train_and_test(spec, s, task, lambda steps, loss: tracker.update(index, steps, loss))
        tracker.finish(index)
        finished(result)


# ----------------------------------------------------------------------------------------------- the worker pool


def _train_in_processes(plan: Plan, s: RecallSettings, workers: int, tracker: _Progress, finished,
                        may_start) -> None:
    """Each run in one of ``workers`` processes ("spawn": fresh interpreters, no inherited thread pools). A worker
    takes the next run only when one is free, so stopping the pool stops everything: on any exception here
    (KeyboardInterrupt included) every worker is terminated at once."""
    context = multiprocessing.get_context("spawn")
    tasks, messages = context.Queue(), context.Queue()
    procs = [context.Process(target=_worker_main, args=(s, tasks, messages, os.getpid()), daemon=True)
             for _ in range(workers)]
    clean = False
    try:
        with _children_ignore_sigint():
            for proc in procs:
                proc.start()
        running: dict[str, int] = {}  # run key -> progress index
        while True:
            while len(running) < workers:
                spec = plan.next_ready(running, may_start)
                if spec is None:
                    break
                running[spec.key] = tracker.start(spec, plan)
                tasks.put(spec)
            if not running:
                break
            try:
                kind, key, payload = messages.get(timeout=0.5)
            except queues.Empty:
                dead = [p.exitcode for p in procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"a recall worker process exited unexpectedly (exit code {dead[0]}) while "
                                       f"training: {', '.join(running)}") from None
                continue
            if kind == "progress":
                tracker.update(running[key], *payload)
            elif kind == "done":
                tracker.finish(running.pop(key))
                finished(payload)
            else:
                raise RuntimeError(f"recall run '{key}' failed in a worker process:\n{payload}")
        clean = True
    finally:
        _stop_workers(procs, tasks, messages, clean)


@contextlib.contextmanager
def _children_ignore_sigint():
    """Processes started in the block ignore SIGINT from their first instruction (an ignored signal stays ignored
    across exec, and Python then installs no KeyboardInterrupt handler), so a Ctrl-C while a worker still imports
    torch leaves no traceback: the parent stops the workers. Only the main thread may change handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _stop_workers(procs, tasks, messages, clean: bool) -> None:
    """After a clean end, tell idle workers to exit; otherwise (or if they do not) terminate them; no process
    outlives this call."""
    if clean:
        for _ in procs:
            tasks.put(None)
        deadline = time.monotonic() + 10
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for q in (tasks, messages):
        q.cancel_join_thread()  # never block this process's exit on a queue nobody reads
        q.close()


def _worker_main(s: RecallSettings, tasks, messages, parent_pid: int) -> None:
    """A worker process: train runs from ``tasks`` until None; report progress, results and errors."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    _exit_with_parent(parent_pid)
    task = MQARTask(s)
    with _threads(s.num_threads):
        while True:
            spec = tasks.get()
            if spec is None:
                return
            try:
                result = train_and_test(spec, s, task,
                                        lambda steps, loss: messages.put(("progress", spec.key, (steps, loss))))
            except BaseException:
                messages.put(("error", spec.key, traceback.format_exc()))
                return
            messages.put(("done", spec.key, result))


def _exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this process when its parent is gone (killed with SIGKILL, say)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# ----------------------------------------------------------------------------------------------- progress


class _Progress:
    """One tqdm bar per training run (several may run at once), with an ETA for all runs of this call in the
    postfix: the longest remainder of the runs in progress (each at its own step rate), plus the runs not started
    at the mean rate so far, shared among the workers. ``steps`` is the step cap (early stops end sooner)."""

    def __init__(self, runs: int, steps_per_run: int, workers: int, enabled: bool):
        self.runs, self.steps, self.workers = runs, steps_per_run, workers
        self.done: list[int] = []
        self.started: dict[int, float] = {}
        self.ended: dict[int, float] = {}
        self.enabled = enabled
        self.bars: dict[int, Any] = {}

    def start(self, spec: RunSpec, plan: Plan | None = None) -> int:
        """A new run begins; returns its index for update() and finish()."""
        index = len(self.done)
        self.done.append(0)
        self.started[index] = time.perf_counter()
        label = f"{spec.model} d={spec.d_model}"
        if plan is not None and len(plan.lrs) > 1:
            label += f" lr={spec.lr:g}"
        if plan is not None and plan.s.seeds > 1:
            label += f" seed={spec.seed}"
        self.bars[index] = tqdm(total=self.steps, desc=f"[{index + 1}/{self.runs}] {label}", disable=not self.enabled,
                                leave=True, mininterval=1.0, dynamic_ncols=True, position=len(self.bars))
        return index

    def update(self, run: int, steps_done: int, loss: float) -> None:
        """Run `run` has done `steps_done` steps; its latest loss is `loss`."""
        bar = self.bars[run]
        bar.update(steps_done - self.done[run])
        self.done[run] = steps_done
        if self.enabled:
            bar.set_postfix_str(f"loss={loss:.3f} all-done-in~{fmt_seconds(self.remaining_seconds())}", refresh=False)

    def finish(self, run: int) -> None:
        self.ended[run] = time.perf_counter()
        self.bars[run].close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

    def remaining_seconds(self) -> float:
        now = time.perf_counter()
        per_step = {r: (self.ended.get(r, now) - t) / self.done[r] for r, t in self.started.items() if self.done[r]}
        if not per_step:
            return 0.0
        active = max((per_step[r] * (self.steps - self.done[r]) for r in per_step if r not in self.ended), default=0.0)
        waiting = self.runs - len(self.started)
        return active + waiting * self.steps * sum(per_step.values()) / len(per_step) / self.workers
