"""The training loop of `memmix train`: one straight function from data to checkpoints.

Single process, or one process per GPU under `torchrun` (DDP or FSDP2). A step consumes
`world_size * grad_accum * micro_batch_size` rows of `seq_len` tokens; each micro-batch is packed into one
sequence with `cu_seqlens`, so memories reset at every document start and row end.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from memmix.data.corpus import load_corpus
from memmix.data.sources import TextSource
from memmix.errors import InputError
from memmix.data.packing import BatchSource, PackedRows, pad_bounds
from memmix.data.tokenizer import load_tokenizer
from memmix.files import atomic_replace_dir, atomic_write_text, check_outputs_apart, check_writable, exclusive_lock
from memmix.training.checkpoint import (
    RESUME_KEYS,
    CheckpointDir,
    full_model_state,
    full_optimizer_state,
    load_checkpoint,
    load_training_state,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from memmix.training.config import TrainConfig
from memmix.training.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    mean_across_ranks,
    shutdown_distributed,
    wrap_model,
)
from memmix.progress import progress_bar, quiet_transformers_bars
from memmix.training.metrics import MetricsLog, write_loss_plot
from memmix.training.optim import build_optimizer, cosine_schedule
from memmix.models import presets
from memmix.training.graph_capture import GraphCaptureError
from memmix.training.step import TrainStep


def model_spec(config: TrainConfig, vocab_size: int, tokenizer) -> dict:
    """What rebuilds a checkpoint's model and tokenizer; all but the tokenizer's path must match to resume."""
    spec = {"model": config.model, "vocab_size": vocab_size, "model_overrides": dict(config.model_overrides),
            "tokenizer": config.tokenizer, "tokenizer_fingerprint": tokenizer.fingerprint}
    if config.model in presets.MOM_PRESETS:
        spec["model_config"] = presets.preset_config_kwargs(config.model, vocab_size, config.model_overrides)
    return spec


RUNTIME_SETTINGS = ("impl", "low_memory")  # how the model runs, not what it computes: a resume may change them


def _without_runtime_settings(spec: dict) -> dict:
    spec = dict(spec, tokenizer=None)  # a moved tokenizer folder is fine
    for key in ("model_overrides", "model_config"):
        if isinstance(spec.get(key), dict):
            spec[key] = {k: v for k, v in spec[key].items() if k not in RUNTIME_SETTINGS}
    return spec


def check_same_spec(saved: dict, current: dict, path: str) -> None:
    saved, current = _without_runtime_settings(saved), _without_runtime_settings(current)
    if saved == current:
        return
    a, b = saved.get("model_config", saved), current.get("model_config", current)
    diffs = [f"{k}={a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    diffs += [f"{k}={saved.get(k)!r} there, {current.get(k)!r} here" for k in ("model", "tokenizer_fingerprint")
              if saved.get(k) != current.get(k)]
    raise InputError(f"checkpoint '{path}' is from another configuration ({'; '.join(diffs[:3])}); resume with "
                     "the settings it was trained with, or start a new run with another --out-dir")


def resolve_vocab_size(config: TrainConfig, tokenizer) -> int:
    if config.vocab_size == 0:
        return int(math.ceil(tokenizer.vocab_size / 64) * 64)
    if config.vocab_size < tokenizer.vocab_size:
        raise InputError(f"{config.vocab_size} is smaller than the vocabulary of tokenizer '{config.tokenizer}' "
                         f"({tokenizer.vocab_size}); use 0 (automatic) or a larger value", "vocab_size")
    return config.vocab_size


def find_resume_checkpoint(config: TrainConfig) -> str | None:
    """-> the checkpoint to resume from, or None; refuses to start over an existing run unless asked to.

    config.resume: "" or False (start a run), "latest" or True (out_dir's latest checkpoint), or a checkpoint file
    or run folder."""
    if config.resume and config.resume not in ("latest", True):
        return resolve_checkpoint(config.resume, argument="resume")
    latest = CheckpointDir(config.out_dir, config.keep_checkpoints).latest()
    if config.resume:
        if latest is None:
            raise InputError(f"no checkpoint in '{config.out_dir}'; drop resume to start a new run", "resume")
        return latest
    if latest is not None and not config.overwrite:
        raise InputError(f"'{config.out_dir}' already holds a run (checkpoint {os.path.basename(latest)}); pass "
                         "--resume to continue it, --overwrite to start over, or another --out-dir")
    return None


# How a resume treats a setting that differs from the run it continues (TrainConfig fields; any other field, such
# as logging, paths or the device, takes its new value silently):
RESUME_REFUSED = ("seq_len", "seed", "shuffle", "data_format", "text_field", "split", "doc_separator")  # data stream
RESUME_WARNED = ("data", "lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay", "beta1", "beta2",
                 "grad_clip", "micro_batch_size", "grad_accum", "precision")  # apply from the resume on; recorded


def changed_settings(saved: dict, config: TrainConfig, path: str) -> dict[str, list]:
    """{field: [the run's value, the new value]} for the warned settings that differ; InputError for a refused one."""
    current = config.to_dict()
    differs = [k for k in RESUME_REFUSED + RESUME_WARNED if k in saved and saved[k] != current[k]]
    refused = [k for k in differs if k in RESUME_REFUSED]
    if refused:
        name = refused[0]
        raise InputError(f"is {current[name]!r} but the run in checkpoint '{path}' trained with {saved[name]!r}, and "
                         "a resume must read the same data stream; resume with the run's value or start a new run "
                         "(another out_dir)", name)
    return {k: [saved[k], current[k]] for k in differs}


def check_preset(name: str) -> None:
    """InputError (argument "model") unless `name` is a preset or a registered custom model."""
    try:
        presets.check_preset(name)
    except ValueError as exc:
        raise InputError(str(exc), "model") from None


def build_model(name: str, vocab_size: int, overrides: dict | None = None, eos_token_id: int | None = None):
    """memmix.models.presets.build_model; a bad preset or bad overrides raise InputError naming the argument."""
    check_preset(name)
    try:
        return presets.build_model(name, vocab_size, overrides, eos_token_id)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad overrides for preset '{name}': {exc}", "model_overrides") from None


def check_model_overrides(name: str, overrides: dict) -> None:
    """InputError naming a model_overrides key that the preset's config class does not have (with the closest)."""
    for key in ("vocab_size", "eos_token_id"):  # the command sets these from the tokenizer
        if key in (overrides or {}):
            flag = "--vocab-size" if key == "vocab_size" else "--tokenizer"
            raise InputError(f"'{key}' is set by memmix train (pass {flag} instead)", "model_overrides")
    if not overrides or name in presets.CUSTOM_MODELS:
        return
    from memmix.models import BMojoConfig, MoMConfig

    cls = BMojoConfig if name in presets.BMOJO_PRESETS else MoMConfig
    known = (set(inspect.signature(cls.__init__).parameters) | set(cls().to_dict())) - {
        "self", "kwargs", "model_type", "transformers_version", "architectures", "_name_or_path"}
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"unknown {cls.__name__} field '{key}'{hint}", "model_overrides")


def check_run_settings(config: TrainConfig) -> None:
    """What TrainConfig cannot check alone: the launch, the output folder, the model overrides."""
    if config.cuda_graph and config.parallel in ("ddp", "fsdp"):
        raise InputError(f"captures one process's step; it does not combine with parallel {config.parallel!r}",
                         "cuda_graph")
    if config.parallel in ("ddp", "fsdp") and "WORLD_SIZE" not in os.environ:
        raise InputError(f"{config.parallel!r} needs the processes that torchrun starts (WORLD_SIZE is not set): "
                         "`torchrun --nproc_per_node N -m memmix train ...`; or use 'none' or 'auto'", "parallel")
    reason = check_writable(config.out_dir, is_dir=True)
    if reason:
        raise InputError(reason, "out_dir")
    resume_path = config.resume if isinstance(config.resume, str) and config.resume not in ("", "latest") else None
    check_outputs_apart({"out_dir": (config.out_dir, False)},
                        {"--data": config.data, "--val-data": config.val_data, "--tokenizer": config.tokenizer,
                         "--resume": resume_path if resume_path and os.path.isfile(resume_path) else None})
    check_preset(config.model)
    check_model_overrides(config.model, config.model_overrides)


def check_micro_batch(config: TrainConfig, num_rows: int, world_size: int) -> None:
    """Refuse a micro-batch the data cannot fill (its rows would repeat within it), before anything is allocated."""
    if config.micro_batch_size * world_size > num_rows:
        per_rank = f" per process x {world_size} processes" if world_size > 1 else ""
        raise InputError(f"is {config.micro_batch_size}{per_rank} but the data '{config.data}' holds only {num_rows} "
                         f"rows of seq_len {config.seq_len}; use at most {max(1, num_rows // world_size)} (or a "
                         "shorter seq_len, or more data)", "micro_batch_size")


def check_eval_batches(config: TrainConfig, num_rows: int, world_size: int) -> None:
    """Refuse more validation micro-batches than the validation data holds (they would repeat its rows)."""
    per_rank = math.ceil(config.eval_batches / world_size)
    fits = num_rows // (config.micro_batch_size * world_size)
    if per_rank > fits:
        advice = (f"use at most {fits * world_size}" if fits else
                  f"it holds fewer rows than one micro-batch of {config.micro_batch_size}: pass more validation data")
        raise InputError(f"is {config.eval_batches} but the validation data '{config.val_data}' holds {num_rows} rows "
                         f"of seq_len {config.seq_len}, {fits * world_size} micro-batches of "
                         f"{config.micro_batch_size}; {advice}", "eval_batches")


def run_warnings(config: TrainConfig, changed: dict[str, list], resume_step: int) -> list[str]:
    """Settings that are allowed but probably not what was meant, and the settings a resume changes."""
    warnings = [f"resuming with {name}={after!r}; the run trained with {name}={before!r} until step {resume_step} "
                "(recorded in metrics.jsonl)" for name, (before, after) in changed.items() if name != "data_content"]
    if "data_content" in changed:
        warnings.append(f"the data at '{config.data}' changed since the run's step {resume_step} (tokens:checksum "
                        f"{changed['data_content'][0]} then, {changed['data_content'][1]} now): the resume reads "
                        "another data stream than the run did (recorded in metrics.jsonl)")
    if config.val_data and not config.eval_every:
        warnings.append("val_data is set but eval_every is 0, so it is never evaluated; pass --eval-every N")
    if config.warmup_steps >= config.max_steps:
        warnings.append(f"warmup_steps {config.warmup_steps} >= max_steps {config.max_steps}: the learning rate "
                        f"never reaches lr {config.lr}")
    return warnings


def clear_out_dir(config: TrainConfig, info: DistInfo) -> None:
    """A new run (--overwrite, or no checkpoint yet: a run killed before its first one) removes the old run's
    checkpoints and logs, so that its lines never mix with this run's (only once everything else was checked)."""
    barrier(info)  # every rank has looked for checkpoints before rank 0 deletes them
    if info.is_main:
        if not config.resume:
            shutil.rmtree(os.path.join(config.out_dir, "checkpoints"), ignore_errors=True)
            shutil.rmtree(os.path.join(config.out_dir, "tensorboard"), ignore_errors=True)
            for name in ("metrics.jsonl", "loss.png"):
                if os.path.exists(os.path.join(config.out_dir, name)):
                    os.remove(os.path.join(config.out_dir, name))
        os.makedirs(config.out_dir, exist_ok=True)
    barrier(info)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(config: TrainConfig, device: torch.device):
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP and FSDP2)."""
    if hasattr(model, "no_sync") and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def lm_loss(model: nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The model's loss (next-token CE within documents + its auxiliary loss) on one packed micro-batch."""
    return model(input_ids=input_ids, cu_seqlens=cu_seqlens, labels=input_ids, use_cache=False).loss


@torch.no_grad()
def validation_loss(model, source: BatchSource, config: TrainConfig, info: DistInfo, autocast) -> float:
    """Mean loss over the first `eval_batches` micro-batches of the validation data (split over ranks)."""
    model.eval()
    per_rank = math.ceil(config.eval_batches / info.world_size)
    losses = []
    for i in range(per_rank):
        input_ids, cu = source.micro_batch(0, i, info.rank, info.world_size)
        with autocast:
            losses.append(float(lm_loss(model, input_ids.to(info.device), cu.to(info.device))))
    model.train()
    return mean_across_ranks(sum(losses) / len(losses), info)


def save_checkpoint(ckpts: CheckpointDir, model, optimizer, scheduler, state: dict, info: DistInfo) -> None:
    """Gather full state dicts (collective) and let rank 0 write them atomically."""
    model_state = full_model_state(model)
    optim_state = full_optimizer_state(model, optimizer)
    if info.is_main:
        ckpts.save(dict(state, model=model_state, optimizer=optim_state, scheduler=scheduler.state_dict(),
                        rng=rng_state()), state["step"])
    barrier(info)


def save_hf_folder(model: nn.Module, raw_model: nn.Module, tokenizer, path: str, info: DistInfo) -> None:
    """model.save_pretrained + tokenizer into `path`, replacing it atomically (rank 0 writes)."""
    state = full_model_state(model)
    if info.is_main and hasattr(raw_model, "save_pretrained"):
        def fill(folder: str) -> None:
            raw_model.save_pretrained(folder, state_dict=state)
            tokenizer.save_pretrained(folder)

        with quiet_transformers_bars():
            atomic_replace_dir(path, fill)
    barrier(info)


def train(config: TrainConfig, step_callback: Callable[[int, float], None] | None = None) -> dict:
    """Run (or resume) a training run; joins/leaves the process group under torchrun.

    step_callback(step, loss) is called after every optimiser step (tests use it to interrupt a run).
    Returns {"step", "loss", "out_dir", "tokens"} (loss of the last step, mean over ranks); resuming a run that
    already reached max_steps changes nothing and returns {"step", "loss": None, "out_dir", "tokens",
    "already_finished": True}.
    """
    owns_process_group = not torch.distributed.is_initialized()  # a caller's group is left for the caller to end
    info = init_distributed(config.device)
    try:
        check_run_settings(config)
        with _out_dir_lock(config.out_dir, info):
            return _train(config, info, step_callback)
    finally:
        if owns_process_group:
            shutdown_distributed()


@contextlib.contextmanager
def _out_dir_lock(out_dir: str, info: DistInfo):
    """Rank 0 holds out_dir's lock for the run (a second `memmix train` into it is refused, naming the holder);
    a folder made only for the lock is removed again when the run fails before writing anything."""
    if not info.is_main:
        yield
        return
    existed = os.path.isdir(out_dir)
    try:
        with exclusive_lock(out_dir, "out_dir", is_dir=True):
            yield
    except BaseException:
        if not existed and os.path.isdir(out_dir) and set(os.listdir(out_dir)) <= {".memmix.lock"}:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _train(config: TrainConfig, info: DistInfo, step_callback) -> dict:
    """train() inside the process group and out_dir's lock: what to resume, the set-up, the loop, the end."""
    resume_path = find_resume_checkpoint(config)
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.tokenizer)
    spec = model_spec(config, resolve_vocab_size(config, tokenizer), tokenizer)

    # the run to continue, checked before the data is read
    checkpoint = None
    if resume_path:
        checkpoint = load_checkpoint(resume_path, argument="resume", needs=RESUME_KEYS)
        check_same_spec(checkpoint["model_spec"], spec, resume_path)
        if checkpoint["step"] >= config.max_steps:
            return {"step": checkpoint["step"], "loss": None, "out_dir": config.out_dir,
                    "tokens": checkpoint["tokens_seen"], "already_finished": True}

    run = _set_up(config, info, tokenizer, spec, resume_path, checkpoint)
    del checkpoint  # restored into the model and optimiser: not kept through training
    step, tokens_seen, loss_value = _train_loop(run, step_callback)
    return _finish(run, step, tokens_seen, loss_value)


