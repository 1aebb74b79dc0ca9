import json

import pytest

from memmix.cli import build_parser
from memmix.errors import InputError
from memmix.training.config import TrainConfig, config_from_args, read_config_file
from memmix.models.presets import MOM_PRESETS as PRESETS
from memmix.training.trainer import check_preset


def test_file_then_flags_override_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: mom-340m\nseq-len: 2048\nlr: 3e-4\nmodel_overrides: {num_memories: 8}\nshuffle: false\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--lr", "1e-4", "--micro-batch-size", "3"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.seq_len, cfg.lr, cfg.micro_batch_size) == ("mom-340m", 2048, 1e-4, 3)
    assert cfg.model_overrides == {"num_memories": 8} and cfg.shuffle is False
    assert cfg.warmup_steps == TrainConfig().warmup_steps


def test_json_config_and_bool_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"max_steps": 7, "tensorboard": True}))
    args = build_parser().parse_args(["train", "--config", str(path), "--no-tensorboard", "--model-overrides",
                                      '{"topk": 1}'])
    cfg = config_from_args(args)
    assert cfg.max_steps == 7 and cfg.tensorboard is False and cfg.model_overrides == {"topk": 1}


@pytest.mark.parametrize("text, match", [("sequence_len: 5\n", "unknown setting 'sequence_len'.*seq_len"),
                                         ("seq_len: abc\n", "must be a int"), ("- a\n- b\n", "mapping"),
                                         ("lr: [1\n", "could not be parsed")])
def test_bad_config_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_config_file(str(path))


def test_validation_and_presets():
    with pytest.raises(InputError, match="parallel: must be one of"):
        TrainConfig(parallel="zero3")
    with pytest.raises(InputError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(InputError, match="unknown model preset 'mom-340M'; did you mean 'mom-340m'"):
        check_preset("mom-340M")
    for size, hidden in (("340m", 1024), ("1.3b", 2048)):
        mom, gdn, attn = PRESETS[f"mom-{size}"], PRESETS[f"gdn-{size}"], PRESETS[f"attention-{size}"]
        assert (mom["hidden_size"], mom["num_hidden_layers"], mom["num_heads"], mom["head_dim"]) == (hidden, 24, 4, 256)
        assert (mom["num_memories"], mom["topk"], mom["shared_mem"]) == (4, 2, True)
        assert (gdn["num_memories"], gdn["topk"], gdn["shared_mem"]) == (1, 1, False)
        assert attn["attn_layers"] == list(range(24)) and attn["hidden_size"] == hidden


def test_every_preset_is_a_valid_model_config_and_tiny_ones_run():
    import torch

    from memmix.models import MoMConfig
    from memmix.models.presets import preset_config_kwargs
    from memmix.training.trainer import build_model

    for name in PRESETS:
        MoMConfig(**preset_config_kwargs(name, 320))  # validates without allocating weights
    for name in ("mom-tiny", "gdn-tiny", "attention-tiny"):
        model = build_model(name, 320, eos_token_id=256)
        ids = torch.randint(0, 320, (1, 9))
        loss = model(input_ids=ids, cu_seqlens=torch.tensor([0, 4, 9]), labels=ids, use_cache=False).loss
        assert torch.isfinite(loss) and model.config.eos_token_id == 256
    with pytest.raises(InputError, match="model_overrides: bad overrides"):
        build_model("tiny", 320, {"topk": 9})


def test_bmojo_presets_build_and_run():
    import torch

    from memmix.models import BMojoForCausalLM
    from memmix.models.presets import BMOJO_PRESETS, preset_names
    from memmix.training.trainer import build_model

    assert set(BMOJO_PRESETS) <= set(preset_names())
    check_preset("bmojo-340m")
    model = build_model("bmojo-tiny", 320, eos_token_id=256)
    assert isinstance(model, BMojoForCausalLM) and model.config.eos_token_id == 256
    ids = torch.randint(0, 320, (1, 9))
    loss = model(input_ids=ids, cu_seqlens=torch.tensor([0, 4, 9]), labels=ids, use_cache=False).loss
    assert torch.isfinite(loss)
    with pytest.raises(InputError, match="model_overrides: bad overrides"):
        build_model("bmojo-tiny", 320, {"window_size": -1})
