"""Reference rows on flash-linear-attention's own layers: `fla-gdn` (fla.layers.GatedDeltaNet) and `fla-mom`
(fla.layers.MomAttention), in the same two-layer harness as `gdn` and `mom`.

Each is our MoMForCausalLM built from the same config as its twin (embeddings, norms, MLPs, head, loss, MoM's
load-balancing loss from the router logits), with every memory layer's mixer swapped for an `FlaMixer` around the fla
layer of the same heads, head width, value width, memories, top-k, shared memory, conv size and norm eps. If fla's
layer learns where ours does not at equal settings, ours has a defect; if neither learns, the budget or the protocol
is the reason.

fla runs only on CUDA (its kernels are Triton) and is imported only when a row is built; `fla_unavailable(device)`
says in one line why a row cannot run here (the missing package, or no CUDA device). The swapped layers get the
harness's initialisation (Linear weights ~ N(0, initializer_range), as `MoMPreTrainedModel` gives ours); fla's
A_log, dt_bias and short-convolution filters keep fla's own (the same scheme as ours: A ~ U(0, 16) vs U(1, 16), dt
log-uniform in [1e-3, 0.1]). The rows keep no inference cache (config.use_cache False) and train eagerly (no CUDA
graph: fla-mom's dispatch reads token counts back to the host).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FLA_VERSION = "0.6.0"  # the version the adapters were written against (fla.layers' call and return conventions)


@dataclass
class FlaMixerOutput:
    """What MoMBlock reads from its mixer: hidden_states (B, T, D), state (None: no cache), router_logits (B, T, M)
    float32 or None."""

    hidden_states: torch.Tensor
    state: Any = None
    router_logits: torch.Tensor | None = None


class FlaMixer(nn.Module):
    """Our memory mixer's call around an fla layer.

    In: hidden_states (B, T, D), attention_mask (B, T) 0/1 or None, cu_seqlens (N + 1,) int64 or None (packed, B == 1),
    state / use_cache (must be None / False: these rows keep no cache). Out: FlaMixerOutput. fla's layers return
    (o, attentions, past_key_values[, router_logits (B * T, M)]); the router logits come back as (B, T, M) float32
    for MoMForCausalLM's load-balancing loss."""

    memory_groups = None  # MoMBlock asks: no modality groups

    def __init__(self, layer: nn.Module, num_memories: int | None = None):
        super().__init__()
        self.layer = layer
        self.num_memories = num_memories

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, state=None, use_cache: bool = False) -> FlaMixerOutput:
        if state is not None or use_cache:
            raise ValueError("the fla reference rows keep no inference cache: call with use_cache=False")
        B, T, _ = hidden_states.shape
        extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        with _stable_argsort() if self.num_memories is not None else contextlib.nullcontext():
            out = self.layer(hidden_states, attention_mask=attention_mask, use_cache=False, **extra)
        router_logits = None
        if self.num_memories is not None:
            router_logits = out[3].float().reshape(B, T, self.num_memories)  # (B * T, M) -> (B, T, M)
        return FlaMixerOutput(out[0], None, router_logits)


@contextlib.contextmanager
def _stable_argsort():
    """Within the block Tensor.argsort is stable. fla 0.6.0's MomAttention groups each memory's tokens with
    `(batch * (M + 1) + memory).argsort()`, which keeps them in time order only if the sort is stable; PyTorch does
    not promise that (on the CPU it is not: with our weights copied in, fla's layer differed from our mixer by 0.85
    relative, and by 4e-7 with a stable sort). CUDA's radix sort of the study's sizes is stable already."""
    argsort = torch.Tensor.argsort

    def stable(self, dim=-1, descending=False, stable=True):
        return argsort(self, dim=dim, descending=descending, stable=True)

    torch.Tensor.argsort = stable
    try:
        yield
    finally:
        torch.Tensor.argsort = argsort


# ----------------------------------------------------------------------------------------------- availability