@dataclass
class _Run:
    """What the set-up builds for the loop: the model and its training state, data, outputs, and where it starts."""

    config: TrainConfig
    info: DistInfo
    spec: dict
    data_fingerprint: str
    tokenizer: Any
    raw_model: nn.Module
    model: nn.Module  # raw_model wrapped for DDP/FSDP, or itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_step: TrainStep
    autocast: Any
    source: BatchSource
    val_source: BatchSource | None
    ckpts: CheckpointDir
    log: MetricsLog | None  # rank 0 only
    step: int  # the position it starts from: 0, or the resumed checkpoint's
    rows_consumed: int
    tokens_seen: int


def _set_up(config: TrainConfig, info: DistInfo, tokenizer, spec: dict, resume_path: str | None,
            checkpoint: dict | None) -> _Run:
    """Data, model, optimiser, schedule and outputs of the run, restored from `checkpoint` when resuming; a new run
    clears out_dir only here, once every check passed."""
    changed = {}
    if checkpoint is not None:
        changed = changed_settings(checkpoint.get("train_config", {}), config, resume_path)
    corpus, source, val_source = _data_sources(config, tokenizer, info)
    data_fingerprint = corpus.fingerprint()
    if checkpoint is not None:
        saved = checkpoint.get("data_fingerprint")
        if saved is not None and saved != data_fingerprint and "data" not in changed:
            changed["data_content"] = [saved, data_fingerprint]

    # model, optimiser, schedule
    raw_model = build_model(config.model, spec["vocab_size"], config.model_overrides, tokenizer.eos_token_id)
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(raw_model, config)
    if info.is_main:
        for warning in run_warnings(config, changed, checkpoint["step"] if checkpoint is not None else 0):
            print(f"memmix train: warning: {warning}", file=sys.stderr)
    if config.cuda_graph and (info.device.type != "cuda" or info.enabled):
        raise InputError(f"needs one CUDA device and no DDP/FSDP, got {info.device.type}"
                         + (f" with {info.world_size} processes" if info.enabled else ""), "cuda_graph")
    clear_out_dir(config, info)  # every check passed: only now may an old run be replaced
    raw_model.to(info.device)
    raw_model.fused_loss = config.fused_loss == "on" or (config.fused_loss == "auto" and info.device.type == "cuda")
    parallel = config.parallel if config.parallel != "auto" else ("ddp" if info.enabled else "none")
    model = wrap_model(raw_model, parallel, info)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2))
    scheduler = cosine_schedule(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)

    step, rows_consumed, tokens_seen = 0, 0, 0
    if checkpoint is not None:
        step, rows_consumed, tokens_seen = _restore(checkpoint, model, optimizer, scheduler, config)

    ckpts = CheckpointDir(config.out_dir, config.keep_checkpoints)
    log = MetricsLog(config.out_dir, config.tensorboard, resume_step=step if resume_path else None) if info.is_main else None
    if info.is_main:
        _announce_start(log, config, info, raw_model, corpus, source, step, resume_path, changed, parallel)
    autocast = autocast_context(config, info.device)
    train_step = TrainStep(model, optimizer, scheduler, lambda m, batch: lm_loss(m, *batch), grad_clip=config.grad_clip,
                           autocast=autocast, cuda_graph=config.cuda_graph,
                           micro_context=None if config.cuda_graph else lambda i, n: grad_sync(model, i == n - 1))
    return _Run(config=config, info=info, spec=spec, data_fingerprint=data_fingerprint, tokenizer=tokenizer,
                raw_model=raw_model, model=model, optimizer=optimizer, scheduler=scheduler, train_step=train_step,
                autocast=autocast, source=source, val_source=val_source, ckpts=ckpts, log=log, step=step,
                rows_consumed=rows_consumed, tokens_seen=tokens_seen)


