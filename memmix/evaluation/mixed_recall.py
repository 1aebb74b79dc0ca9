"""The mixed-modal recall benchmark; it lives in memmix.evaluation.recall.mixed, this path re-exports it."""
from memmix.evaluation.recall.mixed import (  # noqa: F401
    GROUPS,
    MIXED_VARIANTS,
    MixedRecallReport,
    MixedRecallSettings,
    MixedResult,
    MixedVariant,
    build_mixed_model,
    format_mixed_table,
    mixed_grid,
    mixed_recall_accuracy,
    mixed_summary_line,
    run_mixed_recall,
    train_mixed,
    validate_mixed_settings,
)
