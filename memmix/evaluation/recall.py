"""The associative-recall benchmark: train several models on MQAR under one budget, test each setting.

    settings = RecallSettings(models=["mom", "gdn"], seq_lens=[64], num_kv_pairs=[4, 8])
    report = run_recall(settings)          # trains, evaluates, returns every number
    print(format_table(report))

Models come from ``RECALL_MODELS``, a registry of builders: adding a model is one ``register_model`` call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from memmix.files import atomic_write
from memmix.data.mqar import IGNORE_INDEX, MQARData, make_mqar_splits, max_kv_pairs

# ----------------------------------------------------------------------------------------------- settings


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
    steps: int = 4500
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05  # of steps, linear warm-up before the cosine decay
    batch_size: int = 16
    vocab_size: int = 64
    num_train: int = 20_000  # per seq_len
    num_test: int = 500  # per (seq_len, num_kv_pairs)
    eval_batch_size: int = 250
    seed: int = 0
    device: str = "cpu"
    # CPU threads while the benchmark runs (0 = torch's default). These models are tiny: a second intra-op
    # thread barely helps, and on a busy machine it made steps up to 100x slower (threads wait on each other).
    num_threads: int = 1
    # training runs at once, each in its own process: 0 = one per num_threads CPU cores on the CPU, 1 on CUDA.
    # The results do not depend on it (each run seeds itself and sees the same data).
    workers: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},  # RecallSettings' own defaults: the CPU demo
    "paper": {  # a Zoology-style grid, for a GPU (hours, not minutes)
        "seq_lens": [64, 128, 256, 512],
        "num_kv_pairs": [4, 8, 16, 32, 64],
        "d_models": [64, 128, 256],
        "num_layers": 2,
        "head_dim": 16,
        "steps": 20_000,
        "lr": 1e-3,
        "batch_size": 64,
        "vocab_size": 8192,
        "num_train": 100_000,
        "num_test": 1000,
        "eval_batch_size": 256,
    },
}


def validate_settings(s: RecallSettings) -> None:
    """Raise RecallSettingError naming the field and the allowed values on the first bad setting."""
    unknown = [m for m in s.models if m not in RECALL_MODELS]
    if not s.models or unknown:
        raise RecallSettingError("models", f"unknown model {unknown[0]!r}; allowed: {', '.join(RECALL_MODELS)}"
                                 if unknown else f"name at least one of: {', '.join(RECALL_MODELS)}")
    if len(set(s.models)) != len(s.models):
        raise RecallSettingError("models", f"each model at most once, got {','.join(s.models)}")
    _check_positive_ints(s, ["seq_lens", "num_kv_pairs", "d_models"])
    for name in ["num_layers", "head_dim", "steps", "batch_size", "num_train", "num_test", "eval_batch_size"]:
        if getattr(s, name) < 1:
            raise RecallSettingError(name, f"must be an integer >= 1, got {getattr(s, name)}")
    if min(s.seq_lens) < 4:
        raise RecallSettingError("seq_lens", f"each must be >= 4, got {min(s.seq_lens)}")
    if s.vocab_size < 4:
        raise RecallSettingError("vocab_size", f"must be >= 4, got {s.vocab_size}")
    _check_kv_pairs_fit(s)
    bad_d = [d for d in s.d_models if d % s.head_dim]
    if bad_d:
        raise RecallSettingError("d_models", f"each must be a multiple of head_dim={s.head_dim}, got {bad_d[0]}")
    if not (s.lr > 0 and math.isfinite(s.lr)):
        raise RecallSettingError("lr", f"must be a finite number > 0, got {s.lr}")
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
    _check_device(s.device)


def _check_positive_ints(s: RecallSettings, names: Sequence[str]) -> None:
    for name in names:
        values = getattr(s, name)
        if not values or any(v < 1 for v in values):
            raise RecallSettingError(name, f"give one or more integers >= 1, got {values}")
        if len(set(values)) != len(values):
            raise RecallSettingError(name, f"each value at most once, got {values}")


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
                "seq_lens", f"seq_len={seq_len} fits at most {max_kv_pairs(seq_len, s.vocab_size)} pairs, "
                            f"fewer than any of num_kv_pairs={s.num_kv_pairs}; allowed: seq_len >= {4 * min(s.num_kv_pairs)}")


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RecallSettingError("device", f"unknown device {device!r}; allowed: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecallSettingError("device", f"{device!r} requested but CUDA is not available; allowed: cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RecallSettingError("device", f"unsupported device {device!r}; allowed: cpu, cuda, cuda:N")


def settings_grid(s: RecallSettings) -> list[tuple[int, int]]:
    """Every (seq_len, num_kv_pairs) that fits, in table order."""
    return [(t, n) for t in s.seq_lens for n in s.num_kv_pairs if n <= max_kv_pairs(t, s.vocab_size)]


# ----------------------------------------------------------------------------------------------- model registry


@dataclass(frozen=True)
class ModelSize:
    """The size every model of one comparison shares."""

    vocab_size: int
    d_model: int
    num_layers: int
    head_dim: int


@dataclass(frozen=True)
class StateSize:
    """What a model carries per sequence at inference: ``floats`` if constant, else ``floats_per_token``."""

    floats: int | None
    floats_per_token: int | None
    formula: str

    def describe(self) -> str:
        if self.floats is not None:
            return f"{self.floats:,} const"
        return f"grows {self.floats_per_token:,}/token ({self.formula})"


@dataclass(frozen=True)
class RecallModel:
    """A registry entry: how to build the model at a ModelSize and how big its inference state is."""

    name: str
    summary: str
    build: Callable[[ModelSize], nn.Module]
    state_size: Callable[[nn.Module], StateSize]


RECALL_MODELS: dict[str, RecallModel] = {}


def register_model(entry: RecallModel) -> RecallModel:
    """Add (or replace) a RECALL_MODELS entry."""
    RECALL_MODELS[entry.name] = entry
    return entry


def _mom_family_config(size: ModelSize, **overrides: Any):
    """A MoMConfig at ``size``: heads of ``head_dim``, a 2x MLP; ``overrides`` pick the variant."""
    from memmix import MoMConfig  # models floor; imported late so the data/validation paths stay light

    num_heads = size.d_model // size.head_dim
    fields = dict(vocab_size=size.vocab_size, hidden_size=size.d_model, num_hidden_layers=size.num_layers,
                  num_heads=num_heads, head_dim=size.head_dim, expand_v=1.0, attn_num_heads=num_heads,
                  intermediate_size=2 * size.d_model)
    fields.update(overrides)
    return MoMConfig(**fields)


def _mom_family(name: str, summary: str, attention_everywhere: bool = False, **overrides: Any) -> RecallModel:
    """A registry entry for a MoMForCausalLM variant; attention_everywhere makes every layer softmax attention."""
    def build(size: ModelSize) -> nn.Module:
        from memmix import MoMForCausalLM
        layers = {"attn_layers": list(range(size.num_layers))} if attention_everywhere else {}
        return MoMForCausalLM(_mom_family_config(size, **overrides, **layers))

    return RecallModel(name=name, summary=summary, build=build, state_size=mom_family_state_size)


def mom_family_state_size(model: nn.Module) -> StateSize:
    """Inference state of a MoMForCausalLM (memories and conv tails; KV cache per token for attention layers)."""
    constant = model.recurrent_state_size(context_length=0)
    per_token = model.recurrent_state_size(context_length=1) - constant
    if per_token == 0:
        return StateSize(constant, None, "")
    c = model.config
    layers, kv_width = len(c.attn_layers), c.attn_num_kv_heads * (c.hidden_size // c.attn_num_heads)
    formula = f"2*{layers}*{kv_width}" + (f" + {constant:,} const" if constant else "")
    return StateSize(None, per_token, formula)


# One entry per model; any other builder joins with one more register_model call.
register_model(_mom_family("mom", "MoM: 4 gated-delta memories, top-2 routing, + a shared memory",
                           num_memories=4, topk=2, shared_mem=True, memory_rule="gated_delta"))
register_model(_mom_family("gdn", "Gated DeltaNet: the same block with one memory",
                           num_memories=1, topk=1, shared_mem=False, memory_rule="gated_delta"))
register_model(_mom_family("linear", "linear attention: one memory, additive (no decay, no delta) update",
                           num_memories=1, topk=1, shared_mem=False, memory_rule="linear"))


register_model(_mom_family("attention", "softmax attention in every layer (the recall upper bound)",
                           attention_everywhere=True, num_memories=1, topk=1, shared_mem=False))


def _build_bmojo(size: ModelSize) -> nn.Module:
    from memmix.models import BMojoForCausalLM
    from memmix.models.configuration_bmojo import bmojo_recall_config

    return BMojoForCausalLM(bmojo_recall_config(size.vocab_size, size.d_model, size.num_layers, head_dim=size.head_dim))


register_model(RecallModel(
    name="bmojo",
    summary="B'MOJO: gated-delta fading memory + innovation-selected eidetic store + sliding-window attention",
    build=_build_bmojo,
    state_size=lambda model: StateSize(model.recurrent_state_size(), None, ""),
))


BUILTIN_MODELS = dict(RECALL_MODELS)  # what a fresh interpreter (a worker process) has registered


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- train / evaluate


def _optimizer_and_schedule(model: nn.Module, s: Any):
    from memmix.training.optim import build_optimizer, cosine_schedule

    optimizer = build_optimizer(model, lr=s.lr, weight_decay=s.weight_decay)
    return optimizer, cosine_schedule(optimizer, warmup_steps=int(s.warmup_fraction * s.steps), total_steps=s.steps)


def endless_batches(train: dict[int, Any], batch_size: int, seed: int):
    """Endless training batches: seq_lens in turn, each a fresh shuffle of its examples every epoch.

    train: seq_len -> a data set with len() and subset(index) (MQARData, MixedRecallData)."""
    generator = torch.Generator().manual_seed(seed)
    orders = {t: torch.empty(0, dtype=torch.long) for t in train}
    while True:
        for seq_len, data in sorted(train.items()):
            if len(orders[seq_len]) < batch_size:
                orders[seq_len] = torch.cat([orders[seq_len], torch.randperm(len(data), generator=generator)])
            index, orders[seq_len] = orders[seq_len][:batch_size], orders[seq_len][batch_size:]
            yield data.subset(index)


def train_model(model: nn.Module, train: dict[int, MQARData], s: RecallSettings,
                on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` on MQAR for ``s.steps`` steps; returns the loss of every step. on_step(step, loss)."""
    device = torch.device(s.device)
    return fit(model, train, s, lambda batch: {"input_ids": batch.input_ids.to(device)}, on_step)