def _train_loop(run: _Run, step_callback) -> tuple[int, int, float]:
    """Train from run.step to max_steps: log, validate and save on their steps; returns (step, tokens_seen, the loss
    last read back)."""
    config, info, scheduler, log = run.config, run.info, run.scheduler, run.log
    step, rows_consumed, tokens_seen = run.step, run.rows_consumed, run.tokens_seen
    rows_per_step = info.world_size * config.grad_accum * config.micro_batch_size
    bar = progress_bar(config.max_steps, "train", "step", config.progress and info.is_main, initial=step)
    run.model.train()
    loss_value, window_tokens, window_start = float("nan"), 0, time.perf_counter()

    while step < config.max_steps:
        micro_batches = _step_batches(run.source, config, info, rows_consumed)
        logged = (step + 1) % config.log_every == 0 or step + 1 == config.max_steps
        lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)  # this step's rate, on the host
        try:
            result = run.train_step(micro_batches)
        except GraphCaptureError as err:
            raise InputError(str(err), "cuda_graph") from None
        step += 1
        rows_consumed += rows_per_step
        tokens_seen += rows_per_step * config.seq_len
        window_tokens += rows_per_step * config.seq_len

        saving = step % config.save_every == 0 or step == config.max_steps
        if logged or saving or step_callback is not None:  # the only reads of the loss back to the host
            loss_value = mean_across_ranks(result.loss.item(), info)
            if not math.isfinite(loss_value):
                raise InputError(f"the loss became {loss_value} at step {step} (lr {config.lr}, weight_decay "
                                 f"{config.weight_decay}, grad_clip {config.grad_clip}): the run diverged; lower the "
                                 f"learning rate or check the data ({_kept_checkpoint(run.ckpts)})")
        if info.is_main:
            if logged:
                tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                _log_train_step(log, bar, step, loss_value, lr, result.grad_norm, tokens_seen, tok_s)
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(1)
        if run.val_source is not None and step % config.eval_every == 0:
            _validate(run.model, run.val_source, config, info, run.autocast, log, bar, step)
        if saving:
            state = {"step": step, "rows_consumed": rows_consumed, "tokens_seen": tokens_seen, "model_spec": run.spec,
                     "train_config": config.to_dict(), "data_fingerprint": run.data_fingerprint}
            _save(run, state)
        if step_callback is not None:
            step_callback(step, loss_value)

    bar.close()
    return step, tokens_seen, loss_value


