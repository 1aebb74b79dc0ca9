"""How long a RecallSettings takes on a device, before it starts: a per-step cost model.

    est = estimate_seconds(settings, "cpu")      # every run at the step cap (an upper bound with early stopping)
    print(est.describe())                        # "about 6m30s for 4 runs on 2 workers (cost model: ...)"

A training step of a model costs ``fixed + per_token * tokens * (d_model / 64) ** width_power`` seconds plus its
LM head: ``6 * tokens * d_model * vocab_size`` flops at the device's matmul rate and a cost per logit (the float32
logits are written, soft-maxed and back-propagated: at vocabulary 8192 that dominates small models). The CPU
coefficients were measured on this project's 2-core CPU machine (one thread per run) with ``calibrate`` (``python -m
memmix.evaluation.recall.estimate --calibrate``); the CUDA ones are a guess (below) until a device run calibrates
them: the runs of a results file carry their measured seconds per step, and ``estimate_seconds(...,
finished=runs)`` uses those where it has them.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field

import torch

from memmix.evaluation.recall.report import fmt_seconds
from memmix.evaluation.recall.settings import (
    RecallSettings,
    settings_grid,
    trained_settings,
    training_sets,
)


@dataclass(frozen=True)
class StepCost:
    """Seconds of one training step: fixed + per_token * tokens * (d_model / 64) ** width_power (+ the LM head)."""

    fixed: float
    per_token: float
    width_power: float

    def seconds(self, tokens: int, d_model: int) -> float:
        return self.fixed + self.per_token * tokens * (d_model / 64) ** self.width_power


# The project's 2-core x86-64 CPU (AMD EPYC), one torch thread per run, 2026-12-04: calibrate() at d_model 64 / 128,
# batches of 16 x 32 and 16 x 128 tokens, vocabulary 64 (the head is modelled apart), timed in CPU seconds on the
# busy shared machine, then scaled by 0.55 so that the CPU demo's four models match their seconds per step on the
# idle machine (docs/recall_demo.json: attention 13.6, mom 82.5, gdn 31.0, linear 23.9 ms; the scale was 0.55 for
# each of the four within 3%).
CPU_COSTS: dict[str, StepCost] = {
    "attention": StepCost(0.0025, 2.1e-5, 1.64),
    "mom": StepCost(0.0226, 1.16e-4, 1.36),
    "gdn": StepCost(0.0157, 3.0e-5, 1.44),
    "gdn-wide": StepCost(0.0, 2.3e-4, 1.0),
    "linear": StepCost(0.0050, 3.6e-5, 0.91),
    "bmojo": StepCost(0.0141, 1.1e-4, 1.23),
}
CPU_HEAD_FLOPS = 1.0e11  # flop/s of one thread on the LM head's matmuls (calibrate(), scaled as above)
# Seconds per logit beyond the matmuls (writing, soft-maxing and back-propagating the (tokens, vocab) float32
# logits): gdn at d_model 16 / 64, 1024 tokens, vocabulary 64 against 8192, scaled as above.
CPU_SECONDS_PER_LOGIT = 1.3e-8

# CUDA (H200) guess, not measured on this machine: eager steps of 4 runs sharing one H200 (d_model 128,
# batch 64 x 256, vocab 8192): MoM 93 ms, GDN and linear 63 ms, attention 25 ms a step. Launch-bound, so nearly
# independent of tokens and width; B'MOJO and gdn-wide are guessed from their kernel counts. Up to
# CUDA_CONCURRENT_RUNS runs overlap fully (each process has its own CPU core for the launches).
CUDA_COSTS: dict[str, StepCost] = {
    "attention": StepCost(0.025, 0.0, 0.0),
    "mom": StepCost(0.093, 0.0, 0.0),
    "gdn": StepCost(0.063, 0.0, 0.0),
    "gdn-wide": StepCost(0.065, 0.0, 0.0),
    "linear": StepCost(0.063, 0.0, 0.0),
    "bmojo": StepCost(0.100, 0.0, 0.0),
}
# Targets for the captured (CUDA-graph) training step, one run: MoM >= 150, GDN and linear >= 200, attention >= 250
# steps/s (B'MOJO and gdn-wide guessed); with them 8 runs on one GPU give >= 4x one run. Pass as ``costs=``.
CAPTURED_STEP_TARGET_COSTS: dict[str, StepCost] = {
    "attention": StepCost(0.004, 0.0, 0.0),
    "mom": StepCost(0.0067, 0.0, 0.0),
    "gdn": StepCost(0.005, 0.0, 0.0),
    "gdn-wide": StepCost(0.0055, 0.0, 0.0),
    "linear": StepCost(0.005, 0.0, 0.0),
    "bmojo": StepCost(0.008, 0.0, 0.0),
}
CUDA_HEAD_FLOPS = 2.0e14  # the head's matmuls, well below the H200's peak (small shapes, fp32)
CUDA_SECONDS_PER_LOGIT = 1.1e-11  # about 8 passes of 4 bytes a logit at about 3 TB/s
CUDA_CONCURRENT_RUNS = 4
DATA_SECONDS_PER_TOKEN = {"cpu": 1.0e-6, "cuda": 0.5e-6}  # generating the splits, once per worker process
WORKER_START_SECONDS = {"cpu": 10.0, "cuda": 20.0}  # a worker process imports torch (and starts CUDA)


@dataclass
class Estimate:
    """seconds: wall time of the runs still to train (all at the step cap unless measured otherwise);
    run_seconds: per run key; basis: where the step costs come from."""

    seconds: float
    runs: int
    workers: int
    device: str
    basis: str
    run_seconds: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"about {fmt_seconds(self.seconds)} for {self.runs} runs on {self.workers} worker"
                f"{'s' if self.workers != 1 else ''} ({self.device}; {self.basis})")


def _step_tokens(s: RecallSettings) -> float:
    """Tokens a training step sees, on average over the training sets (they take turns)."""
    lengths = [k[0] if isinstance(k, tuple) else k for k in training_sets(s)]
    return s.batch_size * sum(lengths) / len(lengths)


def _cost_table(device_type: str) -> tuple[dict[str, StepCost], float, float]:
    if device_type == "cuda":
        return CUDA_COSTS, CUDA_HEAD_FLOPS, CUDA_SECONDS_PER_LOGIT
    return CPU_COSTS, CPU_HEAD_FLOPS, CPU_SECONDS_PER_LOGIT


def step_seconds(s: RecallSettings, model: str, d_model: int, device_type: str,
                 costs: dict[str, StepCost] | None = None) -> float:
    """Modelled seconds of one training step of ``model`` at ``d_model`` under ``s`` on a device type (``costs``
    replaces the device's table)."""
    table, head_flops, per_logit = _cost_table(device_type)
    costs = costs or table
    cost = costs.get(model) or costs[_cost_family(model)]
    tokens = _step_tokens(s)
    return cost.seconds(tokens, d_model) + tokens * s.vocab_size * (6 * d_model / head_flops + per_logit)


def _cost_family(model: str) -> str:
    """The costed model a variant is priced as: the MoM ablations, mom-h64 and fla-mom as mom; the rest as gdn."""
    return "mom" if model.startswith("mom") or model == "fla-mom" else "gdn"


def _eval_seconds(s: RecallSettings, step: float, steps: int) -> float:
    """Validation checks during a run and the test at its end, as forward passes (a third of a step per token)."""
    per_token = step / (3 * _step_tokens(s))
    valid_tokens = s.num_valid * sum(t for t, _ in trained_settings(s))
    checks = steps // s.eval_every if s.stop_accuracy is not None and s.num_valid else 0
    test_tokens = s.num_test * sum(t for t, _ in settings_grid(s))
    return per_token * (valid_tokens * (checks + bool(s.num_valid)) + test_tokens)


def estimate_seconds(s: RecallSettings, device: str | None = None, finished: list | None = None,
                     stop_fraction: float = 1.0, costs: dict[str, StepCost] | None = None) -> Estimate:
    """Wall time of the runs ``s`` still needs on ``device`` (default s.device).

    finished: RunResults already done (a results file's runs): they are not counted, and their measured seconds
    per step replace the model for their (model, d_model). stop_fraction: the share of the step cap a run is
    assumed to train (1.0: no early stop, an upper bound). costs: step costs replacing the device's table (e.g.
    CAPTURED_STEP_TARGET_COSTS). Runs are packed onto the workers in plan order."""
    from memmix.evaluation.recall.plan import Plan
    from memmix.evaluation.recall.pool import worker_count

    device_type = torch.device(device or s.device).type
    done = {r.spec.key: r for r in finished or []}
    measured: dict[tuple[str, int], list[float]] = {}
    for r in done.values():
        measured.setdefault((r.spec.model, r.spec.d_model), []).append(r.train_seconds / max(1, r.steps_trained))
    steps = max(1, round(s.steps * stop_fraction))
    run_seconds = {}
    for (model, d_model), keys in Plan(s, done).remaining_by_group().items():
        own = measured.get((model, d_model))
        step = sum(own) / len(own) if own else step_seconds(s, model, d_model, device_type, costs)
        for key in keys:
            run_seconds[key] = steps * step + (0.0 if own else _eval_seconds(s, step, steps))
    same_device = device_type == s.device.split(":")[0]
    workers = worker_count(s, max(1, len(run_seconds))) if same_device or s.workers else 1
    cores = max(1, (os.cpu_count() or 1) // max(1, s.num_threads))
    lanes = [0.0] * min(workers, CUDA_CONCURRENT_RUNS if device_type == "cuda" else cores)
    for seconds in run_seconds.values():
        lanes[lanes.index(min(lanes))] += seconds
    data_tokens = (s.num_train * len(training_sets(s)) + s.num_valid * len(trained_settings(s))) * \
        _step_tokens(s) / s.batch_size + s.num_test * sum(t for t, _ in settings_grid(s))
    kind = "cuda" if device_type == "cuda" else "cpu"
    start = (data_tokens * DATA_SECONDS_PER_TOKEN[kind] + WORKER_START_SECONDS[kind] * (len(lanes) > 1)
             if run_seconds else 0.0)
    basis = "CPU cost model measured on a 2-core CPU" if device_type == "cpu" else \
        "CUDA guess from eager H200 steps, not calibrated"
    if costs is not None:
        basis = "the given step costs"
    if measured:
        basis += f"; seconds per step of {len(done)} finished runs"
    return Estimate(seconds=max(lanes) + start, runs=len(run_seconds), workers=len(lanes), device=device_type,
                    basis=basis, run_seconds=run_seconds)


def preflight_warning(s: RecallSettings, limit_minutes: float = 30.0, finished: list | None = None) -> str | None:
    """A one-line warning when ``s`` is estimated to take more than ``limit_minutes`` on its device (for the CLI
    to print, or to refuse without a --force, before a GPU-sized preset starts on the CPU); else None."""
    est = estimate_seconds(s, finished=finished)
    if est.seconds <= limit_minutes * 60:
        return None
    hint = " (a GPU-sized grid: use --device cuda)" if est.device == "cpu" and est.seconds > 3 * 3600 else ""
    return f"this grid takes {est.describe()}{hint}; a budget (budget_minutes) and a json_path let it run in parts"


def budget_warning(s: RecallSettings, finished: list | None = None) -> str | None:
    """One line when some run still to train is estimated to take longer at the step cap than budget_minutes (it
    could never finish within one call of that length: a run stopped mid-way is trained again from its start), with
    the largest step cap that would fit; None without a budget or when every run fits. Early stopping may end a run
    sooner: this is the run that does not learn."""
    if s.budget_minutes <= 0:
        return None
    est = estimate_seconds(s, finished=finished)
    if not est.run_seconds:
        return None
    key, seconds = max(est.run_seconds.items(), key=lambda item: item[1])
    budget = s.budget_minutes * 60
    if seconds <= budget:
        return None
    fits = int(s.steps * budget / seconds) // 100 * 100
    cap = f"a step cap of about {fits:,} fits" if fits else "no step cap of 100 or more fits"
    return (f"a run that trains to the {s.steps:,}-step cap ({key}) takes about {fmt_seconds(seconds)} ({est.device}; "
            f"{est.basis}), more than the {s.budget_minutes:g}-min budget: it cannot finish within one call and is "
            f"trained again from its start by the next; {cap} (steps, --steps)")


# ----------------------------------------------------------------------------------------------- calibration


def calibrate(models: list[str], d_models: list[int], seq_lens: list[int], batch_size: int = 16,
              vocab_size: int = 64, head_dim: int = 8, device: str = "cpu", steps: int = 20) -> dict:
    """Measured seconds per training step (after one warm-up step) of each model at each width and length:
    {(model, d_model, seq_len): seconds}, and the head's matmul rate under "head_flops". On the CPU the clock is
    this process's CPU time (one thread), so other processes on a shared machine do not inflate it."""
    clock = time.process_time if torch.device(device).type == "cpu" else _synced_clock(device)
    from memmix.data.mqar import generate_mqar
    from memmix.evaluation.recall.models import RECALL_MODELS, ModelSize
    from memmix.evaluation.recall.training import Recipe, train_steps

    results: dict = {}
    for seq_len in seq_lens:
        data = generate_mqar(batch_size * (steps + 1), seq_len, max(1, seq_len // 8), vocab_size, 0).to(device)
        for d_model in d_models:
            for model in models:
                torch.manual_seed(0)
                net = RECALL_MODELS[model].build(ModelSize(vocab_size, d_model, 2, head_dim)).to(device)
                recipe = Recipe(steps=steps + 1, lr=1e-3, weight_decay=0.1, warmup_fraction=0.0,
                                batch_size=batch_size, seed=0, log_every=1)
                marks = []
                train_steps(net, {seq_len: data}, lambda b: {"input_ids": b.input_ids}, recipe,
                            on_log=lambda done, loss: marks.append(clock()))
                results[(model, d_model, seq_len)] = (marks[-1] - marks[0]) / steps
    a, b = torch.randn(2048, 256, device=device), torch.randn(256, 2048, device=device)
    start, reps = clock(), 5
    for _ in range(reps):
        (a @ b).sum().item()
    results["head_flops"] = reps * 2 * 2048 * 256 * 2048 / (clock() - start)
    return results


def _synced_clock(device: str):
    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


def fit_costs(measured: dict, batch_size: int) -> dict[str, StepCost]:
    """StepCost per model from calibrate()'s numbers at two lengths and two widths (the smallest of each)."""
    keys = [k for k in measured if isinstance(k, tuple)]
    out = {}
    for model in dict.fromkeys(k[0] for k in keys):
        widths = sorted({k[1] for k in keys if k[0] == model})
        lengths = sorted({k[2] for k in keys if k[0] == model})
        d0, t0, t1 = widths[0], lengths[0], lengths[-1]
        per_token = (measured[(model, d0, t1)] - measured[(model, d0, t0)]) / (batch_size * (t1 - t0))
        fixed = max(0.0, measured[(model, d0, t0)] - per_token * batch_size * t0)
        power = 1.0
        if len(widths) > 1 and per_token > 0:
            d1 = widths[-1]
            grow = (measured[(model, d1, t1)] - fixed) / (per_token * batch_size * t1)
            power = max(0.0, math.log(max(grow, 1e-9)) / math.log(d1 / d0))
        out[model] = StepCost(round(fixed, 4), float(f"{per_token * (64 / d0) ** power:.2g}"), round(power, 2))
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m memmix.evaluation.recall.estimate --calibrate [--device cuda]`: print measured StepCosts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calibrate", action="store_true", help="measure step costs on --device and print them")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="attention,mom,gdn,gdn-wide,linear,bmojo")
    args = p.parse_args(argv)
    if args.calibrate:
        torch.set_num_threads(1)
        measured = calibrate(args.models.split(","), [64, 128], [32, 128], device=args.device)
        for key, value in measured.items():
            print(key, f"{value:.4g}")
        for model, cost in fit_costs(measured, 16).items():
            print(f'    "{model}": {cost},')


if __name__ == "__main__":
    main()
