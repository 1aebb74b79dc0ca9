"""The GPU recall study's driver (benchmarks/recall_study.sh runs it under a time limit): one part of the grid.

    python3 benchmarks/recall_study.py RESULTS_JSON     # env: PRESET DEVICE WORKERS BUDGET_MIN OVERRIDES

Continues RESULTS_JSON (created if missing), starts runs for BUDGET_MIN minutes, prints one line per finished run,
then the table, the summary and the estimate of what is left (also written beside RESULTS_JSON as .txt). Ctrl-C
(SIGINT) stops every worker at once; the finished runs stay in RESULTS_JSON (exit 130).
"""
from __future__ import annotations

import json
import os
import sys
import time

from memmix.evaluation.recall import (
    PRESETS,
    RecallSettingError,
    RecallSettings,
    estimate_seconds,
    format_table,
    run_recall,
    summary_line,
    validate_settings,
)
from memmix.evaluation.recall.results import RunResult, load_finished
from memmix.files import atomic_write_text


def settings_from_env(json_path: str) -> RecallSettings:
    """The preset, on DEVICE with WORKERS runs at once and a BUDGET_MIN budget, overridden by OVERRIDES (JSON)."""
    stem = json_path.removesuffix(".json")
    values = dict(PRESETS[os.environ.get("PRESET", "zoology")], device=os.environ.get("DEVICE", "cuda"),
                  workers=int(os.environ.get("WORKERS", "8")), budget_minutes=float(os.environ.get("BUDGET_MIN", "6")),
                  json_path=json_path, plot_path=stem + ".png", state_plot_path=stem + "_state.png")
    values.update(json.loads(os.environ.get("OVERRIDES") or "{}"))
    return RecallSettings(**values)


def describe(run: RunResult, since: float) -> str:
    accuracy = ", ".join(f"{t}x{n} {a:.3f}" for (t, n), a in run.accuracy.items())
    early = " (stopped early)" if run.stopped_early else ""
    return (f"[{time.monotonic() - since:6.0f}s] {run.spec.key}: {run.steps_trained} steps{early}, valid "
            f"{run.valid_accuracy}, {1000 * run.train_seconds / max(1, run.steps_trained):.1f} ms/step; {accuracy}")


def main(json_path: str) -> int:
    settings = settings_from_env(json_path)
    try:
        validate_settings(settings)
    except RecallSettingError as err:
        print(f"recall study: {err}", file=sys.stderr)
        return 2
    finished = list(load_finished(settings).values())
    print(f"{len(finished)} runs done before; to do: {estimate_seconds(settings, finished=finished).describe()}")
    since = time.monotonic()
    try:
        report = run_recall(settings, progress=False, on_result=lambda run: print(describe(run, since), flush=True))
    except KeyboardInterrupt:
        print(f"interrupted: the finished runs are in {json_path}; call again with it to continue")
        return 130
    left = estimate_seconds(settings, finished=report.runs)
    text = "\n".join([format_table(report), summary_line(report),
                      f"left: {left.describe()}" if report.pending else "complete"]) + "\n"
    atomic_write_text(settings.plot_path[: -len(".png")] + ".txt", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