def fit(model: nn.Module, train: dict[int, Any], s: Any, model_inputs: Callable[[Any], dict],
        on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW + warm-up/cosine for s.steps steps on endless_batches(train); model(**model_inputs(batch), labels).

    s: settings with lr, weight_decay, warmup_fraction, steps, batch_size, seed, device. Returns every step's loss.
    """
    from memmix.training.step import TrainStep

    optimizer, schedule = _optimizer_and_schedule(model, s)
    step = TrainStep(model, optimizer, schedule,
                     lambda m, batch: m(**model_inputs(batch), labels=batch.labels.to(s.device)).loss, grad_clip=1.0)
    model.train()
    losses = []
    batches = endless_batches(train, s.batch_size, s.seed)
    for index in range(s.steps):
        losses.append(step([next(batches)]).loss.item())
        if on_step is not None:
            on_step(index, losses[-1])
    return losses


@torch.no_grad()
def recall_accuracy(model: nn.Module, data: MQARData, batch_size: int, device: str | torch.device) -> float:
    """Fraction of queries whose value is the argmax prediction at the query's key (labels shifted as in HF)."""
    model.eval()
    correct = total = 0
    for start in range(0, len(data), batch_size):
        batch = data.subset(slice(start, start + batch_size))
        logits = model(input_ids=batch.input_ids.to(device)).logits  # (B, T, vocab)
        predicted = logits[:, :-1].argmax(dim=-1).cpu()  # (B, T - 1): prediction for the next token
        target = batch.labels[:, 1:]
        mask = target != IGNORE_INDEX
        correct += int((predicted[mask] == target[mask]).sum())
        total += int(mask.sum())
    return correct / total


# ----------------------------------------------------------------------------------------------- the benchmark


@dataclass
class ModelResult:
    """One trained model's numbers; accuracy maps (seq_len, num_kv_pairs) to the fraction of queries right."""

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "summary": self.summary, "num_layers": self.num_layers, "d_model": self.d_model,
            "params": self.params, "recurrent_state": self.state.describe(),
            "state_floats": self.state.floats, "state_floats_per_token": self.state.floats_per_token,
            "accuracy": [{"seq_len": t, "num_kv_pairs": n, "accuracy": a} for (t, n), a in self.accuracy.items()],
            "final_loss": self.final_loss, "train_seconds": self.train_seconds, "loss_curve": self.loss_curve,
        }


