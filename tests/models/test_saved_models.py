"""Checkpoints saved by an earlier memmix load unchanged: same config fields, same state-dict keys, same outputs.

The folders under fixtures/ were written by fixtures/make_saved_models.py with the code before the shared model
skeleton (commit 05e997e); they are never rewritten by the tests.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import memmix  # noqa: F401  (registers the Auto classes)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SAVED = ("mom", "mom_hybrid_modal", "bmojo")


@pytest.mark.parametrize("name", SAVED)
def test_old_checkpoint_loads_with_every_key_and_reproduces_its_outputs(name):
    folder = os.path.join(FIXTURES, name)
    saved_keys = set(load_file(os.path.join(folder, "model.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model_keys = set(model.state_dict())
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert model_keys - tied == saved_keys - tied  # nothing missing, nothing unexpected

    saved_config = json.load(open(os.path.join(folder, "config.json")))
    loaded_config = model.config.to_dict()
    for key, value in saved_config.items():
        if key not in ("transformers_version", "dtype"):
            assert loaded_config[key] == value, key
    config = AutoConfig.from_pretrained(folder)
    assert type(config) is type(model.config) and config.to_dict() == loaded_config

    expected = load_file(os.path.join(folder, "expected.safetensors"))
    inputs = {key: expected[key] for key in ("input_ids", "labels", "modality_ids") if key in expected}
    model.train()
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    for key in ("logits", "loss", "aux_loss"):
        if key in expected:
            torch.testing.assert_close(getattr(out, key), expected[key], rtol=1e-5, atol=1e-6)
