"""Training throughput of the language-model presets at the LM-training shape (PLANS): tokens/s, peak memory, model FLOP
utilisation and a per-phase breakdown, for the step `memmix train` runs today and for faster variants of it.

    python benchmarks/train_speed.py --out $OUT --time-budget 480            # the whole plan (PLANS["all"]), CUDA
    python benchmarks/train_speed.py --plan core --profile --out $OUT       # the first half of it, with profiles
    python benchmarks/train_speed.py --presets attention-340m --variants base+attn-mask,base
    python benchmarks/train_speed.py --presets tiny,gdn-tiny --device cpu --steps 2            # CPU smoke test

Shape: --micro-batch rows of --seq-len tokens, each row cut into --docs-per-row documents at random points and
the rows packed into one sequence with cu_seqlens exactly as `memmix train` packs them (memmix.data.packing); the
number of documents is fixed so every batch has one shape (CUDA graphs need that). bf16 autocast on CUDA, fp32
parameters, AdamW, gradient clipping at 1.0 and the cosine schedule: memmix.training's TrainStep.

A variant is options joined by '+' ("base" = none): the step `memmix train` runs is "base+read".
  lce        the loss from the final hidden states through memmix.ops.linear_cross_entropy (chunked LM head and
             cross-entropy, logits never whole) plus the model's load-balancing loss; fla models: their own
             fuse_linear_cross_entropy
  fused      torch.optim.AdamW(fused=True) over build_optimizer's groups (default: torch's choice, foreach)
  graph      TrainStep(cuda_graph=True): the whole step captured once, replayed (CUDA, memmix models)
  compile    torch.compile of every block (nn.Module.compile); compile-mlp: of each block's MLP and norms only
  ckpt       gradient checkpointing of every block; lowmem: the MoM layers' low_memory=True
  attn-mask / attn-flex / attn-varlen   the attention layers' packed_impl (memmix.layers.attention); default auto
  read       read the loss and gradient norm back every step, as memmix train's loop does (one host sync a step)
Rows: presets of memmix.models.presets, plus fla-gdn-<size> / fla-mom-<size>: flash-linear-attention's
GatedDeltaNetForCausalLM / MomForCausalLM at the same shape (when fla is importable; its gated backward guard on
Triton < 3.7.1 is lifted for TIMING only, as benchmarks/layer_speed.py does).

Columns: tokens/s = tokens per step / median step time over --windows windows of --steps steps (wall time between
device synchronisations) after --warmup steps; peak = torch.cuda.max_memory_allocated over the row (parameters,
optimiser state and activations); MFU = 6 x parameters x tokens/s over the bf16 peak (measured at the start with an
8192^3 bf16 matrix product on random data, or --peak-tflops; attention's own FLOPs are not counted); phases =
forward (with the loss), backward, optimizer (clip, step, schedule, zero_grad) from CUDA events around one eager
step; syncs = host synchronisations of one eager step (torch.cuda.set_sync_debug_mode). --profile adds, for every
row, the top kernels by CUDA time and CPU vs CUDA time of one step to train_speed_profile.txt beside the JSON.
The JSON is rewritten after every row, so a killed run keeps its rows; --out copies both files there.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import atomic_write_json  # noqa: E402
from memmix.data.packing import pack_rows  # noqa: E402
from memmix.files import atomic_write_text  # noqa: E402
from memmix.labels import IGNORE_INDEX  # noqa: E402
from memmix.layers.attention import CausalSelfAttention  # noqa: E402
from memmix.ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from memmix.training.optim import build_optimizer, cosine_schedule, split_decay_groups  # noqa: E402
from memmix.models.presets import MOM_PRESETS as PRESETS, build_model  # noqa: E402
from memmix.training.step import TrainStep, clip_grad_norm  # noqa: E402

OPTIONS = ("lce", "fused", "graph", "compile", "compile-mlp", "ckpt", "lowmem", "attn-mask", "attn-flex",
           "attn-varlen", "read")
ATTENTION_IMPLS = {"attn-mask": "mask", "attn-flex": "flex", "attn-varlen": "varlen"}

# The plan, most important rows first (a --time-budget cuts the tail). "core" answers: the attention
# baseline before/after its packed kernel, each preset today and with the cheap fixes, the graphed step, fla.
CORE = [
    ("attention-340m", "base+attn-mask"),  # the dense T x T mask path
    ("attention-340m", "base+attn-flex"),  # the packed kernel that auto is to become (auto = mask today)
    ("gdn-340m", "base"),
    ("mom-340m", "base"),
    ("fla-gdn-340m", "base"),
    ("fla-mom-340m", "base"),
    ("mom-340m", "lce+fused"),
    ("gdn-340m", "lce+fused"),
    ("attention-340m", "lce+fused"),
    ("mom-340m", "lce+fused+graph"),
    ("gdn-340m", "lce+fused+graph"),
    ("attention-340m", "lce+fused+graph"),
    ("attention-340m", "base+attn-varlen"),
    ("mom-340m", "base+read"),  # memmix train's loop exactly
    ("mom-340m", "lce"),
    ("mom-340m", "fused"),
    ("fla-gdn-340m", "lce+fused"),
]
EXTRA = [
    ("mom-340m", "lce+fused+graph"),  # again, in another process: the spread between runs
    ("gdn-340m", "lce+fused+graph"),
    ("mom-1.3b", "lce+fused"),
    ("mom-1.3b", "lce+fused+lowmem"),
    ("mom-1.3b", "lce+fused+ckpt"),
    ("gdn-340m", "lce+fused+compile"),
    ("mom-340m", "lce+fused+compile"),
    ("attention-340m", "lce+fused+compile"),
    ("mom-340m", "lce+fused+compile-mlp"),
    ("gdn-1.3b", "lce+fused"),
]
PLANS = {"all": CORE + EXTRA, "core": CORE, "extra": EXTRA}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--plan", default="all", choices=sorted(PLANS), help="rows to run when --presets is not given")
    p.add_argument("--presets", default=None, help="comma-separated presets: a grid with --variants instead of --plan")
    p.add_argument("--variants", default="base,lce,lce+fused,lce+fused+graph,lce+fused+compile",
                   help="comma-separated variants for --presets (options joined by '+'; 'base' = none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; 128 on the CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per micro-batch (default 8; 2 on the CPU)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="model vocabulary (default 32000, the MoM paper's tokenizer; 320 on the CPU; memmix train's "
                        "byte tokenizer gives 320)")
    p.add_argument("--docs-per-row", type=int, default=3, help="documents each row is cut into")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere (as memmix train)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (graph rows add the capture's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: measured on CUDA)")
    p.add_argument("--profile", action="store_true", help="torch.profiler summary of one step of every row")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later rows are skipped past it")
    p.add_argument("--json", default="benchmarks/results/train_speed.json")
    p.add_argument("--out", default=None, help="also write the JSON (and profile) into this folder after every row")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    on_cpu = args.device == "cpu"
    args.seq_len = args.seq_len or (128 if on_cpu else 2048)
    args.micro_batch = args.micro_batch or (2 if on_cpu else 8)
    args.vocab_size = args.vocab_size or (320 if on_cpu else 32000)
    if args.docs_per_row < 1 or args.docs_per_row > args.seq_len:
        p.error(f"--docs-per-row must be in [1, --seq-len={args.seq_len}], got {args.docs_per_row}")
    return args


def plan_rows(args) -> list[tuple[str, str]]:
    if args.presets is None:
        return list(PLANS[args.plan])
    presets = [x.strip() for x in args.presets.split(",") if x.strip()]
    variants = [x.strip() for x in args.variants.split(",") if x.strip()]
    return [(preset, variant) for preset in presets for variant in variants]


def variant_options(variant: str) -> set[str]:
    options = set() if variant == "base" else set(variant.split("+")) - {"base"}
    unknown = options - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown variant option(s) {sorted(unknown)} in '{variant}'; choose from {OPTIONS}")
    if len(options & set(ATTENTION_IMPLS)) > 1:
        raise ValueError(f"variant '{variant}' names more than one attention kernel")
    return options


# ---------------------------------------------------------------------------------------------------- data


def make_batches(args, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` packed micro-batches: (input_ids (1, B*L) int64, cu_seqlens (B*docs_per_row + 1,) int64)."""
    rng = np.random.default_rng(args.seed)
    batches = []
    for _ in range(count):
        rows = []
        for _ in range(args.micro_batch):
            tokens = rng.integers(0, args.vocab_size, args.seq_len, dtype=np.int64)
            starts = np.sort(rng.choice(np.arange(1, args.seq_len), args.docs_per_row - 1, replace=False))
            rows.append((tokens, starts.astype(np.int64)))
        input_ids, cu_seqlens = pack_rows(rows)
        batches.append((input_ids.to(device), cu_seqlens.to(device)))
    return batches