def _save(run: _Run, state: dict) -> None:
    """The checkpoint of state["step"]; a failed write (disk full) names the checkpoint that is kept."""
    try:
        save_checkpoint(run.ckpts, run.model, run.optimizer, run.scheduler, state, run.info)
    except OSError as err:  # disk full: the files are atomic, so the last checkpoint is intact
        raise InputError(f"could not write the checkpoint of step {state['step']} ({err.strerror or err}); "
                         f"{_kept_checkpoint(run.ckpts)}", "out_dir") from None


def _kept_checkpoint(ckpts: CheckpointDir) -> str:
    latest = ckpts.latest()
    return f"the last checkpoint, {latest}, is kept" if latest else "no checkpoint was written"


def _finish(run: _Run, step: int, tokens_seen: int, loss_value: float) -> dict:
    """The final Hugging Face folder, the "end" record and the loss plot; train()'s result."""
    config = run.config
    if config.save_hf:
        save_hf_folder(run.model, run.raw_model, run.tokenizer, os.path.join(config.out_dir, "final"), run.info)
    if run.info.is_main:
        run.log.log({"kind": "end", "step": step, "loss": loss_value if math.isfinite(loss_value) else None,
                     "tokens": tokens_seen})
        run.log.close()
        if config.plot:
            write_loss_plot(config.out_dir)
    return {"step": step, "loss": loss_value, "out_dir": config.out_dir, "tokens": tokens_seen}


