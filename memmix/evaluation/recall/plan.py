"""The plan of a recall benchmark's runs, per (model, d_model): one run per learning rate at the first seed (the
sweep), then, once the sweep is done, the best learning rate on the validation split again at seeds seed + 1, ...,
seed + seeds - 1; which are finished and which may start now."""
from __future__ import annotations

from collections.abc import Callable

from memmix.evaluation.recall.results import RunResult, RunSpec, select_best
from memmix.evaluation.recall.settings import RecallSettings, learning_rates


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
