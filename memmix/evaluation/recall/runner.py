"""Runs the benchmark: the plan of runs (plan.py), each run (run.py) in this process or a worker pool (pool.py) with
progress bars (progress.py), resume from the results file, the wall-time budget.

Every finished run goes into the results file at once (atomically); a later call with the same settings trains only
the runs that are missing. Ctrl-C stops every worker process at once and raises KeyboardInterrupt; the runs finished
before it are in the file.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

from memmix.evaluation.recall.plan import Plan
from memmix.evaluation.recall.pool import torch_threads, train_here, train_in_processes, worker_count
from memmix.evaluation.recall.progress import RunProgress
from memmix.evaluation.recall.report import RecallReport, aggregate, plot_accuracy, plot_state_accuracy
from memmix.evaluation.recall.results import ResultsFile, RunResult, RunSpec, fallback_path, load_finished, note
from memmix.evaluation.recall.settings import RecallSettings, validate_settings


def run_recall(s: RecallSettings, progress: bool = True, on_result: Callable[[RunResult], None] | None = None,
               clock: Callable[[], float] = time.monotonic) -> RecallReport:
    """Train every model of ``s`` at every d_model (learning-rate sweep, then seeds of the best) and test every
    setting; returns every number. With s.json_path, finished runs are written there as they finish and runs
    already there are not trained again. With several workers the runs train in parallel processes.
    on_result(run) is called as each run finishes (after it is saved). clock() -> seconds: the wall clock of the
    budget and of wall_seconds (tests pass a scripted one)."""
    validate_settings(s)
    start = clock()
    plan = Plan(s, load_finished(s))
    out = ResultsFile(s.json_path)
    left = len(plan.remaining())
    workers = worker_count(s, max(1, left))
    tracker = RunProgress(left, s.steps, workers, progress)
    budget = s.budget_minutes * 60 if s.budget_minutes > 0 else math.inf
    if left:
        from memmix.evaluation.recall.estimate import budget_warning

        warning = budget_warning(s, finished=list(plan.finished.values()))
        if warning is not None:
            note(out.messages, warning)

    def finished(result: RunResult) -> None:
        plan.add(result)
        if result.diverged:
            note(out.messages, f"run {result.spec.key} diverged (training loss {result.final_loss}): its accuracy "
                               "is no result; lower --lr")
        out.write(_report(s, plan, clock() - start, out.messages).as_dict())
        if on_result is not None:
            on_result(result)

    def may_start(spec: RunSpec) -> bool:
        """Within the budget, and (when runs of its model and width were measured) finishing within it, unless it
        could never fit one."""
        elapsed = clock() - start
        need = plan.measured_seconds(spec)
        return elapsed < budget and (need is None or need > budget or elapsed + need <= budget)

    if left and workers > 1:
        train_in_processes(plan, s, workers, tracker, finished, may_start)
    elif left:
        with torch_threads(s.num_threads):
            train_here(plan, s, tracker, finished, may_start)
    tracker.close()
    report = _report(s, plan, clock() - start, out.messages)
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
