from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memmix.cli import main
from memmix.data.mqar import generate_mqar
from memmix.evaluation import recall
from memmix.evaluation.recall import (
    RECALL_MODELS,
    ModelResult,
    ModelSize,
    RecallModel,
    RecallReport,
    RecallSettings,
    StateSize,
    recall_accuracy,
    run_recall,
    summary_line,
    validate_settings,
)
from memmix.evaluation.recall import pool as recall_pool
from memmix.evaluation.recall import progress as recall_progress
from memmix.evaluation.recall.estimate import Estimate
from memmix.evaluation.recall.report import fmt_seconds

TINY = ["--seq-len", "16", "--num-kv-pairs", "2,3", "--d-model", "16", "--head-dim", "8", "--layers", "1",
        "--steps", "3", "--batch-size", "4", "--num-train", "24", "--num-test", "8", "--vocab-size", "16",
        "--device", "cpu"]


class _NextTokenOracle(nn.Module):
    """Cheats by reading the next input token; ``offset`` != 0 makes every prediction wrong."""

    def __init__(self, vocab_size: int, offset: int = 0):
        super().__init__()
        self.vocab_size, self.offset = vocab_size, offset
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, labels=None):
        nxt = torch.roll(input_ids, -1, dims=1)
        logits = nn.functional.one_hot((nxt + self.offset) % self.vocab_size, self.vocab_size).float()
        loss = (logits.sum() * 0 + self.weight.sum()) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


@pytest.mark.parametrize("offset,expected", [(0, 1.0), (1, 0.0)])
def test_recall_accuracy_scores_the_value_predicted_at_the_key(offset, expected):
    data = generate_mqar(10, 32, [2, 5], 32, seed=0)
    assert recall_accuracy(_NextTokenOracle(32, offset), data, batch_size=3, device="cpu") == expected


def test_recall_accuracy_counts_queries_not_sequences():
    data = generate_mqar(9, 32, [1, 7], 32, seed=2)

    class RightOnEvenKeys(_NextTokenOracle):  # wrong on every sequence whose first key is odd
        def forward(self, input_ids, labels=None):
            out = super().forward(input_ids)
            odd = input_ids[:, 0] % 2 == 1
            out.logits[odd] = out.logits[odd].roll(1, dims=-1)
            return out

    even = data.input_ids[:, 0] % 2 == 0
    assert 0 < int(even.sum()) < 9
    right = int((data.labels[even] != -100).sum())
    total = int((data.labels != -100).sum())
    assert recall_accuracy(RightOnEvenKeys(32), data, batch_size=4, device="cpu") == pytest.approx(right / total)


def test_registry_builds_every_model_with_its_state_size():
    size = ModelSize(vocab_size=16, d_model=16, num_layers=2, head_dim=8)
    states = {}
    for name in ["mom", "gdn", "linear", "attention", "bmojo"]:
        model = RECALL_MODELS[name].build(size)
        states[name] = RECALL_MODELS[name].state_size(model)
        out = model(input_ids=torch.randint(0, 16, (2, 12)), labels=torch.randint(0, 16, (2, 12)))
        assert out.logits.shape == (2, 12, 16) and torch.isfinite(out.loss)
    assert states["mom"].floats > states["gdn"].floats == states["linear"].floats > 0  # 5 memories vs 1
    assert states["attention"].floats is None and states["attention"].floats_per_token == 2 * 2 * 16
    assert "grows" in states["attention"].describe() and "const" in states["gdn"].describe()
    assert states["bmojo"].floats > states["gdn"].floats  # window and eidetic store on top of a fading state


def test_adding_a_model_is_one_registry_entry(monkeypatch):
    def build(size: ModelSize) -> nn.Module:
        return _NextTokenOracle(size.vocab_size)

    entry = RecallModel("oracle", "reads the answer", build, lambda m: StateSize(0, None, ""))
    monkeypatch.setitem(RECALL_MODELS, "oracle", entry)
    settings = RecallSettings(models=["oracle"], seq_lens=[16], num_kv_pairs=[2], d_models=[16], head_dim=8,
                              steps=2, batch_size=4, num_train=8, num_test=8, vocab_size=16)
    report = run_recall(settings, progress=False)
    assert report.results[0].accuracy == {(16, 2): 1.0}