# --------------------------------------------------------------------------------------------------- models


def fla_model(preset: str, vocab_size: int, options: set[str]):
    """flash-linear-attention's GDN / MoM causal LM at a memmix preset's shape (raises ImportError without fla)."""
    kind, size = preset.split("-", 2)[1], preset.split("-", 2)[2]
    shape = PRESETS[f"mom-{size}"]
    from memmix.models import MoMConfig

    intermediate = MoMConfig(**dict(shape, vocab_size=vocab_size)).intermediate_size
    common = dict(hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
                  num_heads=shape["num_heads"], head_dim=shape["head_dim"], expand_v=1.0,
                  intermediate_size=intermediate, vocab_size=vocab_size, use_cache=False)
    if kind == "gdn":
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

        config = GatedDeltaNetConfig(**common)
        model_cls = GatedDeltaNetForCausalLM
    elif kind == "mom":
        from fla.models import MomConfig, MomForCausalLM

        config = MomConfig(num_memories=4, topk=2, shared_mem=True, **common)
        model_cls = MomForCausalLM
    else:
        raise ValueError(f"unknown fla preset '{preset}' (fla-gdn-<size> or fla-mom-<size>)")
    config.fuse_linear_cross_entropy = "lce" in options  # fla's own fused head + loss
    _lift_fla_hopper_guard()
    return model_cls(config)