def _data_sources(config: TrainConfig, tokenizer, info: DistInfo):
    """The training corpus, its BatchSource, and the validation BatchSource (None without val_data / eval_every);
    InputError for a micro-batch or eval_batches the data cannot fill."""
    corpus = load_corpus(config.data, tokenizer, config.tokenizer, TextSource.of(config), config.verify_shards)
    source = BatchSource(PackedRows(corpus, config.seq_len), config.micro_batch_size, config.seed, config.shuffle)
    check_micro_batch(config, source.rows.num_rows, info.world_size)
    val_source = None
    if config.val_data and config.eval_every:
        val_corpus = load_corpus(config.val_data, tokenizer, config.tokenizer, TextSource.of(config),
                                 config.verify_shards)
        val_source = BatchSource(PackedRows(val_corpus, config.seq_len), config.micro_batch_size, shuffle=False)
        check_eval_batches(config, val_source.rows.num_rows, info.world_size)
    return corpus, source, val_source


def _enable_gradient_checkpointing(raw_model: nn.Module, config: TrainConfig) -> None:
    # newer transformers name it activation_checkpointing_enable (the old name warns that it is deprecated)
    enable = (getattr(raw_model, "activation_checkpointing_enable", None)
              or getattr(raw_model, "gradient_checkpointing_enable", None))
    if enable is None:
        raise InputError(f"model '{config.model}' does not support it", "gradient_checkpointing")
    enable()


