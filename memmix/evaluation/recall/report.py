"""The recall benchmark's report: one row per (model, d_model) from its runs, the table, the summary line, the
JSON payload and the two plots (accuracy per setting; Zoology's accuracy against recurrent state size)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from memmix.evaluation.recall.models import StateSize
from memmix.evaluation.recall.results import FORMAT, select_best
from memmix.evaluation.recall.settings import (
    RecallSettings,
    hardest_setting,
    learning_rates,
    result_fingerprint,
    settings_grid,
    trained_settings,
)
from memmix.files import atomic_write


@dataclass
class ModelResult:
    """One (model, d_model) row: the best learning rate's runs over seeds. accuracy maps (seq_len, num_kv_pairs)
    to the mean over seeds of the fraction of queries right; accuracy_range to (min, max) over seeds."""

    model: str
    summary: str
    num_layers: int
    d_model: int
    params: int
    state: StateSize
    accuracy: dict[tuple[int, int], float]
    final_loss: float
    train_seconds: float
    loss_curve: list[float]
    lr: float | None = None
    seeds: list[int] = field(default_factory=list)
    accuracy_range: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    valid_accuracy: float | None = None  # mean over seeds
    steps_trained: list[int] = field(default_factory=list)  # per seed
    complete: bool = True  # the sweep and every seed are done
    diverged: bool = False  # a chosen run's training loss ended non-finite: its accuracy is no result

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "summary": self.summary, "num_layers": self.num_layers, "d_model": self.d_model,
            "params": self.params, "recurrent_state": self.state.describe(),
            "state_floats": self.state.floats, "state_floats_per_token": self.state.floats_per_token,
            "accuracy": [{"seq_len": t, "num_kv_pairs": n, "accuracy": a,
                          **({"min": self.accuracy_range[(t, n)][0], "max": self.accuracy_range[(t, n)][1]}
                             if (t, n) in self.accuracy_range else {})} for (t, n), a in self.accuracy.items()],
            "final_loss": self.final_loss, "train_seconds": self.train_seconds, "loss_curve": self.loss_curve,
            "lr": self.lr, "seeds": self.seeds, "valid_accuracy": self.valid_accuracy,
            "steps_trained": self.steps_trained, "complete": self.complete, "diverged": self.diverged,
        }


@dataclass
class RecallReport:
    settings: RecallSettings
    results: list[ModelResult]
    wall_seconds: float
    runs: list = field(default_factory=list)  # RunResult, every finished run (sweep and seeds)
    pending: list[str] = field(default_factory=list)  # runs not finished (a budget stopped this call)
    total_runs: int = 0
    notes: list[str] = field(default_factory=list)  # messages shown during the run (a fallback path, the budget)

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "settings": self.settings.as_dict(),
                "fingerprint": result_fingerprint(self.settings),
                "grid": [list(g) for g in settings_grid(self.settings)],
                "results": [r.as_dict() for r in self.results], "runs": [r.as_dict() for r in self.runs],
                "pending": self.pending, "complete": not self.pending, "wall_seconds": self.wall_seconds,
                "summary": summary_line(self), "notes": self.notes}


def aggregate(s: RecallSettings, runs: list) -> list[ModelResult]:
    """One row per (model, d_model) of ``s`` that has a finished run: the best learning rate's runs (the sweep's,
    chosen on the validation split, and its further seeds), as mean and range over seeds."""
    lrs, rows = learning_rates(s), []
    for d_model in s.d_models:
        for model in s.models:
            mine = [r for r in runs if (r.spec.model, r.spec.d_model) == (model, d_model)]
            sweep = [r for r in mine if r.spec.stage == "sweep" and r.spec.seed == s.seed and r.spec.lr in lrs]
            if not sweep:
                continue
            best = select_best(sweep, lrs) if len(sweep) == len(lrs) else max(
                sweep, key=lambda r: -1.0 if r.valid_accuracy is None else r.valid_accuracy)
            seeds = range(s.seed + 1, s.seed + s.seeds)
            chosen = [best] + sorted((r for r in mine if r.spec.stage == "seed" and r.spec.lr == best.spec.lr
                                      and r.spec.seed in seeds), key=lambda r: r.spec.seed)
            rows.append(_row(best, chosen, complete=len(sweep) == len(lrs) and len(chosen) == s.seeds))
    return rows


def _row(best, chosen: list, complete: bool) -> ModelResult:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    keys = list(best.accuracy)
    valid = [r.valid_accuracy for r in chosen if r.valid_accuracy is not None]
    return ModelResult(
        model=best.spec.model, summary=best.summary, num_layers=best.num_layers, d_model=best.spec.d_model,
        params=best.params, state=best.state, accuracy={k: mean([r.accuracy[k] for r in chosen]) for k in keys},
        final_loss=mean([r.final_loss for r in chosen]), train_seconds=sum(r.train_seconds for r in chosen),
        loss_curve=best.loss_curve, lr=best.spec.lr, seeds=[r.spec.seed for r in chosen],
        accuracy_range={k: (min(r.accuracy[k] for r in chosen), max(r.accuracy[k] for r in chosen)) for k in keys},
        valid_accuracy=mean(valid) if valid else None, steps_trained=[r.steps_trained for r in chosen],
        complete=complete, diverged=any(r.diverged for r in chosen))


# ----------------------------------------------------------------------------------------------- table, summary


def fmt_seconds(seconds: float) -> str:
    """A duration as every recall message prints it: 45s, 3m05s, 2h05m (to the second under an hour, then to the
    minute)."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _accuracy_cell(r: ModelResult, g: tuple[int, int]) -> str:
    if r.diverged:
        return "diverged"
    if len(r.seeds) > 1 and g in r.accuracy_range:
        low, high = r.accuracy_range[g]
        return f"{r.accuracy[g]:.3f} ({low:.3f}-{high:.3f})"
    return f"{r.accuracy[g]:.3f}"


