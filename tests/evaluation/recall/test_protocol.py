"""The recall protocol: the zoology preset, grids, learning-rate sweep on validation, early stopping, seeds,
gdn-wide's state, the ablation variants and the time estimate."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memmix.evaluation.recall import (
    ABLATION_MODELS,
    PRESETS,
    RECALL_MODELS,
    ModelResult,
    ModelSize,
    RecallModel,
    RecallReport,
    RecallSettingError,
    RecallSettings,
    RunResult,
    RunSpec,
    StateSize,
    estimate_seconds,
    format_table,
    hardest_setting,
    preflight_warning,
    run_recall,
    select_best,
    settings_grid,
    validate_settings,
)
from memmix.evaluation.recall.report import aggregate

GRID_TINY = dict(seq_lens=[], num_kv_pairs=[], train_grid=[(16, 2)], test_grid=[(16, 2), (32, 3)], d_models=[16],
                 head_dim=8, num_layers=1, batch_size=4, num_train=16, num_valid=8, num_test=8, vocab_size=16,
                 workers=1)


# ----------------------------------------------------------------------------------------------- presets, grids


@pytest.mark.parametrize("preset", ["zoology", "zoology-ablations"])
def test_zoology_presets_validate_and_follow_the_protocol(preset):
    s = RecallSettings(**PRESETS[preset], device="cpu")
    validate_settings(s)
    assert s.train_grid == [(64, 4), (128, 8), (256, 16), (256, 32), (256, 64)]
    assert settings_grid(s) == [(64, 4), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)]
    assert hardest_setting(s) == (256, 64)  # the hardest setting trained on, not the extrapolation
    assert (s.vocab_size, s.data_style, s.num_layers, s.seeds, s.stop_accuracy) == (8192, "zoology", 2, 3, 0.99)
    assert s.lr == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2] and s.num_valid > 0  # Zoology's range, half-decades
    assert s.steps == 64 * 180_000 // 256 and s.warmup_fraction * s.steps < 500  # Zoology's budget, a short warm-up
    if preset == "zoology":
        assert s.d_models == [64, 128, 256]
        assert s.models == ["attention", "mom", "gdn", "gdn-wide", "linear", "bmojo", "bmojo-f"]
    else:
        assert len(s.d_models) == 1 and set(ABLATION_MODELS) <= set(s.models) and {"mom", "gdn"} <= set(s.models)


@pytest.mark.parametrize("change, field", [
    (dict(seq_lens=[32]), "seq_lens"),  # not used with both grids: refused, not ignored
    (dict(test_grid=[(16, 2), (16, 5)]), "test_grid"),  # 5 pairs do not fit 16 tokens
    (dict(train_grid=[(16, 2), (16, 2)]), "train_grid"),
    (dict(train_grid=[(16,)]), "train_grid"),
    (dict(lr=[1e-3, 1e-2], num_valid=0), "num_valid"),  # a sweep needs a validation split
    (dict(stop_accuracy=0.9, num_valid=0), "num_valid"),
    (dict(stop_accuracy=1.5), "stop_accuracy"),
    (dict(lr=[1e-3, -1.0]), "lr"),
    (dict(lr=[]), "lr"),
    (dict(seeds=0), "seeds"),
    (dict(eval_every=0), "eval_every"),
    (dict(data_style="based"), "data_style"),
    (dict(budget_minutes=-1.0), "budget_minutes"),
])
def test_bad_protocol_settings_name_the_field(change, field):
    with pytest.raises(RecallSettingError) as err:
        validate_settings(RecallSettings(**(GRID_TINY | change)))
    assert err.value.setting == field


def test_a_test_grid_with_product_style_training():
    s = RecallSettings(seq_lens=[16], num_kv_pairs=[2, 3], test_grid=[(16, 3), (32, 6)], vocab_size=16)
    validate_settings(s)
    assert settings_grid(s) == [(16, 3), (32, 6)] and hardest_setting(s) == (16, 3)


# ----------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("d_model,head_dim", [(16, 8), (64, 16), (128, 16), (256, 16)])
def test_gdn_wide_holds_exactly_moms_recurrent_state(d_model, head_dim):
    size = ModelSize(vocab_size=32, d_model=d_model, num_layers=2, head_dim=head_dim)
    state = {name: RECALL_MODELS[name].state_size(RECALL_MODELS[name].build(size)).floats
             for name in ("mom", "gdn", "gdn-wide")}
    assert state["gdn-wide"] == state["mom"] == 5 * state["gdn"]  # 4 routed memories + the shared one


def test_each_ablation_changes_one_field_of_mom():
    size = ModelSize(vocab_size=16, d_model=16, num_layers=1, head_dim=8)
    base = RECALL_MODELS["mom"].build(size).config.to_dict()
    for name in ABLATION_MODELS:
        config = RECALL_MODELS[name].build(size).config.to_dict()
        changed = {k for k in base if k not in ("_name_or_path", "transformers_version") and base[k] != config[k]}
        assert len(changed) == 1 and changed <= {"topk", "num_memories", "shared_mem", "aux_loss_scale", "conv_scope",
                                                 "router_input", "router_z_loss", "router_temperature"}, name
    # the router and convolution ablations, each on its MoMConfig option
    options = {"mom-conv-whole": ("conv_scope", "sequence"), "mom-route-conv": ("router_input", "conv"),
               "mom-zloss": ("router_z_loss", 1e-3), "mom-temp": ("router_temperature", 2.0)}
    for name, (field, value) in options.items():
        assert name in ABLATION_MODELS and getattr(RECALL_MODELS[name].build(size).config, field) == value, name
    # routing from a convolution carries its tail: hidden_size * (conv_size - 1) more floats per MoM layer
    mom, routed = (RECALL_MODELS[name].state_size(RECALL_MODELS[name].build(size)).floats
                   for name in ("mom", "mom-route-conv"))
    assert routed - mom == 16 * 3


# ----------------------------------------------------------------------------------------------- oracle models


class _Oracle(nn.Module):
    """Reads the answer (the next input token, memmix-style data). right(self, seq_len) decides, per sequence
    length, whether it answers right; ``weight`` moves by about the learning rate each step (loss = weight)."""

    def __init__(self, vocab_size: int, right):
        super().__init__()
        self.vocab_size, self.right = vocab_size, right
        self.weight = nn.Parameter(torch.zeros(()))
        self.lucky = bool(torch.rand(()) < 0.5)  # drawn from the run's seed

    def forward(self, input_ids, labels=None):
        nxt = torch.roll(input_ids, -1, dims=1)
        offset = 0 if self.right(self, input_ids.shape[1]) else 1
        logits = nn.functional.one_hot((nxt + offset) % self.vocab_size, self.vocab_size).float()
        return SimpleNamespace(logits=logits, loss=self.weight * 1.0 if labels is not None else None)


def _register(monkeypatch, name: str, right) -> None:
    entry = RecallModel(name, "an oracle", lambda size: _Oracle(size.vocab_size, right),
                        lambda m: StateSize(7, None, ""))
    monkeypatch.setitem(RECALL_MODELS, name, entry)


def test_the_learning_rate_is_picked_on_validation_not_test(monkeypatch):
    # right at the trained length (validation) only after small steps, right at the test-only length only after
    # large ones: the best on validation is the worst on test
    def right(model, seq_len):
        moved = abs(float(model.weight.detach())) > 0.05
        return not moved if seq_len == 16 else moved

    _register(monkeypatch, "tricky", right)
    s = RecallSettings(**GRID_TINY, models=["tricky"], lr=[1e-3, 1e-1], steps=4, seeds=2, warmup_fraction=0.0)
    report = run_recall(s, progress=False)
    sweep = {r.spec.lr: r for r in report.runs if r.spec.stage == "sweep"}
    assert (sweep[1e-3].valid_accuracy, sweep[1e-3].accuracy[(32, 3)]) == (1.0, 0.0)
    assert (sweep[1e-1].valid_accuracy, sweep[1e-1].accuracy[(32, 3)]) == (0.0, 1.0)
    row = report.results[0]
    assert row.lr == 1e-3 and row.accuracy[(32, 3)] == 0.0 and row.seeds == [0, 1]
    assert [(r.spec.lr, r.spec.seed) for r in report.runs if r.spec.stage == "seed"] == [(1e-3, 1)]


@pytest.mark.parametrize("always_right", [True, False])
def test_training_stops_once_validation_reaches_the_threshold(monkeypatch, always_right):
    _register(monkeypatch, "oracle", lambda model, seq_len: always_right)
    s = RecallSettings(**GRID_TINY, models=["oracle"], steps=10, stop_accuracy=0.99, eval_every=4, log_every=3)
    run = run_recall(s, progress=False).runs[0]
    if always_right:
        assert (run.steps_trained, run.stopped_early, run.valid_curve) == (4, True, [(4, 1.0)])
        assert len(run.loss_curve) == 4  # every step's loss, read back at steps 3 and 4
    else:
        assert (run.steps_trained, run.stopped_early) == (10, False)
        assert run.valid_curve == [(4, 0.0), (8, 0.0)] and run.valid_accuracy == 0.0 and len(run.loss_curve) == 10


def test_seeds_are_reported_as_mean_and_range(monkeypatch, tmp_path):
    _register(monkeypatch, "lucky", lambda model, seq_len: model.lucky)
    s = RecallSettings(**GRID_TINY, models=["lucky"], steps=2, seeds=3, plot_path=str(tmp_path / "a.png"),
                       state_plot_path=str(tmp_path / "state.png"))
    report = run_recall(s, progress=False)
    for name in ("a.png", "state.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_seed = [r.accuracy[(32, 3)] for r in report.runs]
    assert [r.spec.seed for r in report.runs] == [0, 1, 2] and len(set(per_seed)) == 2  # seeds differ
    row = report.results[0]
    assert row.accuracy[(32, 3)] == pytest.approx(sum(per_seed) / 3)
    assert row.accuracy_range[(32, 3)] == (min(per_seed), max(per_seed)) == (0.0, 1.0)
    assert f"{row.accuracy[(32, 3)]:.3f} (0.000-1.000)" in format_table(report)


def _run(model: str, lr: float, seed: int, valid: float | None, test: float, steps: int = 10,
         stage: str = "sweep") -> RunResult:
    return RunResult(RunSpec(model, 64, lr, seed, stage), "", 2, 100, StateSize(10, None, ""), {(64, 4): test},
                     valid, [], steps, False, 0.1, 1.0, [])


def test_selection_ties_go_to_fewer_steps_then_the_first_learning_rate():
    lrs = [1e-3, 3e-3, 1e-2]
    runs = [_run("m", 1e-3, 0, 0.99, 0.1, steps=800), _run("m", 3e-3, 0, 0.99, 0.2, steps=400),
            _run("m", 1e-2, 0, 0.5, 0.9)]
    assert select_best(runs, lrs).spec.lr == 3e-3
    runs[1] = _run("m", 3e-3, 0, 0.99, 0.2, steps=800)
    assert select_best(runs, lrs).spec.lr == 1e-3


def test_rows_use_the_chosen_rate_and_mark_an_unfinished_sweep():
    s = RecallSettings(models=["m"], seq_lens=[64], num_kv_pairs=[4], lr=[1e-3, 1e-2], num_valid=4, seeds=2,
                       d_models=[64], vocab_size=64)
    runs = [_run("m", 1e-3, 0, 0.6, 0.5), _run("m", 1e-2, 0, 0.9, 0.7), _run("m", 1e-2, 1, 0.8, 0.9, stage="seed"),
            _run("m", 1e-3, 1, 0.9, 0.1, stage="seed")]  # a seed run of the other rate (an older sweep): ignored
    row = aggregate(s, runs)[0]
    assert (row.lr, row.seeds, row.complete) == (1e-2, [0, 1], True)
    assert row.accuracy[(64, 4)] == pytest.approx(0.8) and row.accuracy_range[(64, 4)] == (0.7, 0.9)
    partial = aggregate(s, runs[:1])[0]
    assert not partial.complete and "0.001*" in format_table(RecallReport(s, [partial], 1.0))


# ----------------------------------------------------------------------------------------------- estimate


def test_estimate_counts_the_runs_left_and_scales_with_steps():
    s = RecallSettings(**PRESETS["zoology"], device="cpu")
    full = estimate_seconds(s, "cuda")
    assert full.runs == 7 * 3 * (5 + 2) and full.device == "cuda" and "guess" in full.basis  # 7 models, 3 widths
    half = estimate_seconds(dataclasses.replace(s, steps=s.steps // 2), "cuda")
    assert 0.4 * full.seconds < half.seconds < 0.6 * full.seconds
    one = estimate_seconds(dataclasses.replace(s, models=["attention"], d_models=[64]), "cuda")
    assert one.runs == 7 and one.seconds < full.seconds / 10
    done = [_run("attention", lr, 0, 0.9, 0.9) for lr in s.lr]
    for r in done:
        r.spec = dataclasses.replace(r.spec, d_model=64)
        r.train_seconds, r.steps_trained = 30.0, 300  # measured: 0.1 s a step
    measured = estimate_seconds(dataclasses.replace(s, models=["attention"], d_models=[64]), "cuda", finished=done)
    assert measured.runs == 2 and measured.seconds == pytest.approx(2 * s.steps * 0.1, rel=0.05)


def test_preflight_warns_about_a_gpu_grid_on_the_cpu_only():
    assert preflight_warning(RecallSettings()) is None  # the CPU demo: minutes
    warning = preflight_warning(RecallSettings(**PRESETS["zoology"], device="cpu"))
    assert warning is not None and "cuda" in warning and "budget" in warning


def test_report_of_an_old_product_grid_keeps_its_table_header():
    s = RecallSettings(models=["m"], seq_lens=[32], num_kv_pairs=[2, 4])
    row = ModelResult("m", "", 2, 64, 1, StateSize(1, None, ""), {(32, 2): 1.0, (32, 4): 0.5}, 0.0, 0.0, [])
    header = format_table(RecallReport(s, [row], 1.0)).splitlines()[0]
    assert header.split(" | ")[-3:] == ["params", "T=32 N=2", "T=32 N=4"]
