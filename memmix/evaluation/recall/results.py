"""One training run's numbers (RunResult) and the results file that keeps them as they finish.

The results file (RecallSettings.json_path) is the full report, rewritten atomically after every finished run.
A later call with the same result-changing settings (settings.RESULT_FIELDS) reads its runs back and trains only
the missing ones; with different ones it is refused, naming the first differing setting.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from memmix.evaluation.recall.models import StateSize
from memmix.evaluation.recall.settings import (
    RESULT_FIELDS,
    RecallSettingError,
    RecallSettings,
    result_fingerprint,
)
from memmix.files import atomic_write_json

FORMAT = "memmix-recall/2"  # the results file's "format"; files without it cannot be continued


@dataclass(frozen=True)
class RunSpec:
    """One training run: a model at a width, a learning rate and a seed. stage: "sweep" (the learning-rate sweep,
    at the first seed) or "seed" (a further seed of the best learning rate)."""

    model: str
    d_model: int
    lr: float
    seed: int
    stage: str = "sweep"

    @property
    def key(self) -> str:
        return f"{self.model} d={self.d_model} lr={self.lr!r} seed={self.seed}"  # repr: distinct rates, distinct keys


@dataclass
class RunResult:
    """A finished run. accuracy: test accuracy per (seq_len, num_kv_pairs); valid_accuracy: on the validation
    split at the end (None without one); valid_curve: (step, accuracy) of the checks during training."""

    spec: RunSpec
    summary: str
    num_layers: int
    params: int
    state: StateSize
    accuracy: dict[tuple[int, int], float]
    valid_accuracy: float | None
    valid_curve: list[tuple[int, float]]
    steps_trained: int
    stopped_early: bool
    final_loss: float
    train_seconds: float
    loss_curve: list[float]

    @property
    def diverged(self) -> bool:
        """The training loss ended non-finite: its accuracies are no result."""
        return not math.isfinite(self.final_loss)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.spec.key, "diverged": self.diverged, "model": self.spec.model, "d_model": self.spec.d_model, "lr": self.spec.lr,
            "seed": self.spec.seed, "stage": self.spec.stage, "summary": self.summary,
            "num_layers": self.num_layers, "params": self.params, "recurrent_state": self.state.describe(),
            "state_floats": self.state.floats, "state_floats_per_token": self.state.floats_per_token,
            "state_formula": self.state.formula,
            "accuracy": [{"seq_len": t, "num_kv_pairs": n, "accuracy": a} for (t, n), a in self.accuracy.items()],
            "valid_accuracy": self.valid_accuracy, "valid_curve": [list(p) for p in self.valid_curve],
            "steps_trained": self.steps_trained, "stopped_early": self.stopped_early, "final_loss": self.final_loss,
            "train_seconds": self.train_seconds, "loss_curve": self.loss_curve,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        spec = RunSpec(d["model"], int(d["d_model"]), float(d["lr"]), int(d["seed"]), d["stage"])
        state = StateSize(d["state_floats"], d["state_floats_per_token"], d.get("state_formula", ""))
        accuracy = {(int(a["seq_len"]), int(a["num_kv_pairs"])): float(a["accuracy"]) for a in d["accuracy"]}
        return cls(spec, d["summary"], int(d["num_layers"]), int(d["params"]), state, accuracy, d["valid_accuracy"],
                   [(int(s), float(a)) for s, a in d["valid_curve"]], int(d["steps_trained"]),
                   bool(d["stopped_early"]), _number(d["final_loss"]), float(d["train_seconds"]),
                   [_number(v) for v in d["loss_curve"]])


def _number(value) -> float:
    """A float read back from JSON, where null stands for a non-finite value (a diverged run's loss)."""
    return math.nan if value is None else float(value)


def select_best(sweep: list[RunResult], lrs: list[float]) -> RunResult:
    """The sweep run with the highest validation accuracy (never test); ties: fewer steps (it reached the target
    sooner), then the learning rate listed first. Without a validation split there must be one run."""
    if len(sweep) == 1:
        return sweep[0]
    if any(r.valid_accuracy is None for r in sweep):
        raise ValueError("picking a learning rate needs the validation accuracy of every sweep run")
    order = {lr: i for i, lr in enumerate(lrs)}
    return min(sweep, key=lambda r: (-r.valid_accuracy, r.steps_trained, order.get(r.spec.lr, len(order))))


# ----------------------------------------------------------------------------------------------- the file


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecallSettingError("json_path", f"'{path}' exists but cannot be read as a results file ({err}); "
                                              "pass another path or remove it") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RecallSettingError("json_path", f"'{path}' holds no resumable recall results (no \"format\": "
                                              f"\"{FORMAT}\"; an older memmix or another program wrote it); "
                                              "pass another path or remove it")
    return payload


def check_resumable(s: RecallSettings) -> None:
    """Raise RecallSettingError naming the first result-changing setting in which an existing results file at
    s.json_path differs from ``s`` (nothing when there is no file)."""
    if not s.json_path or not os.path.exists(s.json_path):
        return
    stored = _read(s.json_path).get("fingerprint", {})
    ours = result_fingerprint(s)
    for name in RESULT_FIELDS:
        if stored.get(name) != ours[name]:
            raise RecallSettingError(
                name, f"the results in '{s.json_path}' were made with {name}={stored.get(name)!r}, these settings "
                      f"have {name}={ours[name]!r}; continue them with the same value, or write to another json_path")


def load_finished(s: RecallSettings) -> dict[str, RunResult]:
    """The finished runs in s.json_path, by RunSpec.key (empty without a file); checks it can be continued."""
    if not s.json_path or not os.path.exists(s.json_path):
        return {}
    check_resumable(s)
    runs = (RunResult.from_dict(d) for d in _read(s.json_path).get("runs", []))
    return {r.spec.key: r for r in runs}


@dataclass
class ResultsFile:
    """Where the results go: s.json_path, or after a failed write a fallback file named in a message (once)."""

    path: str | None
    fallback: str | None = None
    messages: list[str] = field(default_factory=list)

    def write(self, payload: dict[str, Any]) -> None:
        if self.path is None:
            return
        target = self.fallback or self.path
        try:
            atomic_write_json(target, payload)
        except OSError as err:
            if self.fallback is not None:
                raise
            self.fallback = fallback_path(self.path)
            atomic_write_json(self.fallback, payload)
            note(self.messages, f"could not write '{self.path}' ({err.strerror or err}); the results are in "
                                f"'{self.fallback}'")

    @property
    def where(self) -> str | None:
        return self.fallback or self.path


def fallback_path(path: str) -> str:
    """A path in the temporary folder for an output whose own path failed: memmix-recall-<time>-<name>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(tempfile.gettempdir(), f"memmix-recall-{stamp}-{os.getpid()}-{os.path.basename(path)}")


def note(messages: list[str], text: str) -> None:
    """Record a message for the report and show it now (stderr)."""
    messages.append(text)
    print(f"memmix recall: {text}", file=sys.stderr, flush=True)
