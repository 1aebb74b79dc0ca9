"""RecallSettings: everything one recall benchmark depends on; its presets, validation and grids.

Two ways to name the (seq_len, num_kv_pairs) settings:
- product style (the CPU demo): ``seq_lens`` x ``num_kv_pairs``; one training set per seq_len mixing every pair
  count that fits, one test set per (seq_len, count);
- grid style (Zoology): explicit ``train_grid`` and ``test_grid`` lists of (seq_len, num_kv_pairs); one training
  set per train setting (so a batch always has one shape), one test set per test setting. A side whose grid is
  None falls back to the product; with both grids given, seq_lens and num_kv_pairs must be empty.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memmix.checks import is_int
from memmix.data.mqar import MQAR_STYLES, max_kv_pairs
from memmix.evaluation.recall.models import RECALL_MODELS, UNAVAILABLE_MODELS
from memmix.files import check_writable


class RecallSettingError(ValueError):
    """A bad benchmark setting; ``setting`` names the RecallSettings field (the CLI maps it to its option)."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.detail = message


@dataclass
class RecallSettings:
    """Everything one benchmark run depends on; the defaults are the CPU demo (about 6.5 min on 2 free cores)."""

    models: list[str] = field(default_factory=lambda: ["attention", "mom", "gdn", "linear"])
    seq_lens: list[int] = field(default_factory=lambda: [32])
    num_kv_pairs: list[int] = field(default_factory=lambda: [2, 4, 8])
    d_models: list[int] = field(default_factory=lambda: [64])
    num_layers: int = 2
    head_dim: int = 8  # small heads: 8 pairs already fill one 8 x 8 memory
    steps: int = 4500  # training steps per run (the cap when stop_accuracy is set)
    lr: float | list[float] = 1e-3  # several: a sweep, the best on the validation split is kept
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05  # of steps, linear warm-up before the cosine decay
    batch_size: int = 16
    vocab_size: int = 64
    num_train: int = 20_000  # per training set (per seq_len, or per train_grid setting)
    num_test: int = 500  # per tested (seq_len, num_kv_pairs)
    eval_batch_size: int = 250
    seed: int = 0
    device: str = "cpu"
    # CPU threads while the benchmark runs (0 = torch's default). These models are tiny: a second intra-op
    # thread barely helps, and on a busy machine it made steps up to 100x slower (threads wait on each other).
    num_threads: int = 1
    # training runs at once, each in its own process: 0 = one per num_threads CPU cores on the CPU, 1 on CUDA.
    # The results do not depend on it (each run seeds itself and sees the same data).
    workers: int = 0
    train_grid: list[tuple[int, int]] | None = None  # explicit (seq_len, num_kv_pairs) training sets
    test_grid: list[tuple[int, int]] | None = None  # explicit tested (seq_len, num_kv_pairs)
    data_style: str = "memmix"  # MQAR data: "memmix" or "zoology" (memmix.data.mqar)
    num_valid: int = 0  # validation sequences per training setting (0 = no validation split)
    seeds: int = 1  # the best configuration of each (model, d_model) is trained with seeds seed, seed + 1, ...
    stop_accuracy: float | None = None  # stop a run once its validation accuracy reaches this (None: run all steps)
    eval_every: int = 250  # steps between validation checks (with stop_accuracy)
    log_every: int = 10  # steps between loss read-backs (the only host syncs of the training loop)
    budget_minutes: float = 0.0  # start no new run after this much wall time (0 = no limit); resume continues
    json_path: str | None = None  # results, written as each run finishes; an existing file is resumed
    plot_path: str | None = None  # accuracy against num_kv_pairs per seq_len (PNG)
    state_plot_path: str | None = None  # Zoology's plot: accuracy at the hardest trained setting vs state size
    # the fast path: "auto" = on for CUDA: each training step one captured CUDA graph, and the LM head and
    # loss at the query positions only (also in evaluation). How runs run, not what they compute: not a result field
    cuda_graph: str = "auto"
    query_head: str = "auto"
    # bf16 autocast for training and evaluation (the tensor cores; weights, optimiser and recurrent states stay
    # float32), "auto" = on for CUDA: the CPU trains in float32
    bf16: str = "auto"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that change a run's numbers: a results file continues only under equal values (``device`` by its type).