@dataclass
class RecallReport:
    settings: RecallSettings
    results: list[ModelResult]
    wall_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.as_dict(), "grid": [list(g) for g in settings_grid(self.settings)],
                "results": [r.as_dict() for r in self.results], "wall_seconds": self.wall_seconds,
                "summary": summary_line(self)}


class _Progress:
    """One tqdm bar per training run (several may run at once), with an ETA for the whole benchmark in the
    postfix: the longest remainder of the runs in progress (each at its own step rate), plus the runs not started
    at the mean rate so far, shared among the workers."""

    def __init__(self, runs: list[str], steps_per_run: int, workers: int, enabled: bool):
        self.labels, self.steps, self.workers = runs, steps_per_run, workers
        self.done = [0] * len(runs)
        self.started: dict[int, float] = {}
        self.enabled = enabled
        self.bars: dict[int, Any] = {}

    def update(self, run: int, steps_done: int, loss: float) -> None:
        """Run `run` has done `steps_done` steps; its latest loss is `loss`."""
        if run not in self.bars:
            self.started[run] = time.perf_counter()
            self.bars[run] = tqdm(total=self.steps, desc=self.labels[run], disable=not self.enabled, leave=True,
                                  mininterval=1.0, dynamic_ncols=True, position=len(self.bars))
        bar = self.bars[run]
        bar.update(steps_done - self.done[run])
        self.done[run] = steps_done
        if self.enabled:
            bar.set_postfix_str(f"loss={loss:.3f} all-done-in~{_fmt_seconds(self.remaining_seconds())}",
                                refresh=False)
        if steps_done == self.steps:
            bar.close()

    def remaining_seconds(self) -> float:
        now = time.perf_counter()
        per_step = {r: (now - t) / self.done[r] for r, t in self.started.items() if self.done[r]}
        if not per_step:
            return 0.0
        active = max((per_step[r] * (self.steps - self.done[r]) for r in per_step), default=0.0)
        waiting = len(self.labels) - len(self.started)
        return active + waiting * self.steps * sum(per_step.values()) / len(per_step) / self.workers


