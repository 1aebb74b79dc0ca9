"""The associative-recall benchmark: train several models on MQAR under one protocol, test each setting.

    settings = RecallSettings(models=["mom", "gdn"], seq_lens=[64], num_kv_pairs=[4, 8])
    report = run_recall(settings)          # trains, evaluates, returns every number
    print(format_table(report))

Modules: settings (RecallSettings, presets, validation, grids), tasks (MQAR and mixed-modal recall data behind one
interface), models (the registry: adding a model is one ``register_model`` call), training (the loop over
memmix.training.step.TrainStep), plan (the runs), run (one run), pool (in this process or worker processes),
progress (the bars), runner (the benchmark: resume, budget), results (a run's numbers
and the results file), report (table, summary, JSON, plots), estimate (wall time before starting), mixed (the
mixed-modal routing benchmark).
"""
from memmix.evaluation.recall.estimate import (
    Estimate,
    estimate_seconds,
    preflight_warning,
)
from memmix.evaluation.recall.models import (
    ABLATION_MODELS,
    BUILTIN_MODELS,
    RECALL_MODELS,
    ModelSize,
    RecallModel,
    StateSize,
    count_parameters,
    mom_family_state_size,
    register_model,
    register_mom_variant,
)
from memmix.evaluation.recall.report import (
    ModelResult,
    RecallReport,
    format_table,
    hardest_setting,
    plot_accuracy,
    plot_state_accuracy,
    summary_line,
)
from memmix.evaluation.recall.results import RunResult, RunSpec, check_resumable, select_best
from memmix.evaluation.recall.pool import worker_count
from memmix.evaluation.recall.runner import run_recall
from memmix.evaluation.recall.settings import (
    PRESETS,
    RecallSettingError,
    RecallSettings,
    settings_grid,
    validate_settings,
)
from memmix.evaluation.recall.tasks import MQARTask, recall_accuracy
from memmix.evaluation.recall.training import Recipe, endless_batches, train_steps

__all__ = [
    "ABLATION_MODELS",
    "BUILTIN_MODELS",
    "PRESETS",
    "RECALL_MODELS",
    "Estimate",
    "MQARTask",
    "ModelResult",
    "ModelSize",
    "RecallModel",
    "RecallReport",
    "RecallSettingError",
    "RecallSettings",
    "Recipe",
    "RunResult",
    "RunSpec",
    "StateSize",
    "check_resumable",
    "count_parameters",
    "endless_batches",
    "estimate_seconds",
    "format_table",
    "hardest_setting",
    "mom_family_state_size",
    "plot_accuracy",
    "plot_state_accuracy",
    "preflight_warning",
    "recall_accuracy",
    "register_model",
    "register_mom_variant",
    "run_recall",
    "select_best",
    "settings_grid",
    "summary_line",
    "train_steps",
    "validate_settings",
    "worker_count",
]