def _lift_fla_hopper_guard() -> list[str]:
    from layer_speed import _allow_fla_backward_on_old_triton

    notes: list[str] = []
    _allow_fla_backward_on_old_triton(notes)
    return notes


def build(preset: str, options: set[str], args, device: torch.device):
    """The model on `device` (built there: no CPU initialisation of a billion weights), in training mode."""
    if preset.startswith("fla-"):
        with torch.device(device):
            model = fla_model(preset, args.vocab_size, options)
    else:
        overrides = {"low_memory": True} if "lowmem" in options else None
        with torch.device(device):
            model = build_model(preset, args.vocab_size, overrides, eos_token_id=0)
    model.to(device)
    if "ckpt" in options:
        enable = (getattr(model, "activation_checkpointing_enable", None)
                  or getattr(model, "gradient_checkpointing_enable"))
        enable()
    for impl_option, impl in ATTENTION_IMPLS.items():
        if impl_option in options:
            layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
            if not layers:
                raise ValueError(f"{preset} has no attention layer for '{impl_option}'")
            for layer in layers:
                layer.packed_impl = impl
    if "compile" in options:
        for block in model.model.layers:
            block.compile()
    if "compile-mlp" in options:
        for block in model.model.layers:
            for part in (block.mlp, block.attn_norm, block.mlp_norm):
                part.compile()
    return model.train()


