"""Mixed-modal recall benchmark: modality-aware against modality-blind memory routing (MoMa-style groups).

    settings = MixedRecallSettings(models=["aware", "blind"], topks=[1, 2])
    report = run_mixed_recall(settings)
    print(format_mixed_table(report))

Data: `memmix.data.mixed_recall` (two MQAR streams in two disjoint vocabularies, interleaved in segments).
"aware" routes each token among its own modality's memories (memory_groups {"text": 2, "image": 2}) and gets
the sequence's modality_ids; "blind" routes among all 4 memories. Both have the same parameters and state
(4 routed memories + a shared one, the same top-k). The token ids already tell the modalities apart, so the
aware model gets no information the blind one lacks: the comparison is about the routing constraint alone.
Beside accuracy, the table gives the routers' *memory purity*: the share of routed slots that go to a memory
whose majority modality is the token's own (1.0: no memory mixes modalities; 0.5: fully mixed).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from memmix.data.mixed_recall import MODALITIES, MixedRecallData, make_mixed_recall_splits, max_mixed_kv_pairs
from memmix.evaluation.recall.models import (
    StateSize,
    count_parameters,
    mom_family_state_size,
)
from memmix.evaluation.recall.pool import torch_threads
from memmix.evaluation.recall.report import fmt_seconds
from memmix.evaluation.recall.run import thin
from memmix.evaluation.recall.settings import RecallSettingError, hardest
from memmix.evaluation.recall.tasks import Splits, cached_splits
from memmix.evaluation.recall.training import Recipe, train_steps
from memmix.labels import IGNORE_INDEX
from memmix.routing import allowed_memories, one_hot, route

GROUPS = {"text": 2, "image": 2}


@dataclass
class MixedVariant:
    """A registry entry: how the memories (and MLPs) are grouped; `uses_modality` passes modality_ids."""

    name: str
    summary: str
    overrides: dict[str, Any]
    uses_modality: bool


MIXED_VARIANTS: dict[str, MixedVariant] = {
    v.name: v for v in [
        MixedVariant("aware", "memory_groups text:2 image:2, routed within the token's modality",
                     {"memory_groups": GROUPS}, True),
        MixedVariant("blind", "4 memories, every token routed among all 4", {}, False),
        MixedVariant("aware+moe", "aware memories + MoMa FFN experts text:1 image:1 (more parameters)",
                     {"memory_groups": GROUPS, "ffn_experts": {"text": 1, "image": 1}}, True),
    ]
}


@dataclass
class MixedRecallSettings:
    """Everything one run depends on (the defaults: a CPU demo of a few minutes on 2 cores)."""

    models: list[str] = field(default_factory=lambda: ["aware", "blind"])
    topks: list[int] = field(default_factory=lambda: [1])
    seq_lens: list[int] = field(default_factory=lambda: [64])
    num_kv_pairs: list[int] = field(default_factory=lambda: [2, 4])  # per modality
    num_segments: int = 4  # per modality: 2 * num_segments alternating segments
    d_models: list[int] = field(default_factory=lambda: [64])
    num_layers: int = 2
    head_dim: int = 16
    steps: int = 800
    lr: float = 1e-2
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    batch_size: int = 32
    vocab_size: int = 32  # two modalities of 16 ids: 7 keys and 8 values each (small, so that CPU runs learn)
    num_train: int = 8_000  # per seq_len
    num_test: int = 250  # per (seq_len, num_kv_pairs)
    eval_batch_size: int = 250
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 1  # CPU threads (0 = torch's default); tiny models gain little from more

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_mixed_settings(s: MixedRecallSettings) -> None:
    """Raise RecallSettingError naming the field and the allowed values on the first bad setting."""
    unknown = [m for m in s.models if m not in MIXED_VARIANTS]
    if not s.models or unknown or len(set(s.models)) != len(s.models):
        raise RecallSettingError("models", f"name each of {', '.join(MIXED_VARIANTS)} at most once, got {s.models}")
    smallest = min(GROUPS.values())
    if not s.topks or any(not 1 <= k <= smallest for k in s.topks) or len(set(s.topks)) != len(s.topks):
        raise RecallSettingError("topks", f"give distinct values in [1, {smallest}] (the group size), got {s.topks}")
    for name in ("seq_lens", "num_kv_pairs", "d_models"):
        values = getattr(s, name)
        if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
            raise RecallSettingError(name, f"give distinct integers >= 1, got {values}")
    bad_len = [t for t in s.seq_lens if t < 8 or t % 4]
    if bad_len:
        raise RecallSettingError("seq_lens", f"each must be a multiple of 4 and >= 8, got {bad_len[0]}")
    if s.vocab_size < 8:
        raise RecallSettingError("vocab_size", f"must be >= 8, got {s.vocab_size}")
    limit = max_mixed_kv_pairs(min(s.seq_lens), s.vocab_size)
    if max(s.num_kv_pairs) > limit:
        raise RecallSettingError("num_kv_pairs", f"at most {limit} pairs per modality fit seq_len={min(s.seq_lens)}, "
                                                 f"vocab_size={s.vocab_size}; got {max(s.num_kv_pairs)}")
    if not 1 <= s.num_segments <= min(s.seq_lens) // 4:
        raise RecallSettingError("num_segments", f"must be in [1, {min(s.seq_lens) // 4}], got {s.num_segments}")
    for name in ("num_layers", "head_dim", "steps", "batch_size", "num_train", "num_test", "eval_batch_size"):
        if getattr(s, name) < 1:
            raise RecallSettingError(name, f"must be an integer >= 1, got {getattr(s, name)}")
    if any(d % s.head_dim for d in s.d_models):
        raise RecallSettingError("d_models", f"each must be a multiple of head_dim={s.head_dim}, got {s.d_models}")
    if not (s.lr > 0 and math.isfinite(s.lr)):
        raise RecallSettingError("lr", f"must be a finite number > 0, got {s.lr}")
    if s.seed < 0:
        raise RecallSettingError("seed", f"must be >= 0, got {s.seed}")
    if s.num_threads < 0:
        raise RecallSettingError("num_threads", f"must be >= 0 (0 = torch's default), got {s.num_threads}")
    if s.device.split(":")[0] not in ("cpu", "cuda") or (s.device.startswith("cuda") and not torch.cuda.is_available()):
        raise RecallSettingError("device", f"allowed: cpu, or cuda / cuda:N when CUDA is available; got {s.device!r}")


def build_mixed_model(variant: MixedVariant, topk: int, d_model: int, s: MixedRecallSettings) -> nn.Module:
    """A MoMForCausalLM with 4 gated-delta memories (+ shared), top-`topk`, grouped as the variant says."""
    from memmix.models import MoMConfig, MoMForCausalLM

    num_heads = d_model // s.head_dim
    config = MoMConfig(vocab_size=s.vocab_size, hidden_size=d_model, num_hidden_layers=s.num_layers,
                       num_heads=num_heads, head_dim=s.head_dim, attn_num_heads=num_heads,
                       intermediate_size=2 * d_model,
                       num_memories=4, topk=topk, shared_mem=True, memory_rule="gated_delta", **variant.overrides)
    return MoMForCausalLM(config)


# ----------------------------------------------------------------------------------------------- train / evaluate


def model_inputs(batch: MixedRecallData, uses_modality: bool) -> dict[str, torch.Tensor]:
    """The model's keyword inputs for a batch: input_ids, and modality_ids when the model routes by modality."""
    inputs = {"input_ids": batch.input_ids}
    if uses_modality:
        inputs["modality_ids"] = batch.modality_ids
    return inputs