RESULT_FIELDS = ("seq_lens", "num_kv_pairs", "train_grid", "test_grid", "data_style", "vocab_size", "num_train",
                 "num_valid", "num_test", "seed", "num_layers", "head_dim", "steps", "weight_decay",
                 "warmup_fraction", "batch_size", "stop_accuracy", "eval_every", "eval_batch_size", "device")

FAST_PATH_CHOICES = ("auto", "on", "off")


def fast_path(s: RecallSettings, name: str) -> bool:
    """Whether the fast-path setting `name` (cuda_graph, query_head, bf16) is on: "on", or "auto" on a CUDA device."""
    value = getattr(s, name)
    return value == "on" or (value == "auto" and torch.device(s.device).type == "cuda")


ZOOLOGY_TRAIN_GRID = [(64, 4), (128, 8), (256, 16), (256, 32), (256, 64)]
ZOOLOGY_TEST_GRID = [(64, 4), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)]  # the last two: longer

# Zoology's budget (HazyResearch/zoology's MQAR sweeps): up to 64 epochs of 180,000 sequences (100,000 at (64, 4),
# 20,000 at each other setting) in batches of 256 = 45,000 steps; early stopping at 0.99 ends easy runs long before.
ZOOLOGY_STEPS = 64 * 180_000 // 256
ZOOLOGY_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]  # Zoology sweeps np.logspace(-4, -2, ...): the same range, half-decades

_ZOOLOGY: dict[str, Any] = {  # Zoology / Based MQAR (arXiv 2312.04927), for a GPU; protocol in docs/recall.md
    "models": ["attention", "mom", "gdn", "gdn-wide", "linear", "bmojo", "bmojo-f"],
    "seq_lens": [],
    "num_kv_pairs": [],
    "train_grid": ZOOLOGY_TRAIN_GRID,
    "test_grid": ZOOLOGY_TEST_GRID,
    "data_style": "zoology",
    "d_models": [64, 128, 256],
    "num_layers": 2,
    "head_dim": 16,
    "steps": ZOOLOGY_STEPS,
    "lr": ZOOLOGY_LRS,
    "warmup_fraction": 0.01,  # 450 steps: the warm-up must end before an easy run stops (attention: ~1,800 steps)
    "batch_size": 256,
    "vocab_size": 8192,
    "num_train": 20_000,
    "num_valid": 500,
    "num_test": 1000,
    "eval_batch_size": 64,
    "seeds": 3,
    "stop_accuracy": 0.99,
    "eval_every": 200,
    "log_every": 50,
}

# MoM ablations on the same protocol at one width (each against mom and gdn; names in models.ABLATION_MODELS).
_ZOOLOGY_ABLATIONS = dict(_ZOOLOGY, d_models=[128], models=[
    "mom", "gdn", "mom-k1", "mom-m2", "mom-m8", "mom-noshared", "mom-lb0", "mom-lb0.1", "mom-conv-whole",
    "mom-route-conv", "mom-zloss", "mom-temp"])

# The zoology protocol at d_model 128 only: heads of 16 and of 64 for gdn and mom; gdn-wide (MoM's state, one
# memory); fla's own layers in the same harness (fla-gdn, fla-mom: CUDA with flash-linear-attention installed).
# Seed 0 sweeps the learning rates; `--seeds 3` on a later call adds seeds 1 and 2 of each row's best rate only.
_ZOOLOGY_D128 = dict(_ZOOLOGY, d_models=[128], seeds=1, models=[
    "attention", "gdn", "gdn-h64", "gdn-wide", "mom", "mom-h64", "fla-gdn", "fla-mom"])