def make_optimizer(model, options: set[str]):
    if "fused" not in options:
        return build_optimizer(model, lr=3e-4, weight_decay=0.1)
    decay, no_decay = split_decay_groups(model)
    groups = [g for g in ({"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)


def model_loss(model, batch):
    """The model's own loss, as memmix train computes it (memmix.training.trainer.lm_loss)."""
    input_ids, cu_seqlens = batch
    return model(input_ids=input_ids, cu_seqlens=cu_seqlens, labels=input_ids, use_cache=False).loss


def chunked_head_loss(model, batch):
    """The same loss with the LM head and cross-entropy through memmix.ops.linear_cross_entropy: next-token CE
    within documents (the last token of a document predicts nothing), plus aux_loss_scale x the model's
    load-balancing loss (and router_z_loss x its router z-loss) in training. Equal to model_loss
    (tests/test_train_speed.py)."""
    input_ids, cu_seqlens = batch
    config = model.config
    if getattr(config, "ffn_experts", None) is not None:
        raise ValueError("chunked_head_loss does not cover expert MLPs (ffn_experts)")
    outputs = model.model(input_ids=input_ids, cu_seqlens=cu_seqlens, use_cache=False, output_router_logits=True,
                          return_dict=True)
    hidden = outputs.last_hidden_state[0, :-1]  # (T-1, D): position t predicts token t+1
    targets = input_ids[0, 1:].clone()
    targets[cu_seqlens[1:-1] - 1] = IGNORE_INDEX  # never across a document boundary
    weight = model.lm_head.weight
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else (
        hidden.dtype)
    loss = linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets)
    if model.training and outputs.router_logits is not None:
        aux_loss, z_loss, _ = model._aux_losses(outputs, None, None)  # the model's own routing losses
        if config.aux_loss_scale > 0:
            loss = loss + config.aux_loss_scale * aux_loss.to(loss.dtype)
        if z_loss is not None:
            loss = loss + config.router_z_loss * z_loss.to(loss.dtype)
    return loss


def fla_loss(model, batch):
    input_ids, cu_seqlens = batch
    return model(input_ids=input_ids, labels=input_ids, cu_seqlens=cu_seqlens, use_cache=False).loss


def loss_function(preset: str, options: set[str]):
    if preset.startswith("fla-"):
        return fla_loss
    return chunked_head_loss if "lce" in options else model_loss


def skip_reason(preset: str, options: set[str], device: torch.device) -> str | None:
    fla = preset.startswith("fla-")
    if fla and device.type != "cuda":
        return "fla rows run on CUDA only"
    if fla and options & {"graph", "compile", "compile-mlp", "ckpt", "lowmem", *ATTENTION_IMPLS}:
        return "fla rows take lce, fused and read only (fla's MoM reads values back to the host: no graph)"
    if device.type != "cuda" and options & {"graph", "compile", "compile-mlp", "attn-varlen", "attn-flex"}:
        return "needs CUDA (graph capture, Triton compilation, flash / flex kernels)"
    if not fla and preset not in PRESETS:
        return f"unknown preset '{preset}' (memmix.training.presets.PRESETS or fla-gdn-/fla-mom-<size>)"
    if not fla and options & set(ATTENTION_IMPLS) and not PRESETS[preset].get("attn_layers"):
        return "the model has no attention layer"
    return None


# --------------------------------------------------------------------------------------------------- timing


class Clock:
    """Device-synchronised wall time, and per-phase marks (CUDA events on CUDA, perf_counter elsewhere)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def eager_step_phases(model, optimizer, scheduler, loss_fn, batch, autocast, clock: Clock) -> dict:
    """One eager step (TrainStep's work for one micro-batch) with marks between its phases; milliseconds."""
    marks = [clock.mark()]
    with autocast:
        loss = loss_fn(model, batch)
    marks.append(clock.mark())
    loss.backward()
    marks.append(clock.mark())
    clip_grad_norm(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    marks.append(clock.mark())
    clock.sync()
    names = ("forward", "backward", "optimizer")
    return {name: clock.elapsed_ms(a, b) for name, a, b in zip(names, marks[:-1], marks[1:])}


def count_host_syncs(fn) -> dict:
    """Host synchronisations of fn() on CUDA (torch.cuda.set_sync_debug_mode('warn')): count and where."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    places = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    return {"count": len(syncs), "places": places[:10]}


def profile_step(step_fn, clock: Clock, cuda: bool) -> str:
    """Top kernels by device time and CPU vs device time of one step, as a text table."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    clock.sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step_fn()
        clock.sync()
        wall_ms = (time.perf_counter() - start) * 1e3
    averages = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]  # kernels, copies, memsets
    device_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    cpu_ms = sum(e.self_cpu_time_total for e in averages) / 1e3
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    head = (f"one step: wall {wall_ms:.1f} ms (profiler on), device kernels {device_ms:.1f} ms "
            f"({100 * device_ms / max(wall_ms, 1e-9):.0f}% of wall: below 100% the GPU waits on the host), "
            f"CPU time in ops {cpu_ms:.1f} ms")
    return head + "\n" + averages.table(sort_by=sort_by, row_limit=30, max_name_column_width=70)


def measure_peak_tflops(args, device: torch.device) -> dict:
    if args.peak_tflops is not None:
        return {"tflops": args.peak_tflops, "source": "stated (--peak-tflops)"}
    if device.type != "cuda":
        return {"tflops": None, "source": "no bf16 peak on the CPU: MFU not reported"}
    from triton.testing import do_bench

    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return {"tflops": 2 * n**3 / ms / 1e9, "source": f"measured: {n}^3 bf16 matmul on random data, median"}


# ------------------------------------------------------------------------------------------------- one row


def run_row(preset: str, variant: str, args, device: torch.device, peak: dict, profiles: list[str]) -> dict:
    row = {"preset": preset, "variant": variant}
    options = variant_options(variant)
    reason = skip_reason(preset, options, device)
    if reason:
        return dict(row, status="skipped", reason=reason)
    clock, cuda = Clock(device), device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    started = time.perf_counter()
    model = build(preset, options, args, device)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    optimizer = make_optimizer(model, options)
    scheduler = cosine_schedule(optimizer, warmup_steps=10, total_steps=10_000)
    loss_fn = loss_function(preset, options)
    graph = "graph" in options
    step = TrainStep(model, optimizer, scheduler, loss_fn, grad_clip=1.0, autocast=autocast, cuda_graph=graph)
    batches = make_batches(args, 4, device)
    tokens = args.micro_batch * args.seq_len
    read = "read" in options
    cursor = 0

    def one_step():
        nonlocal cursor
        out = step([batches[cursor % len(batches)]])
        cursor += 1
        if read:  # memmix train: float(grad_norm), loss.item()
            float(out.grad_norm), float(out.loss)
        return out

    warmup = args.warmup + (step.warmup_steps + 1 if graph else 0)  # graph: eager steps, then the capture
    for _ in range(warmup):
        out = one_step()
    clock.sync()
    row["warmup_s"] = time.perf_counter() - started
    step_ms = []
    for _ in range(args.windows):
        clock.sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            out = one_step()
        clock.sync()
        step_ms.append((time.perf_counter() - start) * 1e3 / args.steps)
    loss = float(out.loss)
    median_ms = statistics.median(step_ms)
    tok_s = tokens / (median_ms / 1e3)
    row.update(status="ok", params=params, params_non_embedding=params - embedding, tokens_per_step=tokens,
               step_ms=median_ms, window_step_ms=step_ms, tokens_per_s=tok_s, last_loss=loss)
    if peak.get("tflops"):
        row["mfu"] = 6 * params * tok_s / (peak["tflops"] * 1e12)
    if cuda:
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    batch = batches[0]
    row["phases_ms"] = eager_step_phases(model, optimizer, scheduler, loss_fn, batch, autocast, clock)
    if graph:
        row["phases_note"] = "phases from one eager step of the same model and optimiser (a graph is one launch)"
    if cuda:
        row["host_syncs"] = count_host_syncs(
            lambda: eager_step_phases(model, optimizer, scheduler, loss_fn, batch, autocast, clock))
    if args.profile:
        text = profile_step(one_step, clock, cuda)
        profiles.append(f"== {preset} {variant}: {tok_s:,.0f} tokens/s, step {median_ms:.1f} ms\n{text}\n")
    if not math.isfinite(loss):
        row["note"] = f"loss is {loss}"
    return row


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------- output


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        import triton

        env["triton"] = triton.__version__
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "importable")
    except ImportError as err:
        env["fla"] = f"not importable ({err})"
    return env


def format_row(row: dict) -> str:
    name = f"{row['preset']:<16} {row['variant']:<26}"
    if row["status"] != "ok":
        return f"{name} {row['status']}: {row.get('reason', '')}"[:200]
    mfu = f"{100 * row['mfu']:5.1f}%" if "mfu" in row else "   - "
    mem = f"{row['peak_memory_gib']:6.1f}" if "peak_memory_gib" in row else "     -"
    phases = "/".join(f"{row['phases_ms'][k]:.0f}" for k in ("forward", "backward", "optimizer"))
    syncs = row.get("host_syncs", {}).get("count", "-")
    return f"{name} {row['tokens_per_s']:>10,.0f} {mem} {mfu} {row['step_ms']:8.1f} {phases:>16} {syncs:>5}"


HEADER = (f"{'preset':<16} {'variant':<26} {'tokens/s':>10} {'GiB':>6} {'MFU':>6} {'step ms':>8} "
          f"{'fwd/bwd/opt ms':>16} {'syncs':>5}")


def write_outputs(args, payload: dict, profiles: list[str]) -> None:
    folders = [os.path.dirname(os.path.abspath(args.json))] + ([args.out] if args.out else [])
    for folder in folders:
        json_path = args.json if folder == folders[0] else os.path.join(folder, os.path.basename(args.json))
        atomic_write_json(json_path, payload)
        if profiles:
            atomic_write_text(os.path.join(folder, "train_speed_profile.txt"), "\n".join(profiles))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows_to_run = plan_rows(args)
    for _, variant in rows_to_run:
        variant_options(variant)  # fail on a typo before any device time is spent
    torch.manual_seed(args.seed)
    peak = measure_peak_tflops(args, device)
    payload = {"args": vars(args), "environment": environment(device), "peak_bf16": peak, "rows": []}
    profiles: list[str] = []
    started = time.perf_counter()
    print(f"train_speed: {len(rows_to_run)} rows, {args.micro_batch} x {args.seq_len} tokens, vocab "
          f"{args.vocab_size}, {args.docs_per_row} documents a row; bf16 peak {peak['tflops']} TFLOP/s "
          f"({peak['source']})", flush=True)
    print(HEADER, flush=True)
    for preset, variant in rows_to_run:
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            row = {"preset": preset, "variant": variant, "status": "skipped", "reason": "--time-budget spent"}
        else:
            row = _guarded_row(preset, variant, args, device, peak, profiles)
            free_memory(device)
        row["elapsed_s"] = time.perf_counter() - started
        payload["rows"].append(row)
        write_outputs(args, payload, profiles)
        print(format_row(row), flush=True)
    print("\n" + HEADER)
    for row in payload["rows"]:
        print(format_row(row))
    return payload


def _guarded_row(preset, variant, args, device, peak, profiles) -> dict:
    """run_row, with an out-of-memory or any other failure recorded as the row (the run goes on)."""
    failure = None
    try:
        return run_row(preset, variant, args, device, peak, profiles)
    except torch.OutOfMemoryError as err:
        failure = {"status": "oom", "reason": str(err).splitlines()[0][:300]}
    except Exception as err:  # noqa: BLE001 -- a row's failure is a result; the next rows still run
        failure = {"status": "error", "reason": f"{type(err).__name__}: {str(err)[:500]}",
                   "traceback": traceback.format_exc()[-3000:]}
    if device.type == "cuda":
        failure["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return dict({"preset": preset, "variant": variant}, **failure)


if __name__ == "__main__":
    main()