def _report(acc: dict[str, float]) -> RecallReport:
    settings = RecallSettings(models=list(acc), seq_lens=[64], num_kv_pairs=[4, 16])
    results = [ModelResult(m, "", 2, 64, 1, StateSize(1, None, ""), {(64, 4): 1.0, (64, 16): a}, 0.0, 0.0, [])
               for m, a in acc.items()]
    return RecallReport(settings, results, wall_seconds=61.0)


@pytest.mark.parametrize(
    "acc,holds",
    [
        ({"attention": 1.0, "mom": 0.9, "gdn": 0.7, "linear": 0.2}, True),
        ({"attention": 0.9, "mom": 0.9, "gdn": 0.7, "linear": 0.2}, True),  # attention may tie
        ({"attention": 1.0, "mom": 0.7, "gdn": 0.7, "linear": 0.2}, False),  # mom must beat gdn
        ({"attention": 0.5, "mom": 0.9, "gdn": 0.7, "linear": 0.2}, False),
        ({"mom": 0.9, "linear": 0.95}, False),
    ],
)
def test_summary_checks_the_expected_order_at_the_hardest_setting(acc, holds):
    line = summary_line(_report(acc))
    assert "T=64 N=16" in line and "1m01s" in line
    assert ("does NOT hold" not in line) == holds and ("holds" in line) == holds


@pytest.mark.parametrize("seconds,text", [(0.4, "0s"), (59.4, "59s"), (59.6, "1m00s"), (61.0, "1m01s"),
                                          (3599.4, "59m59s"), (3599.6, "1h00m"), (7529.0, "2h05m"),
                                          (90000.0, "25h00m")])
def test_durations_print_alike_in_summaries_bars_and_estimates(seconds, text):
    assert fmt_seconds(seconds) == text
    estimate = Estimate(seconds=seconds, runs=3, workers=1, device="cpu", basis="a model")
    assert estimate.describe() == f"about {text} for 3 runs on 1 worker (cpu; a model)"