def run_recall(s: RecallSettings, progress: bool = True) -> RecallReport:
    """Train every model of ``s`` at every d_model under the same budget; test every setting of the grid.

    With several workers the runs train in parallel processes (see RecallSettings.workers)."""
    validate_settings(s)
    start = time.perf_counter()
    runs = [(name, d) for d in s.d_models for name in s.models]
    workers = worker_count(s, len(runs))
    tracker = _Progress([f"[{i + 1}/{len(runs)}] {name} d={d}" for i, (name, d) in enumerate(runs)], s.steps,
                        workers, progress)
    if workers > 1:
        results = _train_in_processes(runs, s, workers, tracker)
    else:
        splits = make_mqar_splits(s.seq_lens, s.num_kv_pairs, s.vocab_size, s.num_train, s.num_test, s.seed)
        with _threads(s.num_threads):
            results = [_train_and_test(RECALL_MODELS[name], d_model, splits, s, _reporter(i, s.steps, tracker.update))
                       for i, (name, d_model) in enumerate(runs)]
    return RecallReport(settings=s, results=results, wall_seconds=time.perf_counter() - start)


def worker_count(s: RecallSettings, num_runs: int) -> int:
    """Processes that train at once: s.workers, or (0) one per s.num_threads CPU cores (1 on CUDA, with
    torch's default thread count, or with a model registered at run time), never more than the runs."""
    late = [name for name in s.models if BUILTIN_MODELS.get(name) is not RECALL_MODELS.get(name)]
    if s.workers > 1 and late:
        raise RecallSettingError("workers", f"model {late[0]!r} is registered at run time, which worker processes "
                                            "do not see; allowed with it: 0 or 1")
    if s.workers:
        return max(1, min(s.workers, num_runs))
    if late or torch.device(s.device).type != "cpu" or s.num_threads == 0:
        return 1
    return max(1, min(num_runs, (os.cpu_count() or 1) // s.num_threads))


@contextlib.contextmanager
def _threads(count: int):
    """Within the block torch uses `count` intra-op threads (0: leave torch's setting)."""
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reporter(run: int, steps: int, sink: Callable[[int, int, float], None]) -> Callable[[int, float], None]:
    """on_step(step, loss) for train_model that passes (run, steps done, loss) to sink every 10 steps and at the end."""
    def on_step(step: int, loss: float) -> None:
        if (step + 1) % 10 == 0 or step + 1 == steps:
            sink(run, step + 1, loss)

    return on_step


def _train_in_processes(runs: list[tuple[str, int]], s: RecallSettings, workers: int, tracker: _Progress):
    """Each run in a worker process ("spawn": fresh interpreters, no inherited thread pools); progress comes
    back through a queue. Returns the ModelResults in the order of `runs`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(queue,)) as pool:
        futures = [pool.submit(_worker_run, i, name, d_model, s) for i, (name, d_model) in enumerate(runs)]
        try:
            while not all(f.done() for f in futures):
                _drain(queue, tracker, wait=0.5)
            _drain(queue, tracker, wait=0.0)
            return [f.result() for f in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _drain(queue, tracker: _Progress, wait: float) -> None:
    import queue as queues

    try:
        message = queue.get(timeout=wait) if wait else queue.get_nowait()
        while True:
            tracker.update(*message)
            message = queue.get_nowait()
    except queues.Empty:
        pass


_WORKER_QUEUE = None


def _worker_init(queue) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = queue


def _worker_run(index: int, name: str, d_model: int, s: RecallSettings) -> ModelResult:
    """One run inside a worker process: the same data (from the seed) and the same steps as in-process."""
    splits = make_mqar_splits(s.seq_lens, s.num_kv_pairs, s.vocab_size, s.num_train, s.num_test, s.seed)
    with _threads(s.num_threads):
        return _train_and_test(RECALL_MODELS[name], d_model, splits, s,
                               _reporter(index, s.steps, lambda *message: _WORKER_QUEUE.put(message)))


def _train_and_test(entry: RecallModel, d_model: int, splits, s: RecallSettings, on_step) -> ModelResult:
    torch.manual_seed(s.seed)  # the same initial weights for the same model and seed
    model = entry.build(ModelSize(s.vocab_size, d_model, s.num_layers, s.head_dim)).to(s.device)
    started = time.perf_counter()
    losses = train_model(model, splits.train, s, on_step)
    seconds = time.perf_counter() - started
    accuracy = {key: recall_accuracy(model, data, s.eval_batch_size, s.device) for key, data in splits.test.items()}
    tail = losses[-max(1, len(losses) // 20):]
    return ModelResult(model=entry.name, summary=entry.summary, num_layers=s.num_layers, d_model=d_model,
                       params=count_parameters(model), state=entry.state_size(model), accuracy=accuracy,
                       final_loss=sum(tail) / len(tail), train_seconds=seconds, loss_curve=_thin(losses, 200))


def _thin(values: list[float], keep: int) -> list[float]:
    stride = max(1, math.ceil(len(values) / keep))
    return [round(v, 5) for v in values[::stride]]


# ----------------------------------------------------------------------------------------------- reporting


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_table(report: RecallReport) -> str:
    """A fixed-width table: one row per model (and d_model), one accuracy column per (seq_len, num_kv_pairs)."""
    grid = settings_grid(report.settings)
    header = ["model", "layers", "d_model", "recurrent state (floats)", "params"]
    header += [f"T={t} N={n}" for t, n in grid]
    rows = [[r.model, str(r.num_layers), str(r.d_model), r.state.describe(), f"{r.params:,}"]
            + [f"{r.accuracy[g]:.3f}" for g in grid] for r in report.results]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    numeric_from = 1

    def fmt(line: list[str]) -> str:
        cells = [c.ljust(w) if i < numeric_from else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return " | ".join(cells)

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, rows)])


def hardest_setting(s: RecallSettings) -> tuple[int, int]:
    """The most pairs at the longest sequence that holds them."""
    return max(settings_grid(s), key=lambda g: (g[1], g[0]))


def summary_line(report: RecallReport) -> str:
    """One line: the ranking at the hardest setting, and whether the expected order holds, plus the wall time."""
    setting = hardest_setting(report.settings)
    ranked = sorted(report.results, key=lambda r: -r.accuracy[setting])
    ranking = " > ".join(f"{r.model}{'' if len(report.settings.d_models) == 1 else f'@{r.d_model}'} "
                         f"{r.accuracy[setting]:.2f}" for r in ranked)
    verdict = expected_order_verdict(report, setting)
    return (f"recall at T={setting[0]} N={setting[1]} (hardest): {ranking}{verdict}; "
            f"{len(report.results)} runs in {_fmt_seconds(report.wall_seconds)}")


EXPECTED_ORDER = ["attention", "mom", "gdn", "linear"]  # the paper's claim: attention >= mom > gdn > linear


def expected_order_verdict(report: RecallReport, setting: tuple[int, int]) -> str:
    """' | expected attention >= mom > gdn > linear: holds' (or 'does not hold'), over the models present."""
    for d_model in report.settings.d_models:
        present = {r.model: r.accuracy[setting] for r in report.results if r.d_model == d_model}
        chain = [m for m in EXPECTED_ORDER if m in present]
        if len(chain) < 2:
            return ""
        ok = all(present[a] >= present[b] if a == "attention" else present[a] > present[b]
                 for a, b in zip(chain, chain[1:]))
        if not ok:
            return f" | expected {_order_text(chain)}: does NOT hold"
    return f" | expected {_order_text(chain)}: holds"


def _order_text(chain: list[str]) -> str:
    return "".join(f"{a} {'>=' if a == 'attention' else '>'} " for a in chain[:-1]) + chain[-1]


def plot_accuracy(report: RecallReport, path: str | os.PathLike) -> None:
    """PNG: accuracy against num_kv_pairs, one panel per seq_len, one line per model; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report.settings
    fig, axes = plt.subplots(1, len(s.seq_lens), figsize=(4.2 * len(s.seq_lens), 3.6), squeeze=False, sharey=True)
    for ax, seq_len in zip(axes[0], s.seq_lens):
        for r in report.results:
            points = sorted((n, a) for (t, n), a in r.accuracy.items() if t == seq_len)
            label = r.model if len(s.d_models) == 1 else f"{r.model} d={r.d_model}"
            ax.plot([n for n, _ in points], [a for _, a in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        counts = sorted({n for t, n in settings_grid(s) if t == seq_len})
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
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    finally:
        plt.close(fig)
