"""The mixed-modal recall benchmark: models, scoring, memory purity, table and JSON."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memmix.data.mixed_recall import generate_mixed_recall
from memmix.evaluation.recall.mixed import (
    MIXED_VARIANTS,
    MixedRecallSettings,
    build_mixed_model,
    format_mixed_table,
    mixed_recall_accuracy,
    run_mixed_recall,
    validate_mixed_settings,
)
from memmix.evaluation.recall import RecallSettingError

TINY = dict(seq_lens=[16], num_kv_pairs=[1, 2], num_segments=2, d_models=[16], num_layers=1, head_dim=8, steps=2,
            batch_size=4, vocab_size=16, num_train=16, num_test=4, eval_batch_size=3)


class Oracle(nn.Module):
    """Predicts the right value for the modalities in `right`, a wrong one elsewhere; routes modality m to
    memory m (or everything to memory 0 when `mixed`)."""

    def __init__(self, data, right: set[int], mixed: bool = False):
        super().__init__()
        self.data, self.right, self.mixed = data, right, mixed
        self.config = SimpleNamespace(memory_groups=None, topk=1, num_memories=4)

    def forward(self, input_ids, modality_ids=None, output_router_logits=False, use_cache=False):
        row = next(i for i in range(len(self.data)) if torch.equal(self.data.input_ids[i], input_ids[0]))
        labels = self.data.labels[row:row + len(input_ids)]
        modality = self.data.modality_ids[row:row + len(input_ids)]
        target = torch.roll(labels, -1, dims=1).clamp(min=0)  # the logits at t predict labels[t + 1]
        good = torch.tensor([[int(m) in self.right for m in r] for r in torch.roll(modality, -1, dims=1)])
        target = torch.where(good, target, (target + 1) % 16)
        route_to = torch.zeros_like(modality) if self.mixed else modality
        return SimpleNamespace(logits=nn.functional.one_hot(target, 16).double(),
                               router_logits=(nn.functional.one_hot(route_to, 4).float() * 5,))


@pytest.mark.parametrize("right, mixed, want", [({0, 1}, False, (1.0, 1.0, 1.0, 1.0)),
                                                ({0}, False, (None, 1.0, 0.0, 1.0)),
                                                (set(), True, (0.0, 0.0, 0.0, None))])
def test_accuracy_per_modality_and_memory_purity(right, mixed, want):
    data = generate_mixed_recall(5, 32, 2, 16, seed=0, num_segments=3)
    got = mixed_recall_accuracy(Oracle(data, right, mixed), data, batch_size=2, device="cpu", uses_modality=True)
    for key, value in zip(("all", "text", "image", "purity"), want):
        if value is not None:
            assert got[key] == pytest.approx(value), key
    if right == {0}:
        assert got["all"] == pytest.approx(0.5)  # as many text as image queries
    if mixed:  # every token in memory 0: its majority modality holds half the picks
        text_share = float((data.modality_ids == 0).float().mean())
        assert got["purity"] == pytest.approx(max(text_share, 1 - text_share))


def test_aware_and_blind_have_equal_parameters_and_state():
    settings = MixedRecallSettings(**TINY)
    aware = build_mixed_model(MIXED_VARIANTS["aware"], 1, 16, settings)
    blind = build_mixed_model(MIXED_VARIANTS["blind"], 1, 16, settings)
    assert aware.config.memory_group_sizes == [2, 2] and blind.config.memory_groups is None
    assert sum(p.numel() for p in aware.parameters()) == sum(p.numel() for p in blind.parameters())
    assert aware.recurrent_state_size(0) == blind.recurrent_state_size(0)
    moe = build_mixed_model(MIXED_VARIANTS["aware+moe"], 1, 16, settings)
    assert moe.config.ffn_expert_groups == [1, 1] and type(moe.model.layers[0].mlp).__name__ == "ModalityMoE"


def test_end_to_end_table_and_json(tmp_path):
    settings = MixedRecallSettings(models=["aware", "blind"], topks=[1, 2], **TINY)
    report = run_mixed_recall(settings, progress=False)
    assert [(r.model, r.topk) for r in report.results] == [("aware", 1), ("blind", 1), ("aware", 2), ("blind", 2)]
    table = format_mixed_table(report)
    assert "aware top-2" in table and "T=16 N=2 all/text/image" in table
    for r in report.results:
        assert set(r.accuracy) == {(16, 1), (16, 2)} and len(r.loss_curve) == 2
        if r.model == "aware":
            assert all(a["purity"] == 1.0 for a in r.accuracy.values())  # groups: no memory mixes modalities
    payload = json.loads(json.dumps(report.as_dict()))
    assert payload["task"] == "mixed" and "aware" in payload["summary"] and "vs blind" in payload["summary"]


@pytest.mark.parametrize("change, field", [(dict(models=["aware", "nope"]), "models"), (dict(topks=[3]), "topks"),
                                           (dict(seq_lens=[18]), "seq_lens"), (dict(num_kv_pairs=[4]), "num_kv_pairs"),
                                           (dict(num_segments=5), "num_segments"), (dict(d_models=[12]), "d_models"),
                                           (dict(device="tpu"), "device")])
def test_bad_settings_name_the_field(change, field):
    with pytest.raises(RecallSettingError) as err:
        validate_mixed_settings(MixedRecallSettings(**(TINY | change)))
    assert err.value.setting == field


CLI_TINY = ["--task", "mixed", "--seq-len", "16", "--num-kv-pairs", "1,2", "--d-model", "16", "--layers", "1",
            "--head-dim", "8", "--steps", "2", "--batch-size", "4", "--vocab-size", "16", "--num-train", "16",
            "--num-test", "4", "--no-progress"]


def test_cli_task_mixed_prints_the_table_and_writes_json(tmp_path, capsys):
    from memmix.cli import main

    path = tmp_path / "mixed.json"
    assert main(["recall", *CLI_TINY, "--topk", "1,2", "--json", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "T=16 N=2 all/text/image" in out[0] and out[-1].startswith("mixed-modal recall at T=16 N=2")
    assert sum(line.startswith(("aware top-", "blind top-")) for line in out) == 4
    payload = json.loads(path.read_text())
    assert payload["task"] == "mixed" and payload["settings"]["topks"] == [1, 2]


@pytest.mark.parametrize("argv, option", [(["--topk", "3"], "--topk"), (["--models", "aware,mom"], "--models"),
                                          (["--seq-len", "18"], "--seq-len"), (["--topk", "x"], "--topk")])
def test_cli_task_mixed_bad_options_exit_2_naming_the_option(argv, option, capsys):
    from memmix.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["recall", *CLI_TINY, *argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and option in err