def fla_unavailable(device: str | torch.device | None = None) -> str | None:
    """One line saying why the fla rows cannot run here (a missing package, or a device that is not CUDA), or
    None. Imports fla.layers (once) to find out."""
    missing = _import_problem()
    if missing is not None:
        return missing
    if device is not None and torch.device(device).type != "cuda":
        return f"fla's layers run only on CUDA (Triton kernels), got device {str(device)!r}"
    return None


_IMPORT_PROBLEM: list[str | None] = []  # memo of _import_problem: [] until asked


def _import_problem() -> str | None:
    if not _IMPORT_PROBLEM:
        problem = None
        if importlib.util.find_spec("fla") is None:
            problem = (f"needs the package 'fla' (flash-linear-attention {FLA_VERSION}), which is not installed")
        else:
            try:
                importlib.import_module("fla.layers")
            except ImportError as err:
                problem = (f"needs the package {err.name or 'fla'!r} to import fla.layers (flash-linear-attention "
                           f"{FLA_VERSION}): {err}")
        _IMPORT_PROBLEM.append(problem)
    return _IMPORT_PROBLEM[0]


def fla_installed() -> bool:
    """Whether the package fla is installed (looked up, not imported)."""
    return importlib.util.find_spec("fla") is not None


# ----------------------------------------------------------------------------------------------- the layers


def gated_deltanet_layer(config, layer_idx: int) -> FlaMixer:
    """fla.layers.GatedDeltaNet with MoMConfig ``config``'s heads, head width, value width, output gate, conv size."""
    from fla.layers import GatedDeltaNet

    layer = GatedDeltaNet(hidden_size=config.hidden_size, expand_v=config.expand_v, head_dim=config.head_dim,
                          num_heads=config.num_heads, mode="chunk", use_gate=config.use_output_gate,
                          use_short_conv=True, conv_size=config.conv_size, layer_idx=layer_idx,
                          norm_eps=config.norm_eps)
    return FlaMixer(layer)


def mom_attention_layer(config, layer_idx: int) -> FlaMixer:
    """fla.layers.MomAttention with MoMConfig ``config``'s heads, head width, value width, memories, top-k, shared
    memory, per-memory k/v projections (single_kv_proj), output gate, conv size."""
    from fla.layers import MomAttention

    layer = MomAttention(hidden_size=config.hidden_size, head_dim=config.head_dim, num_heads=config.num_heads,
                         expand_v=config.expand_v, mode="chunk", use_output_gate=config.use_output_gate,
                         use_short_conv=True, conv_size=config.conv_size, layer_idx=layer_idx,
                         norm_eps=config.norm_eps, num_memories=config.num_memories, topk=config.topk,
                         shared_mem=config.shared_mem, single_kv_proj=config.single_kv_proj)
    return FlaMixer(layer, num_memories=config.num_memories)


def swap_mixers(model: nn.Module, make_layer: Callable[[Any, int], FlaMixer]) -> nn.Module:
    """Replace the mixer of every memory (non-attention) block of a MoMForCausalLM by make_layer(config, idx), with
    the harness's Linear initialisation; returns the model, which keeps no cache from then on."""
    config = model.config
    for idx, block in enumerate(model.model.layers):
        if block.is_attention:
            continue
        mixer = make_layer(config, idx)
        _harness_init(mixer, config.initializer_range)
        block.attn = mixer.to(next(block.parameters()).device)
    config.use_cache = False
    return model


def _harness_init(module: nn.Module, std: float) -> None:
    """Linear weights ~ N(0, std) as MoMPreTrainedModel initialises ours (fla's MomAttention would keep its Xavier
    init: it marks its modules initialised); norm weights 1; everything else as fla made it."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                sub.weight.normal_(0.0, std)
                if sub.bias is not None:
                    sub.bias.zero_()
            elif "RMSNorm" in type(sub).__name__ and getattr(sub, "weight", None) is not None:
                sub.weight.fill_(1.0)


FLA_LAYERS = {"gated_delta": gated_deltanet_layer, "mom": mom_attention_layer}
