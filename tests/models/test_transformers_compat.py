"""The models run silently on this transformers: forward, cached decoding and generate() log no warning (the
`past_key_values`/`cache_params` -> `cache` deprecation of transformers >= 5.24 included) and raise no Python
warning; the outputs name the cache as this transformers' own outputs do."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from memmix.models import LayerStateCache

from models_helpers import random_ids, tiny_bmojo, tiny_model

MODELS = {"mom": lambda: tiny_model(seed=0, num_hidden_layers=3, attn_layers=[1]), "bmojo": lambda: tiny_bmojo(0)}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings(monkeypatch):
    """Every warning that transformers logs during the test (warning_once too: its once-per-process cache would
    hide a message that an earlier test already logged); Python warnings become errors."""
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, *args, **kwargs: self.warning(*args, **kwargs))
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("name", MODELS)
def test_forward_decoding_and_generate_log_no_warning(name, transformers_warnings):
    model = MODELS[name]().eval()
    ids = random_ids(2, 6, seed=1)
    with torch.no_grad():
        out = model(ids, labels=ids, use_cache=True)
        step = model(ids[:, :1], past_key_values=out.cache, use_cache=True)
        step = model(ids[:, :1], cache=step.cache, use_cache=True, return_dict=False)
        generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert isinstance(step[1], LayerStateCache) and generated.shape == (2, 9)
    assert transformers_warnings == []


@pytest.mark.parametrize("name", MODELS)
def test_outputs_name_the_cache_like_the_transformers_outputs(name):
    model = MODELS[name]().eval()
    with torch.no_grad():
        out = model(random_ids(1, 4, seed=2), use_cache=True)
    ours = {"cache", "past_key_values"} & set(type(out).__dataclass_fields__)
    theirs = {"cache", "past_key_values"} & set(CausalLMOutputWithPast.__dataclass_fields__)
    assert ours == theirs and isinstance(out.cache, LayerStateCache)
    assert out[next(iter(ours))] is out.cache


def test_register_auto_classes_is_idempotent_and_covers_both_families():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from memmix.models import BMojoConfig, BMojoForCausalLM, MoMConfig, MoMForCausalLM, register_auto_classes

    register_auto_classes()
    register_auto_classes()
    for config_class, lm_class in ((MoMConfig, MoMForCausalLM), (BMojoConfig, BMojoForCausalLM)):
        config = AutoConfig.for_model(config_class.model_type, vocab_size=41, hidden_size=16, num_hidden_layers=1,
                                      num_heads=2, head_dim=8, bos_token_id=None, eos_token_id=None)
        assert type(config) is config_class
        assert type(AutoModelForCausalLM.from_config(config)) is lm_class
        assert type(AutoModel.from_config(config)) is lm_class.model_class