def format_table(report: RecallReport) -> str:
    """A fixed-width table: one row per model (and d_model), one accuracy column per tested (seq_len,
    num_kv_pairs): the mean over seeds and, with several seeds, their range. Columns for the chosen learning
    rate, the seeds and the steps trained appear when the settings sweep, repeat or stop early."""
    s = report.settings
    grid = settings_grid(s)
    sweep, seeds, stops = len(learning_rates(s)) > 1, s.seeds > 1, s.stop_accuracy is not None
    header = ["model", "layers", "d_model", "recurrent state (floats)", "params"]
    header += ["lr"] * sweep + ["seeds"] * seeds + ["steps"] * stops + [f"T={t} N={n}" for t, n in grid]
    rows = []
    for r in report.results:
        cells = [r.model, str(r.num_layers), str(r.d_model), r.state.describe(), f"{r.params:,}"]
        if sweep:
            cells.append(f"{r.lr:g}" + ("" if r.complete else "*"))
        if seeds:
            cells.append(f"{len(r.seeds)}/{s.seeds}")
        if stops:
            cells.append(f"{round(sum(r.steps_trained) / max(1, len(r.steps_trained))):,}")
        rows.append(cells + [_accuracy_cell(r, g) for g in grid])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    numeric_from = 1

    def fmt(line: list[str]) -> str:
        cells = [c.ljust(w) if i < numeric_from else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return " | ".join(cells)

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, rows)])


def summary_line(report: RecallReport) -> str:
    """One line: the ranking at the hardest trained setting, whether the expected order holds, the wall time, and
    how many runs are left when a budget stopped the call."""
    s = report.settings
    setting = hardest_setting(s)
    ranked = sorted(report.results, key=lambda r: (r.diverged, -r.accuracy[setting]))
    ranking = " > ".join(f"{r.model}{'' if len(s.d_models) == 1 else f'@{r.d_model}'} "
                         + ("diverged" if r.diverged else f"{r.accuracy[setting]:.2f}") for r in ranked)
    verdict = expected_order_verdict(report, setting)
    which = "hardest" if set(settings_grid(s)) <= set(trained_settings(s)) else "hardest trained"
    runs = len(report.runs) if report.runs else len(report.results)
    left = (f"; {len(report.pending)} of {report.total_runs} runs left: run the same command again to continue"
            if report.pending else "")
    return (f"recall at T={setting[0]} N={setting[1]} ({which}): {ranking}{verdict}; "
            f"{runs} runs in {fmt_seconds(report.wall_seconds)}{left}")


EXPECTED_ORDER = ["attention", "mom", "gdn", "linear"]  # the paper's claim: attention >= mom > gdn > linear


def expected_order_verdict(report: RecallReport, setting: tuple[int, int]) -> str:
    """' | expected attention >= mom > gdn > linear: holds' (or 'does not hold'), over the models present."""
    chain: list[str] = []
    for d_model in report.settings.d_models:
        present = {r.model: r.accuracy[setting] for r in report.results if r.d_model == d_model}
        chain = [m for m in EXPECTED_ORDER if m in present]
        if len(chain) < 2:
            return ""
        ok = all(present[a] >= present[b] if a == "attention" else present[a] > present[b]
                 for a, b in zip(chain, chain[1:]))
        if not ok:
            return f" | expected {_order_text(chain)}: does NOT hold"
    return f" | expected {_order_text(chain)}: holds" if chain else ""


