"""Progress bars of the recall benchmark's runs, with an ETA for all of them."""
from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm

from memmix.evaluation.recall.plan import Plan
from memmix.evaluation.recall.report import fmt_seconds
from memmix.evaluation.recall.results import RunSpec


class RunProgress:
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