def _restore(checkpoint: dict, model, optimizer, scheduler, config: TrainConfig) -> tuple[int, int, int]:
    """Load a checkpoint's training state, keeping this command's optimiser settings and learning rate; returns
    (step, rows_consumed, tokens_seen)."""
    # --weight-decay, --beta1/2 of this command, and how this run steps (fused, capturable), not the checkpoint's
    hyper = [{k: v for k, v in g.items() if k in ("weight_decay", "betas", "fused", "capturable")}
             for g in optimizer.param_groups]
    load_training_state(model, optimizer, checkpoint)
    scheduler.load_state_dict(checkpoint["scheduler"])
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)  # the checkpoint's would win silently
    for group, settings, base_lr in zip(optimizer.param_groups, hyper, scheduler.base_lrs):
        group.update(settings)
        group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # --max-steps may have changed
    set_rng_state(checkpoint["rng"])
    return checkpoint["step"], checkpoint["rows_consumed"], checkpoint["tokens_seen"]


def _announce_start(log, config: TrainConfig, info: DistInfo, raw_model, corpus, source, step: int, resume_path,
                    changed: dict, parallel: str) -> None:
    """The run's config file, its "start" record, and (with progress) one line on stderr."""
    atomic_write_text(os.path.join(config.out_dir, "train_config.json"), json.dumps(config.to_dict(), indent=2))
    n_params = sum(p.numel() for p in raw_model.parameters())
    log.log({"kind": "start", "step": step, "params": n_params, "world_size": info.world_size,
             "parallel": parallel, "train_tokens": corpus.num_tokens, "resumed_from": resume_path,
             **({"changed_settings": changed} if changed else {})})
    if config.progress:
        rows = info.world_size * config.grad_accum * config.micro_batch_size
        print(f"memmix train: {config.model} ({n_params / 1e6:.1f}M parameters) on {info.world_size} x "
              f"{info.device.type} ({parallel}); {corpus.num_tokens:,} tokens in {source.rows.num_rows:,} rows "
              f"of {config.seq_len}; {rows * config.seq_len:,} tokens per step"
              + (f"; resuming at step {step}" if resume_path else ""), file=sys.stderr)


