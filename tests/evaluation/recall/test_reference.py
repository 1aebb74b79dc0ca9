"""The recall study's reference rows on the CPU: the fla rows' adapter and availability, the head-width rows, the
zoology-d128 and cpu-vocab presets, and the budget warning. (The fla rows themselves run on CUDA:
test_fla_reference_gpu.py.)"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from memmix.evaluation.recall import (
    PRESETS,
    RECALL_MODELS,
    ModelSize,
    RecallSettingError,
    RecallSettings,
    validate_settings,
)
from memmix.evaluation.recall import models as recall_models
from memmix.evaluation.recall.estimate import budget_warning
from memmix.evaluation.recall.fla_reference import FlaMixer, fla_unavailable, swap_mixers
from memmix.evaluation.recall.tasks import MQARTask
from memmix.evaluation.recall.training import Recipe, train_steps
from memmix.models import MoMForCausalLM
from memmix.models.presets import mom_recall_config

SIZE = ModelSize(vocab_size=32, d_model=32, num_layers=2, head_dim=8)


class _FakeFlaLayer(nn.Module):
    """Stands in for an fla layer: fla's call (hidden_states, attention_mask=, use_cache=, cu_seqlens=) and return
    (o, None, past_key_values[, router_logits (B * T, M)])."""

    def __init__(self, hidden_size: int, num_memories: int | None):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.gate = nn.Linear(hidden_size, num_memories, bias=False) if num_memories else None
        self.calls = []

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        self.calls.append((attention_mask, use_cache, kwargs.get("cu_seqlens")))
        o = self.proj(hidden_states)
        if self.gate is None:
            return o, None, past_key_values
        return o, None, past_key_values, self.gate(hidden_states).view(-1, self.gate.out_features)


def _fake(config, idx) -> FlaMixer:
    memories = config.num_memories if config.num_memories > 1 else None
    return FlaMixer(_FakeFlaLayer(config.hidden_size, memories), num_memories=memories)


@pytest.mark.parametrize("twin", ["gdn", "mom"])
def test_swapped_mixers_keep_the_harness_and_feed_moms_aux_loss(twin):
    torch.manual_seed(0)
    overrides = recall_models.MOM if twin == "mom" else recall_models.GDN
    model = MoMForCausalLM(mom_recall_config(SIZE.vocab_size, SIZE.d_model, SIZE.num_layers, SIZE.head_dim,
                                             **overrides))
    embeddings = model.model.embeddings.weight.clone()
    state = model.recurrent_state_size(context_length=0)
    swap_mixers(model, _fake)
    assert all(isinstance(block.attn, FlaMixer) for block in model.model.layers)
    assert torch.equal(model.model.embeddings.weight, embeddings)  # the harness is untouched
    assert model.recurrent_state_size(context_length=0) == state  # the same formula for the same config
    assert not model.config.use_cache
    linear = model.model.layers[0].attn.layer.proj.weight
    assert linear.std().item() == pytest.approx(model.config.initializer_range, rel=0.2)  # the harness's init
    ids = torch.randint(0, SIZE.vocab_size, (3, 10))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert out.loss.isfinite()
    if twin == "mom":
        assert [tuple(r.shape) for r in out.router_logits] == [(3, 10, 4)] * 2  # (B * T, M) came back as (B, T, M)
        assert out.aux_loss is not None and out.aux_loss.dtype == torch.float32
    else:
        assert out.aux_loss is None
    out.loss.backward()
    assert model.model.layers[1].attn.layer.proj.weight.grad is not None


def test_the_adapter_passes_masks_and_packing_through_and_refuses_a_cache():
    mixer = FlaMixer(_FakeFlaLayer(8, None))
    x, mask, cu = torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.long), torch.tensor([0, 2, 5])
    assert mixer(x, attention_mask=mask).hidden_states.shape == (1, 5, 8)
    mixer(x, cu_seqlens=cu)
    assert mixer.layer.calls[0][:2] == (mask, False) and torch.equal(mixer.layer.calls[1][2], cu)
    with pytest.raises(ValueError, match="no inference cache"):
        mixer(x, use_cache=True)


def test_a_swapped_model_trains_a_few_steps_on_the_cpu():
    torch.manual_seed(0)
    model = swap_mixers(RECALL_MODELS["mom"].build(SIZE), _fake)
    s = RecallSettings(models=["mom"], seq_lens=[16], num_kv_pairs=[2], vocab_size=32, num_train=32, num_test=8)
    task = MQARTask(s)
    recipe = Recipe(steps=3, lr=1e-3, weight_decay=0.1, warmup_fraction=0.0, batch_size=4, seed=0, log_every=1,
                    query_head=True)
    log = train_steps(model, task.splits("cpu").train, task.inputs, recipe)
    assert log.steps == 3 and all(torch.isfinite(torch.tensor(log.losses)))


# ----------------------------------------------------------------------------------------------- availability


def test_fla_rows_say_in_one_line_why_they_cannot_run_here():
    reason = fla_unavailable("cpu")
    assert reason is not None and "\n" not in reason  # the CPU test machine: no fla, or no CUDA
    assert "'fla'" in reason or "einops" in reason or "CUDA" in reason
    s = RecallSettings(**dict(PRESETS["zoology-d128"], device="cpu"))
    with pytest.raises(RecallSettingError, match=r"models: model 'fla-gdn' cannot be built here: ") as err:
        validate_settings(s)
    assert "\n" not in str(err.value)


def test_a_row_whose_package_is_missing_is_not_registered_but_named(monkeypatch):
    monkeypatch.setitem(recall_models.UNAVAILABLE_MODELS, "ref-x", "needs the package 'x', which is not installed")
    with pytest.raises(RecallSettingError, match="model 'ref-x' cannot be built here: needs the package 'x'"):
        validate_settings(RecallSettings(models=["ref-x"]))


def test_fla_rows_train_eagerly_and_cost_as_their_twins():
    from memmix.evaluation.recall.estimate import step_seconds

    assert not recall_models.FLA_MODELS["fla-mom"].graphable and RECALL_MODELS["mom"].graphable
    s = RecallSettings(**PRESETS["zoology-d128"])
    for ref, twin in (("fla-mom", "mom"), ("fla-gdn", "gdn")):
        assert step_seconds(s, ref, 128, "cuda") == step_seconds(s, twin, 128, "cuda")


# ----------------------------------------------------------------------------------------------- head width


@pytest.mark.parametrize("name, twin", [("gdn-h64", "gdn"), ("mom-h64", "mom")])
def test_rows_with_heads_of_64_hold_4x_the_memory_of_heads_of_16(name, twin):
    size = ModelSize(vocab_size=64, d_model=128, num_layers=2, head_dim=16)
    wide, narrow = RECALL_MODELS[name].build(size), RECALL_MODELS[twin].build(size)
    assert (wide.config.num_heads, wide.config.head_dim) == (2, 64)
    assert (narrow.config.num_heads, narrow.config.head_dim) == (8, 16)
    memory = lambda m: m.recurrent_state_size(context_length=0, include_conv=False)  # noqa: E731
    assert memory(wide) == 4 * memory(narrow)
    with pytest.raises(RecallSettingError, match="model 'gdn-h64' cannot be built here: its heads of 64 need"):
        validate_settings(RecallSettings(models=["gdn-h64"], d_models=[32]))


# ----------------------------------------------------------------------------------------------- presets


def test_the_d128_preset_is_the_first_answers_grid():
    s = RecallSettings(**PRESETS["zoology-d128"])
    assert s.d_models == [128] and s.seeds == 1 and s.lr == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert s.models == ["attention", "gdn", "gdn-h64", "gdn-wide", "mom", "mom-h64", "fla-gdn", "fla-mom"]
    base = RecallSettings(**PRESETS["zoology"])
    same = ("train_grid", "test_grid", "data_style", "vocab_size", "steps", "batch_size", "stop_accuracy", "head_dim")
    assert all(getattr(s, f) == getattr(base, f) for f in same)  # one protocol: the same results file fits both
    validate_settings(dataclasses.replace(s, models=[m for m in s.models if not m.startswith("fla-")]))


def test_the_cpu_vocab_preset_is_small_and_apart_from_the_demo():
    s = RecallSettings(**PRESETS["cpu-vocab"])
    validate_settings(s)
    assert s.query_head == "on" and s.train_grid == [(64, 4)] and s.vocab_size > PRESETS["default"].get(
        "vocab_size", RecallSettings().vocab_size)
    assert {"gdn", "mom"} <= set(s.models)


def test_budget_warning_names_a_run_that_cannot_finish_in_one_call():
    s = RecallSettings(**dict(PRESETS["zoology-d128"], models=["attention", "mom"]), budget_minutes=8)
    warning = budget_warning(s)
    assert warning is not None and "45,000-step cap" in warning and "mom d=128" in warning
    assert budget_warning(dataclasses.replace(s, budget_minutes=0)) is None
    assert budget_warning(dataclasses.replace(s, steps=2, models=["attention"], budget_minutes=600)) is None