# The CPU counterpart of zoology-d128: does each recurrent model learn MQAR at a large vocabulary at all? Short
# sequences (64 tokens, 4 pairs: Zoology's easiest setting), Zoology's data, the LM head at the queries only; about
# 15 min on 2 cores (docs/recall.md has the measurement that chose the vocabulary). Apart from the CPU demo.
_CPU_VOCAB: dict[str, Any] = {
    "models": ["attention", "gdn", "mom", "linear"],
    "seq_lens": [],
    "num_kv_pairs": [],
    "train_grid": [(64, 4)],
    "test_grid": [(64, 4), (64, 8)],
    "data_style": "zoology",
    "d_models": [64],
    "num_layers": 2,
    "head_dim": 16,
    "steps": 1000,
    "lr": 3e-3,
    "warmup_fraction": 0.05,
    "batch_size": 64,
    "vocab_size": 256,
    "num_train": 20_000,
    "num_valid": 200,
    "num_test": 500,
    "eval_batch_size": 100,
    "stop_accuracy": 0.99,
    "eval_every": 250,
    "log_every": 50,
    "query_head": "on",
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},  # RecallSettings' own defaults: the CPU demo
    "zoology": _ZOOLOGY,
    "zoology-ablations": _ZOOLOGY_ABLATIONS,
    "zoology-d128": _ZOOLOGY_D128,
    "cpu-vocab": _CPU_VOCAB,
}


# ----------------------------------------------------------------------------------------------- grids


def learning_rates(s: RecallSettings) -> list[float]:
    """The learning rates to sweep (one: no sweep)."""
    return [float(x) for x in s.lr] if isinstance(s.lr, (list, tuple)) else [float(s.lr)]


def training_sets(s: RecallSettings) -> list:
    """Keys of the training sets: (seq_len, num_kv_pairs) in grid style, else the seq_lens (pair counts mixed)."""
    if s.train_grid is not None:
        return [tuple(g) for g in s.train_grid]
    return list(s.seq_lens)


def settings_grid(s: RecallSettings) -> list[tuple[int, int]]:
    """Every tested (seq_len, num_kv_pairs), in table order."""
    if s.test_grid is not None:
        return [tuple(g) for g in s.test_grid]
    return [(t, n) for t in s.seq_lens for n in s.num_kv_pairs if n <= max_kv_pairs(t, s.vocab_size)]


def trained_settings(s: RecallSettings) -> list[tuple[int, int]]:
    """Every (seq_len, num_kv_pairs) the training data holds (the validation split's settings)."""
    if s.train_grid is not None:
        return [tuple(g) for g in s.train_grid]
    return [(t, n) for t in s.seq_lens for n in s.num_kv_pairs if n <= max_kv_pairs(t, s.vocab_size)]


def hardest_setting(s: RecallSettings) -> tuple[int, int]:
    """The tested setting with the most pairs (then the longest sequence) among those the models trained on; with
    none trained on, among all tested."""
    trained = set(trained_settings(s))
    return hardest([g for g in settings_grid(s) if g in trained] or settings_grid(s))


