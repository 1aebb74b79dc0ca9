"""`TrainConfig`: every setting of `memmix train`, loadable from YAML/JSON and overridable by flags."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field

from memmix.errors import InputError
from memmix.data.sources import ENCODING_ERRORS
from memmix.devices import parse_device

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "fp32")
SWITCHES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """One training run. Field names are also the config-file keys and, with '-' for '_', the flags."""

    # model
    model: str = field(default="tiny", metadata={"help": "model preset (mom-340m, gdn-340m, attention-340m, tiny, ...)"})
    model_overrides: dict = field(default_factory=dict, metadata={"help": "JSON dict of MoMConfig fields to override"})
    vocab_size: int = field(default=0, metadata={"help": "model vocabulary; 0 = tokenizer's, rounded up to a multiple of 64"})
    # data
    data: str = field(default="", metadata={"help": "training data: text file/folder, JSONL, saved dataset, hf:NAME, or shards"})
    val_data: str = field(default="", metadata={"help": "held-out data for periodic validation loss (optional)"})
    data_format: str = field(default="auto", metadata={"help": "auto | text | jsonl | hf | shards"})
    encoding_errors: str = field(default="strict", metadata={
        "help": "bytes that are not UTF-8: strict (stop, naming the file and byte offset) | replace (U+FFFD)"})
    text_field: str = field(default="text", metadata={"help": "JSONL / dataset field holding the text"})
    split: str = field(default="train", metadata={"help": "dataset split (hf datasets)"})
    doc_separator: str = field(default="", metadata={"help": "split plain-text files into documents at this string"})
    tokenizer: str = field(default="byte", metadata={"help": "'byte' (built in) or a local Hugging Face tokenizer folder"})
    verify_shards: bool = field(default=True, metadata={"help": "check shard checksums when opening them"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle rows each epoch"})
    seq_len: int = field(default=512, metadata={"help": "tokens per row"})
    micro_batch_size: int = field(default=8, metadata={"help": "rows per micro-batch per GPU"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    # optimisation
    max_steps: int = field(default=1000, metadata={"help": "optimiser steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr of the cosine"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 disables clipping"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass"})
    fused_loss: str = field(default="auto", metadata={
        "help": "auto | on | off: the LM head and cross-entropy a chunk of rows at a time (the logits are never "
                "whole; same loss); auto = on for CUDA"})
    cuda_graph: bool = field(default=False, metadata={
        "help": "capture each optimiser step as one CUDA graph (one GPU, no DDP/FSDP; document bounds padded to a "
                "power of two so few shapes occur): small models train at the GPU's speed, not Python's"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and the data order"})
    parallel: str = field(default="auto", metadata={"help": "auto | none | ddp | fsdp (under torchrun)"})
    # output
    out_dir: str = field(default="runs/train", metadata={"help": "checkpoints, logs and the final model go here"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines"})
    save_every: int = field(default=500, metadata={"help": "steps between checkpoints (and one at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    eval_every: int = field(default=0, metadata={"help": "steps between validation runs (0 = never)"})
    eval_batches: int = field(default=8, metadata={"help": "micro-batches per validation run"})
    resume: str = field(default="", metadata={
        "help": "continue the run in --out-dir: from its latest checkpoint, or from PATH (a step_*.pt file)",
        "nargs": "?", "const": "latest", "metavar": "PATH"})
    overwrite: bool = field(default=False, metadata={"help": "start over even if --out-dir holds a run"})
    plot: bool = field(default=True, metadata={"help": "draw the loss curve into loss.png beside metrics.jsonl at the end"})
    save_hf: bool = field(default=True, metadata={"help": "save a Hugging Face model folder (out_dir/final) at the end"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    tensorboard: bool = field(default=True, metadata={"help": "log to TensorBoard when it is installed"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda when a GPU is visible, else cpu) | cpu | cuda | cuda:N (one process; under torchrun each "
                "process uses the GPU of its LOCAL_RANK)"})

    def __post_init__(self):
        if isinstance(self.resume, bool):  # `resume: true` in a config file, resume=True in code
            self.resume = "latest" if self.resume else ""
        self.validate()

    def validate(self) -> None:
        positive = ("seq_len", "micro_batch_size", "grad_accum", "max_steps", "log_every", "save_every",
                    "keep_checkpoints", "eval_batches")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"must be an integer >= 1, got {getattr(self, name)!r}", argument=name)
        for name in ("warmup_steps", "eval_every", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InputError(f"must be an integer >= 0, got {getattr(self, name)!r}", argument=name)
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InputError(f"must be a finite number, got {value!r}", argument=name)
        if not self.lr > 0:
            raise InputError(f"must be > 0, got {self.lr}", argument="lr")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise InputError(f"must be an integer in [0, 2**32 - 1], got {self.seed!r}", argument="seed")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"must be in [0, 1], got {self.min_lr_ratio}", argument="min_lr_ratio")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"must be in [0, 1), got {getattr(self, name)}", argument=name)
        for name in ("grad_clip", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise InputError(f"must be >= 0, got {getattr(self, name)}", argument=name)
        if self.lr * self.weight_decay >= 1:  # AdamW scales the weights by (1 - lr * weight_decay) every step
            raise InputError(f"{self.weight_decay} times lr {self.lr} is >= 1, so each step would zero or flip "
                             "every matrix (AdamW scales weights by 1 - lr * weight_decay); use a value below "
                             f"{1 / self.lr:g}", argument="weight_decay")
        if self.resume and self.overwrite:
            raise InputError("does not combine with resume: resume continues the run, overwrite starts it over; "
                             "pass one of them", argument="overwrite")
        parse_device(self.device)
        for name, allowed in (("parallel", PARALLEL_MODES), ("precision", PRECISIONS),
                              ("encoding_errors", ENCODING_ERRORS), ("fused_loss", SWITCHES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}", argument=name)
        if not isinstance(self.model_overrides, dict):
            raise InputError(f"must be a JSON object, got {self.model_overrides!r}", argument="model_overrides")
        if self.eval_every and not self.val_data:
            raise InputError(f"is {self.eval_every} but there is no validation data; set val_data (held-out "
                             "text) or eval_every 0", argument="eval_every")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str) -> dict:
    """YAML or JSON file -> dict of TrainConfig fields (keys may use '-' or '_')."""
    if os.path.isdir(path):
        raise InputError(f"'{path}' is a folder; pass a YAML or JSON file", "config")
    if not os.path.isfile(path):
        raise InputError(f"config file '{path}' does not exist; pass an existing YAML or JSON file", "config")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise InputError(f"config file '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8",
                         "config") from None
    except OSError as err:
        raise InputError(f"config file '{path}' could not be read ({err.strerror or err})", "config") from None
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # yaml/json syntax errors
        raise InputError(f"config file '{path}' could not be parsed: {str(exc).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"config file '{path}' must hold a mapping of settings, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"config file '{path}': unknown setting '{key}'{hint}; see `memmix train --help`")
        values[name] = _coerce(name, value, path)
    return values


def _coerce(name: str, value, path: str):
    """YAML reads `1e-3` as a string and users write `8.0` for ints: convert where it is unambiguous."""
    kind = FIELDS[name].type
    kind = kind if isinstance(kind, str) else kind.__name__
    if name == "resume" and isinstance(value, bool):  # `resume: true`: the latest checkpoint
        return value
    try:
        if kind == "float" and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if kind == "str" and isinstance(value, (str, int, float)):
            return str(value)
        if kind in ("bool", "dict") and isinstance(value, {"bool": bool, "dict": dict}[kind]):
            return value
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf), e.g. `max_steps: .inf` or 1e400
        pass
    raise InputError(f"config file '{path}': setting '{name}' must be a {kind}, got {value!r}")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def _default_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if default in ("", {}) or default is None:
        return ""
    if isinstance(default, bool):
        return f" (default: {'--' if default else '--no-'}{f.name.replace('_', '-')})"
    return f" (default: {default})"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are suppressed so only flags given override the file (the help
    shows them)."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = (f.metadata.get("help", "") + _default_text(f)).replace("%", "%%")
        extra = {k: f.metadata[k] for k in ("nargs", "const", "metavar") if k in f.metadata}
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif f.type in ("dict", dict):
            parser.add_argument(flag, type=_json_dict, default=argparse.SUPPRESS, metavar="JSON", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text, **extra)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < flags."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update({name: getattr(args, name) for name in FIELDS if hasattr(args, name)})
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise InputError(f"bad setting: {exc}") from None
