"""benchmarks/train_speed.py: its chunked-head loss equals the model's own loss (float64, values and gradients), and
a CPU smoke run of tiny presets writes its table, JSON and profile (no timings are checked)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from memmix.data.packing import pack_rows
from memmix.models.presets import build_model

from helpers import rel_err

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_speed():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its neighbours (common, layer_speed)
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def packed_batch(seed: int, vocab: int = 320):
    """3 rows of 16 tokens with documents of odd lengths (one of length 1), packed as memmix train packs them."""
    gen = torch.Generator().manual_seed(seed)
    rows = [(torch.randint(0, vocab, (16,), generator=gen).numpy(), starts)
            for starts in (torch.tensor([5, 6]).numpy(), torch.tensor([], dtype=torch.long).numpy(),
                           torch.tensor([9]).numpy())]
    return pack_rows(rows)


@pytest.mark.parametrize("preset, overrides", [("tiny", None), ("gdn-tiny", None), ("attention-tiny", None),
                                               ("tiny", {"router_z_loss": 0.1})])
def test_chunked_head_loss_equals_the_models_loss_with_gradients(train_speed, preset, overrides):
    torch.manual_seed(3)
    model = build_model(preset, 320, overrides, eos_token_id=0).double().train()
    batch = packed_batch(seed=len(preset))
    expected = train_speed.model_loss(model, batch)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    got = train_speed.chunked_head_loss(model, batch)
    grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    assert rel_err(got, expected) < 1e-12
    for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads):
        assert (g is None) == (e is None), name
        if e is not None:
            assert rel_err(g, e, floor=1e-30) < 1e-10, name


def test_cpu_smoke_run_writes_rows_profile_and_copies(train_speed, tmp_path, capsys):
    out = tmp_path / "out"
    payload = train_speed.main([
        "--presets", "tiny,attention-tiny", "--variants", "base,lce+fused+read,lce+fused+graph,base+attn-mask",
        "--device", "cpu", "--steps", "1", "--windows", "1", "--warmup", "1", "--seq-len", "32",
        "--micro-batch", "2", "--profile", "--json", str(tmp_path / "train_speed.json"), "--out", str(out),
    ])
    status = {(r["preset"], r["variant"]): r["status"] for r in payload["rows"]}
    assert status == {
        ("tiny", "base"): "ok", ("tiny", "lce+fused+read"): "ok", ("tiny", "lce+fused+graph"): "skipped",
        ("tiny", "base+attn-mask"): "skipped", ("attention-tiny", "base"): "ok",
        ("attention-tiny", "lce+fused+read"): "ok", ("attention-tiny", "lce+fused+graph"): "skipped",
        ("attention-tiny", "base+attn-mask"): "ok",
    }
    for row in payload["rows"]:
        if row["status"] == "ok":
            assert row["tokens_per_step"] == 64 and row["tokens_per_s"] > 0
            assert set(row["phases_ms"]) == {"forward", "backward", "optimizer"}
    for folder in (tmp_path, out):
        assert json.loads((folder / "train_speed.json").read_text())["rows"] == json.loads(json.dumps(payload["rows"]))
        assert "== attention-tiny base+attn-mask" in (folder / "train_speed_profile.txt").read_text()
    table = capsys.readouterr().out
    assert "tokens/s" in table and "attention-tiny" in table


def test_unknown_variant_option_is_refused_before_any_row(train_speed, tmp_path):
    with pytest.raises(ValueError, match="unknown variant option"):
        train_speed.main(["--presets", "tiny", "--variants", "lce+fast", "--device", "cpu",
                          "--json", str(tmp_path / "x.json")])
