"""Load a trained model and its tokenizer from a training checkpoint, a run folder or a saved HF folder."""
from __future__ import annotations

import os

import torch

from memmix.errors import InputError
from memmix.data.tokenizer import HFTokenizer, load_tokenizer
from memmix.progress import quiet_transformers_bars
from memmix.training.checkpoint import MODEL_KEYS, check_state_dict_shapes, load_checkpoint, resolve_checkpoint
from memmix.training.trainer import build_model


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def _has_tokenizer_files(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def load_model_and_tokenizer(path: str, tokenizer: str | None = None, device: str | torch.device = "cpu"):
    """-> (model in eval mode on `device`, tokenizer). `tokenizer` overrides the one saved with the model.

    path: a step_*.pt checkpoint, a run's out_dir (its latest checkpoint), or a folder written by
    `save_pretrained` (the run's `final/` folder). Bad input raises InputError naming `path` or `tokenizer`.
    """
    if not os.path.exists(path):
        raise InputError(f"'{path}' does not exist; pass a checkpoint, a run folder or a saved model folder", "path")
    if is_hf_folder(path):
        model, tok = _load_hf_folder(path, tokenizer)
    else:
        model, tok = _load_training_checkpoint(resolve_checkpoint(path, "path"), tokenizer)
    vocab = _vocab_size(model)
    if vocab is not None and tok.vocab_size > vocab:
        raise InputError(f"the tokenizer has {tok.vocab_size} tokens but the model only {vocab}; pass the tokenizer "
                         "the model was trained with", "tokenizer")
    return model.to(device).eval(), tok


def _vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def _load_hf_folder(path: str, tokenizer: str | None):
    import memmix.models  # noqa: F401  (registers memmix with the Auto* classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers_bars():
            model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as exc:  # unknown model_type, bad weights, ...
        raise InputError(f"could not load a model from '{path}' ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''})", "path") from None
    check_loading_info(info, path)
    if tokenizer:
        return model, load_tokenizer(tokenizer)
    if _has_tokenizer_files(path):
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return model, HFTokenizer.from_hf(hf, os.path.basename(os.path.normpath(path)))
    return model, load_tokenizer("byte")


def check_loading_info(info: dict, path: str) -> None:
    """InputError naming the folder when its weights do not fill its config's model: transformers would start the
    missing ones from random values (e.g. a config that names another architecture than the weights)."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    mismatched = [key for key, *_ in info.get("mismatched_keys") or []]
    if not (missing or unexpected or mismatched):
        return
    what = (f"{len(missing)} weights are missing (e.g. '{missing[0]}')" if missing else
            f"{len(unexpected)} weights are not the model's (e.g. '{unexpected[0]}')" if unexpected else
            f"'{mismatched[0]}' has another shape")
    raise InputError(f"the weights in '{path}' do not fit the model its config.json describes ({what}); the config "
                     "and the weights come from different models", "path")


def _load_training_checkpoint(path: str, tokenizer: str | None):
    checkpoint = load_checkpoint(path, "path", needs=MODEL_KEYS)
    spec = checkpoint["model_spec"]
    tok = load_tokenizer(tokenizer or spec["tokenizer"])
    model = build_model(spec["model"], spec["vocab_size"], spec["model_overrides"], tok.eos_token_id)
    check_state_dict_shapes(model, checkpoint["model"], f"checkpoint '{path}'")
    model.load_state_dict(checkpoint["model"])
    return model, tok