def hardest(grid: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (seq_len, num_kv_pairs) setting of ``grid`` with the most pairs, then the longest sequence."""
    return max(grid, key=lambda g: (g[1], g[0]))


def result_fingerprint(s: RecallSettings) -> dict[str, Any]:
    """The settings a run's numbers depend on, as JSON values (device by its type: cuda:0 and cuda:1 agree)."""
    values = {name: getattr(s, name) for name in RESULT_FIELDS}
    values["device"] = torch.device(s.device).type if _parses_as_device(s.device) else s.device
    for name in ("train_grid", "test_grid"):
        if values[name] is not None:
            values[name] = [list(g) for g in values[name]]
    return values


def _parses_as_device(device: str) -> bool:
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        return False
    return True


# ----------------------------------------------------------------------------------------------- validation


def validate_settings(s: RecallSettings) -> None:
    """Raise RecallSettingError naming the field and the allowed values on the first bad setting.

    Also checks, before any work, that the output paths can be written. Whether an existing results file at
    json_path can be continued is checked where it is read (memmix.evaluation.recall.results.check_resumable)."""
    unknown = [m for m in s.models if m not in RECALL_MODELS]
    if unknown and unknown[0] in UNAVAILABLE_MODELS:
        raise RecallSettingError("models", f"model {unknown[0]!r} cannot be built here: {UNAVAILABLE_MODELS[unknown[0]]}")
    if not s.models or unknown:
        raise RecallSettingError("models", f"unknown model {unknown[0]!r}; allowed: {', '.join(RECALL_MODELS)}"
                                 if unknown else f"name at least one of: {', '.join(RECALL_MODELS)}")
    if len(set(s.models)) != len(s.models):
        raise RecallSettingError("models", f"each model at most once, got {','.join(s.models)}")
    _check_positive_ints(s, ["d_models"])
    for name in ["num_layers", "head_dim", "steps", "batch_size", "num_train", "num_test", "eval_batch_size",
                 "seeds", "eval_every", "log_every"]:
        if not is_int(getattr(s, name)) or getattr(s, name) < 1:
            raise RecallSettingError(name, f"must be an integer >= 1, got {getattr(s, name)!r}")
    if s.vocab_size < 4:
        raise RecallSettingError("vocab_size", f"must be >= 4, got {s.vocab_size}")
    if s.data_style not in MQAR_STYLES:
        raise RecallSettingError("data_style", f"unknown style {s.data_style!r}; allowed: {', '.join(MQAR_STYLES)}")
    _check_grids(s)
    bad_d = [d for d in s.d_models if d % s.head_dim]
    if bad_d:
        raise RecallSettingError("d_models", f"each must be a multiple of head_dim={s.head_dim}, got {bad_d[0]}")
    _check_protocol(s)
    _check_requirements(s, RECALL_MODELS)
    if s.weight_decay < 0:
        raise RecallSettingError("weight_decay", f"must be >= 0, got {s.weight_decay}")
    if not 0.0 <= s.warmup_fraction < 1.0:
        raise RecallSettingError("warmup_fraction", f"must be in [0, 1), got {s.warmup_fraction}")
    if s.seed < 0:
        raise RecallSettingError("seed", f"must be >= 0, got {s.seed}")
    if s.num_threads < 0:
        raise RecallSettingError("num_threads", f"must be >= 0 (0 = torch's default), got {s.num_threads}")
    if s.workers < 0:
        raise RecallSettingError("workers", f"must be >= 0 (0 = one per CPU core, 1 on CUDA), got {s.workers}")
    if not (s.budget_minutes >= 0 and math.isfinite(s.budget_minutes)):
        raise RecallSettingError("budget_minutes", f"must be a number >= 0 (0 = no limit), got {s.budget_minutes}")
    _check_device(s.device)
    for name in ("cuda_graph", "query_head", "bf16"):
        if getattr(s, name) not in FAST_PATH_CHOICES:
            raise RecallSettingError(name, f"must be one of {', '.join(FAST_PATH_CHOICES)}, got {getattr(s, name)!r}")
    for name in ("cuda_graph", "bf16"):
        if getattr(s, name) == "on" and torch.device(s.device).type != "cuda":
            raise RecallSettingError(name, f"'on' needs a CUDA device, got device {s.device!r}; use auto or off")
    _check_outputs(s)


def _check_requirements(s: RecallSettings, registry: dict) -> None:
    """Each model's own requirements (a package, a CUDA device, a width), after the device and widths are known."""
    _check_device(s.device)
    for name in s.models:
        requires = registry[name].requires
        reason = requires(s) if requires is not None else None
        if reason is not None:
            raise RecallSettingError("models", f"model {name!r} cannot be built here: {reason}")



def _check_positive_ints(s: RecallSettings, names: Sequence[str], allow_empty: bool = False) -> None:
    for name in names:
        values = getattr(s, name)
        if (not values and not allow_empty) or any(not is_int(v) or v < 1 for v in values):
            raise RecallSettingError(name, f"give one or more integers >= 1, got {values}")
        if len(set(values)) != len(values):
            raise RecallSettingError(name, f"each value at most once, got {values}")


def _check_grids(s: RecallSettings) -> None:
    for name in ("train_grid", "test_grid"):
        grid = getattr(s, name)
        if grid is None:
            continue
        pairs = [tuple(g) if isinstance(g, (list, tuple)) else (g,) for g in grid]
        if not pairs or any(len(g) != 2 or not all(is_int(v) and v >= 1 for v in g) for g in pairs):
            raise RecallSettingError(name, f"give one or more (seq_len, num_kv_pairs) pairs of integers >= 1, "
                                           f"got {grid}")
        if len(set(pairs)) != len(pairs):
            raise RecallSettingError(name, f"each (seq_len, num_kv_pairs) at most once, got {grid}")
        for seq_len, count in pairs:
            limit = max_kv_pairs(seq_len, s.vocab_size)
            if seq_len < 4 or count > limit:
                raise RecallSettingError(
                    name, f"({seq_len}, {count}) does not fit: seq_len must be >= 4 and num_kv_pairs in 1..{limit} "
                          f"for seq_len={seq_len}, vocab_size={s.vocab_size} (4 tokens a pair, vocab_size/2 - 1 keys)")
    if s.train_grid is not None and s.test_grid is not None:
        for name in ("seq_lens", "num_kv_pairs"):
            values = getattr(s, name)
            if values:
                raise RecallSettingError(name, "not used when train_grid and test_grid are given: leave it empty or "
                                               f"give the grids as (seq_len, num_kv_pairs) pairs, got {values}")
        return
    _check_positive_ints(s, ["seq_lens", "num_kv_pairs"])
    if min(s.seq_lens) < 4:
        raise RecallSettingError("seq_lens", f"each must be >= 4, got {min(s.seq_lens)}")
    _check_kv_pairs_fit(s)


def _check_kv_pairs_fit(s: RecallSettings) -> None:
    longest = max(s.seq_lens)
    limit = max_kv_pairs(longest, s.vocab_size)
    too_many = [n for n in s.num_kv_pairs if n > limit]
    if too_many:
        raise RecallSettingError(
            "num_kv_pairs",
            f"{too_many[0]} pairs do not fit: allowed 1..{limit} for seq_len={longest}, vocab_size={s.vocab_size} "
            f"(each pair needs 4 tokens: pair + query, and vocab_size/2 - 1 distinct keys)")
    for seq_len in s.seq_lens:
        if min(s.num_kv_pairs) > max_kv_pairs(seq_len, s.vocab_size):
            raise RecallSettingError(
                "seq_lens", f"seq_len={seq_len} fits at most {max_kv_pairs(seq_len, s.vocab_size)} pairs, fewer "
                            f"than any of num_kv_pairs={s.num_kv_pairs}; allowed: seq_len >= {4 * min(s.num_kv_pairs)}")


def _check_protocol(s: RecallSettings) -> None:
    """Learning rates, validation split, early stopping and seeds."""
    rates = s.lr if isinstance(s.lr, (list, tuple)) else [s.lr]
    if not rates or any(not (isinstance(r, (int, float)) and r > 0 and math.isfinite(r)) for r in rates):
        raise RecallSettingError("lr", f"give one or more finite numbers > 0, got {s.lr}")
    if len(set(rates)) != len(rates):
        raise RecallSettingError("lr", f"each learning rate at most once, got {s.lr}")
    if not is_int(s.num_valid) or s.num_valid < 0:
        raise RecallSettingError("num_valid", f"must be an integer >= 0 (0 = no validation split), got {s.num_valid}")
    if s.stop_accuracy is not None and not 0.0 < s.stop_accuracy <= 1.0:
        raise RecallSettingError("stop_accuracy",
                                 f"must be in (0, 1] or None (train every step), got {s.stop_accuracy}")
    if s.num_valid == 0 and len(rates) > 1:
        raise RecallSettingError("num_valid", f"must be >= 1 to pick among {len(rates)} learning rates "
                                              "(the best is chosen on the validation split, never on test)")
    if s.num_valid == 0 and s.stop_accuracy is not None:
        raise RecallSettingError("num_valid", "must be >= 1 with stop_accuracy (it is checked on the validation split)")


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RecallSettingError("device", f"unknown device {device!r}; allowed: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecallSettingError("device", f"{device!r} requested but CUDA is not available; allowed: cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RecallSettingError("device", f"unsupported device {device!r}; allowed: cpu, cuda, cuda:N")


def _check_outputs(s: RecallSettings) -> None:
    """Every output path writable and distinct."""
    paths = {name: getattr(s, name) for name in ("json_path", "plot_path", "state_plot_path") if getattr(s, name)}
    for name, path in paths.items():
        reason = check_writable(path)
        if reason is not None:
            raise RecallSettingError(name, f"cannot write the output: {reason}")
    if len({os.path.abspath(p) for p in paths.values()}) != len(paths):
        raise RecallSettingError("state_plot_path" if "state_plot_path" in paths else "plot_path",
                                 f"each output needs its own path, got {paths}")