@pytest.mark.parametrize(
    "argv,option",
    [
        (["--models", "mom,foo"], "--models"),
        (["--num-kv-pairs", "100"], "--num-kv-pairs"),
        (["--seq-len", "8,64", "--num-kv-pairs", "4"], "--seq-len"),
        (["--seq-len", "64,x"], "--seq-len"),
        (["--vocab-size", "16", "--num-kv-pairs", "8"], "--num-kv-pairs"),
        (["--steps", "0"], "--steps"),
        (["--lr", "-1"], "--lr"),
        (["--d-model", "40", "--head-dim", "16"], "--d-model"),
        (["--device", "tpu"], "--device"),
        (["--steps", "ten"], "--steps"),
        (["--preset", "huge"], "--preset"),
        (["--threads", "-1"], "--threads"),
        (["--workers", "-1"], "--workers"),
        (["--task", "mixed", "--workers", "2"], "--workers"),
    ],
)
def test_bad_options_exit_2_with_one_line_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["recall", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("memmix recall: error:") and option in err


def test_unknown_model_error_lists_the_allowed_names(capsys):
    with pytest.raises(SystemExit):
        main(["recall", "--models", "transformer"])
    err = capsys.readouterr().err
    assert all(name in err for name in ["mom", "gdn", "linear", "attention"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda_is_a_setting_error():
    with pytest.raises(recall.RecallSettingError, match="device"):
        validate_settings(RecallSettings(device="cuda"))


def test_end_to_end_table_json_and_plot(tmp_path, capsys):
    json_path, plot_path = tmp_path / "out" / "recall.json", tmp_path / "recall.png"
    code = main(["recall", "--models", "mom,gdn,linear,attention", *TINY, "--json", str(json_path),
                 "--plot", str(plot_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for column in ["model", "layers", "d_model", "recurrent state", "params", "T=16 N=2", "T=16 N=3"]:
        assert column in header
    for name in ["mom", "gdn", "linear", "attention"]:
        assert any(line.startswith(name) for line in out.splitlines())
    assert "recall at T=16 N=3 (hardest)" in out.splitlines()[-1]

    payload = json.loads(json_path.read_text())
    assert [r["model"] for r in payload["results"]] == ["mom", "gdn", "linear", "attention"]
    assert payload["settings"]["steps"] == 3 and payload["settings"]["seq_lens"] == [16]
    for result in payload["results"]:
        grid = {(a["seq_len"], a["num_kv_pairs"]) for a in result["accuracy"]}
        assert grid == {(16, 2), (16, 3)}
        assert all(0.0 <= a["accuracy"] <= 1.0 for a in result["accuracy"])
        assert result["params"] > 0 and len(result["loss_curve"]) == 3
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(json_path.parent) if f.startswith(".recall-")]  # no temp files left


def test_thread_count_is_restored_after_the_run():
    before = torch.get_num_threads()
    settings = RecallSettings(models=["linear"], seq_lens=[16], num_kv_pairs=[2], d_models=[16], head_dim=8,
                              num_layers=1, steps=1, batch_size=2, num_train=4, num_test=2, vocab_size=16,
                              num_threads=1)
    run_recall(settings, progress=False)
    assert torch.get_num_threads() == before


def test_same_seed_same_numbers():
    settings = RecallSettings(models=["gdn"], seq_lens=[16], num_kv_pairs=[2], d_models=[16], head_dim=8,
                              num_layers=1, steps=2, batch_size=4, num_train=16, num_test=8, vocab_size=16)
    first, second = run_recall(settings, progress=False), run_recall(settings, progress=False)
    assert first.results[0].loss_curve == second.results[0].loss_curve


def test_parallel_workers_give_the_same_numbers_as_one_process():
    settings = RecallSettings(models=["gdn", "linear", "mom"], seq_lens=[16], num_kv_pairs=[2], d_models=[16],
                              head_dim=8, num_layers=1, steps=3, batch_size=4, num_train=16, num_test=8, vocab_size=16)
    one = run_recall(dataclasses.replace(settings, workers=1), progress=False)
    two = run_recall(dataclasses.replace(settings, workers=2), progress=False)
    assert [r.model for r in two.results] == ["gdn", "linear", "mom"]
    for a, b in zip(one.results, two.results):
        assert (a.model, a.loss_curve, a.accuracy, a.params) == (b.model, b.loss_curve, b.accuracy, b.params)


@pytest.mark.parametrize(
    "fields,runs,expected",
    [
        (dict(), 4, 4),  # one per core (4 here), one thread each
        (dict(), 3, 3),  # never more than the runs
        (dict(num_threads=2), 4, 2),
        (dict(num_threads=0), 4, 1),  # torch's own thread count: one process
        (dict(device="cuda"), 4, 1),
        (dict(workers=3), 2, 2),
        (dict(workers=1), 4, 1),
    ],
)
def test_worker_count(monkeypatch, fields, runs, expected):
    monkeypatch.setattr(recall_pool.os, "cpu_count", lambda: 4)
    assert recall.worker_count(RecallSettings(**fields), runs) == expected


def test_models_registered_at_run_time_train_in_this_process(monkeypatch):
    entry = RecallModel("oracle", "reads the answer", lambda size: _NextTokenOracle(size.vocab_size),
                        lambda m: StateSize(0, None, ""))
    monkeypatch.setitem(RECALL_MODELS, "oracle", entry)
    assert recall.worker_count(RecallSettings(models=["oracle", "gdn"]), 2) == 1
    with pytest.raises(recall.RecallSettingError, match="workers"):
        recall.worker_count(RecallSettings(models=["oracle", "gdn"], workers=2), 2)


def test_progress_eta_counts_running_and_waiting_runs(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(recall_progress.time, "perf_counter", lambda: clock[0])
    progress = recall_progress.RunProgress(3, steps_per_run=100, workers=2, enabled=False)
    spec = recall.RunSpec("gdn", 16, 1e-3, 0)
    first, second = progress.start(spec), progress.start(spec)  # both start at t = 0
    clock[0] = 10.0
    progress.update(first, 50, 1.0)  # 0.2 s a step: 50 steps (10 s) to go
    progress.update(second, 100, 1.0)  # 0.1 s a step, done
    progress.finish(second)
    clock[0] = 12.0  # a finished run's rate does not decay while the others train
    # the longest running remainder, plus run "c" at the mean 0.15 s a step over 2 workers
    assert progress.remaining_seconds() == pytest.approx(12.0 / 50 * 50 + 100 * (12.0 / 50 + 0.1) / 2 / 2)


def test_a_replaced_builtin_model_also_trains_in_this_process(monkeypatch):
    entry = RecallModel("gdn", "another gdn", lambda size: _NextTokenOracle(size.vocab_size),
                        lambda m: StateSize(0, None, ""))
    monkeypatch.setitem(RECALL_MODELS, "gdn", entry)
    assert recall.worker_count(RecallSettings(models=["gdn", "mom"]), 2) == 1