def _step_batches(source: BatchSource, config: TrainConfig, info: DistInfo, rows_consumed: int) -> list[tuple]:
    """One optimiser step's grad_accum micro-batches on the device, each (input_ids (1, B*L), cu_seqlens (N+1,))."""
    micro_batches = [source.micro_batch(rows_consumed, micro, info.rank, info.world_size)
                     for micro in range(config.grad_accum)]
    if config.cuda_graph:  # one number of bounds for every micro-batch of the step: few shapes, few graphs
        length = max(cu.numel() for _, cu in micro_batches)
        micro_batches = [(ids, pad_bounds(cu, length)) for ids, cu in micro_batches]
    return [tuple(t.to(info.device, non_blocking=True) for t in batch) for batch in micro_batches]


def _log_train_step(log, bar, step: int, loss_value: float, lr: float, grad_norm, tokens_seen: int,
                    tok_s: float) -> None:
    record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr,
              "grad_norm": float(grad_norm), "tokens": tokens_seen, "tokens_per_s": tok_s}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log.log(record)
    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)


def _validate(model, val_source: BatchSource, config: TrainConfig, info: DistInfo, autocast, log, bar,
              step: int) -> None:
    val = validation_loss(model, val_source, config, info, autocast)
    if info.is_main:
        ppl = math.exp(min(val, 50.0))
        log.log({"kind": "val", "step": step, "loss": val, "ppl": ppl})
        bar.write(f"step {step}: validation loss {val:.4f}, perplexity {ppl:.2f}", file=sys.stderr)
