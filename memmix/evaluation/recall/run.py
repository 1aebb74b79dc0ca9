"""One run of the recall benchmark: build a model, train it, test it at every setting."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from memmix.evaluation.recall.models import RECALL_MODELS, ModelSize, count_parameters
from memmix.evaluation.recall.results import RunResult, RunSpec
from memmix.evaluation.recall.settings import RecallSettings, fast_path
from memmix.evaluation.recall.tasks import MQARTask
from memmix.evaluation.recall.training import Recipe, train_steps


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
                    stop_accuracy=s.stop_accuracy, cuda_graph=fast_path(s, "cuda_graph") and entry.graphable,
                    query_head=fast_path(s, "query_head"), bf16=fast_path(s, "bf16"))
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
                     final_loss=sum(tail) / len(tail), train_seconds=seconds, loss_curve=thin(log.losses, 200))


def thin(values: list[float], keep: int) -> list[float]:
    """About `keep` values evenly spaced from `values` (a loss curve for the results file), rounded to 5 digits."""
    stride = max(1, math.ceil(len(values) / keep))
    return [round(v, 5) for v in values[::stride]]