class MixedTask:
    """Mixed-modal recall at a MixedRecallSettings' grid; ``uses_modality`` passes modality_ids to the model."""

    def __init__(self, settings, uses_modality: bool):
        self.s, self.uses_modality = settings, uses_modality

    def make_splits(self) -> Splits:
        s, train, test = self.s, {}, {}
        for seq_len in s.seq_lens:
            train[seq_len], per_count = make_mixed_recall_splits(seq_len, s.num_kv_pairs, s.vocab_size, s.num_train,
                                                                 s.num_test, s.seed, s.num_segments)
            test.update({(seq_len, n): data for n, data in per_count.items()})
        return Splits(train, test)

    def splits(self, device: str | torch.device) -> Splits:
        s = self.s
        key = ("mixed", tuple(s.seq_lens), tuple(s.num_kv_pairs), s.vocab_size, s.num_train, s.num_test, s.seed,
               s.num_segments)
        return cached_splits(key, device, self.make_splits)

    def inputs(self, batch: MixedRecallData) -> dict[str, torch.Tensor]:
        return model_inputs(batch, self.uses_modality)

    def accuracy(self, model: nn.Module, data) -> float:
        return self.scores(model, data)["all"]

    def scores(self, model: nn.Module, data) -> dict[str, float]:
        """Accuracy over all queries and per modality ({"all", "text", "image"}) plus the memory purity."""
        device = next(model.parameters()).device
        return mixed_recall_accuracy(model, data, self.s.eval_batch_size, device, self.uses_modality)