def _order_text(chain: list[str]) -> str:
    return "".join(f"{a} {'>=' if a == 'attention' else '>'} " for a in chain[:-1]) + chain[-1]


# ----------------------------------------------------------------------------------------------- plots


def _label(report: RecallReport, r: ModelResult) -> str:
    return r.model if len(report.settings.d_models) == 1 else f"{r.model} d={r.d_model}"


def _save(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: RecallReport, path: str | os.PathLike) -> None:
    """PNG: accuracy against num_kv_pairs, one panel per tested seq_len (with an explicit test grid: one panel,
    one x position per tested setting), one line per row, the seeds' range shaded; written atomically."""
    if report.settings.test_grid is not None:
        return _plot_grid_accuracy(report, path)
    plt = _pyplot()
    s = report.settings
    grid = settings_grid(s)
    seq_lens = list(dict.fromkeys(t for t, _ in grid))
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(4.2 * len(seq_lens), 3.6), squeeze=False, sharey=True)
    for ax, seq_len in zip(axes[0], seq_lens):
        for r in report.results:
            points = sorted((n, a) for (t, n), a in r.accuracy.items() if t == seq_len)
            counts = [n for n, _ in points]
            line, = ax.plot(counts, [a for _, a in points], marker="o", label=_label(report, r))
            if len(r.seeds) > 1:
                ranges = [r.accuracy_range[(seq_len, n)] for n in counts]
                ax.fill_between(counts, [lo for lo, _ in ranges], [hi for _, hi in ranges], color=line.get_color(),
                                alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        counts = sorted({n for t, n in grid if t == seq_len})
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
        ax.set_title(f"seq_len {seq_len}")
        ax.set_xlabel("key-value pairs")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"MQAR recall, {s.num_layers} layers, {s.steps} steps", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _plot_grid_accuracy(report: RecallReport, path: str | os.PathLike) -> None:
    plt = _pyplot()
    s = report.settings
    grid, trained = settings_grid(s), set(trained_settings(s))
    fig, ax = plt.subplots(figsize=(1.2 * len(grid) + 3.0, 4.0))
    xs = list(range(len(grid)))
    for r in report.results:
        line, = ax.plot(xs, [r.accuracy[g] for g in grid], marker="o", label=_label(report, r))
        if len(r.seeds) > 1:
            ax.fill_between(xs, [r.accuracy_range[g][0] for g in grid], [r.accuracy_range[g][1] for g in grid],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    longest = max(t for t, _ in trained)

    def label(t: int, n: int) -> str:
        note = "" if (t, n) in trained else "\n(longer)" if t > longest else "\n(not trained)"
        return f"T={t}\nN={n}{note}"

    ax.set_xticks(xs, [label(t, n) for t, n in grid])
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"MQAR recall, {s.num_layers} layers, up to {s.steps} steps", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_state_accuracy(report: RecallReport, path: str | os.PathLike) -> None:
    """PNG, Zoology's figure: accuracy at the hardest trained setting against the recurrent state size (floats per
    sequence, log scale; attention: its KV cache at that length), one point per (model, d_model) with the seeds'
    range as an error bar, one colour per model; written atomically."""
    plt = _pyplot()
    s = report.settings
    setting = hardest_setting(s)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, model in enumerate(dict.fromkeys(r.model for r in report.results)):
        rows = sorted((r for r in report.results if r.model == model), key=lambda r: r.d_model)
        x = [r.state.at_length(setting[0]) for r in rows]
        y = [r.accuracy[setting] for r in rows]
        low = [y_i - r.accuracy_range.get(setting, (y_i, y_i))[0] for r, y_i in zip(rows, y)]
        high = [r.accuracy_range.get(setting, (y_i, y_i))[1] - y_i for r, y_i in zip(rows, y)]
        colour = colours[index % len(colours)]
        ax.errorbar(x, y, yerr=[low, high], color=colour, marker="o", capsize=3, label=model)
        for r, x_i, y_i in zip(rows, x, y):
            ax.annotate(f"d={r.d_model}", (x_i, y_i), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=colour)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(f"recurrent state (floats per sequence; attention: KV cache at {setting[0]} tokens)")
    ax.set_ylabel(f"accuracy at T={setting[0]} N={setting[1]}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"MQAR recall against state size, {s.num_layers} layers", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