def train_mixed(model: nn.Module, train: dict[int, MixedRecallData], s: MixedRecallSettings, uses_modality: bool,
                on_log: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW + warm-up/cosine for s.steps steps on data already on s.device; returns every step's loss.
    on_log(steps_done, loss) every 10 steps and at the end."""
    recipe = Recipe(steps=s.steps, lr=s.lr, weight_decay=s.weight_decay, warmup_fraction=s.warmup_fraction,
                    batch_size=s.batch_size, seed=s.seed)
    inputs = MixedTask(s, uses_modality).inputs
    return train_steps(model, train, inputs, recipe, on_log).losses


@torch.no_grad()
def mixed_recall_accuracy(model: nn.Module, data: MixedRecallData, batch_size: int, device,
                          uses_modality: bool) -> dict[str, float]:
    """Accuracy over all queries and per modality ({"all", "text", "image"}) plus the memory purity."""
    model.eval()
    correct = torch.zeros(2)
    total = torch.zeros(2)
    usage = None  # (layers, M, 2) routed slots per memory and token modality
    for start in range(0, len(data), batch_size):
        batch = data.subset(slice(start, start + batch_size))
        inputs = {name: t.to(device) for name, t in model_inputs(batch, uses_modality).items()}
        out = model(**inputs, output_router_logits=True, use_cache=False)
        predicted = out.logits[:, :-1].argmax(-1).cpu()  # (B, T - 1)
        target, modality = batch.labels[:, 1:].cpu(), batch.modality_ids[:, 1:].cpu()
        for m in range(2):
            mask = (target != IGNORE_INDEX) & (modality == m)
            correct[m] += int((predicted[mask] == target[mask]).sum())
            total[m] += int(mask.sum())
        counts = _memory_usage(out.router_logits, batch.modality_ids, model.config)
        usage = counts if usage is None else usage + counts
    result = {"all": float(correct.sum() / total.sum().clamp(min=1))}
    result.update({MODALITIES[m]: float(correct[m] / total[m].clamp(min=1)) for m in range(2)})
    result["purity"] = float(usage.max(-1).values.sum() / usage.sum().clamp(min=1))
    return result


def _memory_usage(router_logits, modality_ids: torch.Tensor, config) -> torch.Tensor:
    """(layers, M, 2) number of routed (token, memory) picks per memory and token modality."""
    modality_ids = modality_ids.to(router_logits[0].device)
    allowed = None if config.memory_groups is None else allowed_memories(modality_ids, config.memory_group_sizes)
    per_layer = []
    for logits in router_logits:
        picks = one_hot(route(logits, config.topk, allowed).indices, config.num_memories).sum(2)
        per_layer.append(torch.stack([(picks * (modality_ids == m).unsqueeze(-1)).sum((0, 1)) for m in range(2)], -1))
    return torch.stack(per_layer).float().cpu()


# ----------------------------------------------------------------------------------------------- the benchmark


@dataclass
class MixedResult:
    """One trained model; accuracy maps (seq_len, num_kv_pairs) to {"all", "text", "image", "purity"}."""

    model: str
    summary: str
    topk: int
    d_model: int
    params: int
    state: StateSize
    accuracy: dict[tuple[int, int], dict[str, float]]
    final_loss: float
    train_seconds: float
    loss_curve: list[float]

    @property
    def label(self) -> str:
        return f"{self.model} top-{self.topk}"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "summary": self.summary, "topk": self.topk, "d_model": self.d_model,
                "params": self.params, "recurrent_state": self.state.describe(), "state_floats": self.state.floats,
                "accuracy": [{"seq_len": t, "num_kv_pairs": n, **a} for (t, n), a in self.accuracy.items()],
                "final_loss": self.final_loss, "train_seconds": self.train_seconds, "loss_curve": self.loss_curve}


@dataclass
class MixedRecallReport:
    settings: MixedRecallSettings
    results: list[MixedResult]
    wall_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"task": "mixed", "settings": self.settings.as_dict(), "results": [r.as_dict() for r in self.results],
                "wall_seconds": self.wall_seconds, "summary": mixed_summary_line(self)}


def mixed_grid(s: MixedRecallSettings) -> list[tuple[int, int]]:
    return [(t, n) for t in s.seq_lens for n in s.num_kv_pairs]


def run_mixed_recall(s: MixedRecallSettings, progress: bool = True) -> MixedRecallReport:
    """Train every (variant, topk, d_model) under the same budget; test every (seq_len, num_kv_pairs)."""
    validate_mixed_settings(s)
    with torch_threads(s.num_threads):
        return _run(s, progress)


def _run(s: MixedRecallSettings, progress: bool) -> MixedRecallReport:
    start = time.perf_counter()
    runs = [(d, k, name) for d in s.d_models for k in s.topks for name in s.models]
    results = []
    for i, (d_model, topk, name) in enumerate(runs):
        bar = tqdm(total=s.steps, desc=f"[{i + 1}/{len(runs)}] {name} top-{topk} d={d_model}", disable=not progress,
                   mininterval=1.0, dynamic_ncols=True)
        results.append(_train_and_test(MIXED_VARIANTS[name], topk, d_model, s,
                                       lambda steps, loss: bar.update(steps - bar.n)))
        bar.close()
    return MixedRecallReport(settings=s, results=results, wall_seconds=time.perf_counter() - start)


def _train_and_test(variant: MixedVariant, topk: int, d_model: int, s: MixedRecallSettings, on_log) -> MixedResult:
    task = MixedTask(s, variant.uses_modality)
    torch.manual_seed(s.seed)
    model = build_mixed_model(variant, topk, d_model, s).to(s.device)
    splits = task.splits(s.device)
    started = time.perf_counter()
    losses = train_mixed(model, splits.train, s, variant.uses_modality, on_log)
    seconds = time.perf_counter() - started
    accuracy = {key: task.scores(model, data) for key, data in splits.test.items()}
    tail = losses[-max(1, len(losses) // 20):]
    return MixedResult(model=variant.name, summary=variant.summary, topk=topk, d_model=d_model,
                       params=count_parameters(model), state=mom_family_state_size(model), accuracy=accuracy,
                       final_loss=sum(tail) / len(tail), train_seconds=seconds,
                       loss_curve=thin(losses, 200))


# ----------------------------------------------------------------------------------------------- reporting


def format_mixed_table(report: MixedRecallReport) -> str:
    """One row per (model, topk, d_model): size columns, then per (seq_len, N) accuracy all / text / image."""
    grid = mixed_grid(report.settings)
    header = ["model", "d_model", "params", "recurrent state (floats)"]
    header += [f"T={t} N={n} all/text/image" for t, n in grid] + ["purity", "final loss"]
    rows = []
    for r in report.results:
        cells = [r.label, str(r.d_model), f"{r.params:,}", r.state.describe()]
        cells += [f"{r.accuracy[g]['all']:.3f} / {r.accuracy[g]['text']:.3f} / {r.accuracy[g]['image']:.3f}"
                  for g in grid]
        purity = sum(r.accuracy[g]["purity"] for g in grid) / len(grid)
        rows.append(cells + [f"{purity:.3f}", f"{r.final_loss:.3f}"])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, rows)])


def mixed_summary_line(report: MixedRecallReport) -> str:
    """Aware against blind at each topk (and d_model), at the hardest setting (most pairs, longest sequence)."""
    setting = hardest(mixed_grid(report.settings))
    by_key = {(r.model, r.topk, r.d_model): r.accuracy[setting]["all"] for r in report.results}
    parts = []
    for (model, topk, d_model), acc in by_key.items():
        if model == "aware" and ("blind", topk, d_model) in by_key:
            blind = by_key[("blind", topk, d_model)]
            parts.append(f"top-{topk}: aware {acc:.3f} vs blind {blind:.3f} ({acc - blind:+.3f})")
    comparison = "; ".join(parts) if parts else ", ".join(f"{m} top-{k} {a:.3f}" for (m, k, _), a in by_key.items())
    return (f"mixed-modal recall at T={setting[0]} N={setting[1]} per modality: {comparison}; "
            f"{len(report.results)} runs in {fmt_seconds(report.wall_seconds)}")
