"""The recall benchmark's model registry: how to build each model at a size and how big its inference state is.

Adding a model is one ``register_model`` call; a MoM variant with config overrides is one ``register_mom_variant``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelSize:
    """The size every model of one comparison shares."""

    vocab_size: int
    d_model: int
    num_layers: int
    head_dim: int


@dataclass(frozen=True)
class StateSize:
    """What a model carries per sequence at inference: ``floats`` if constant, else ``floats_per_token``."""

    floats: int | None
    floats_per_token: int | None
    formula: str

    def describe(self) -> str:
        if self.floats is not None:
            return f"{self.floats:,} const"
        return f"grows {self.floats_per_token:,}/token ({self.formula})"

    def at_length(self, seq_len: int) -> int:
        """Floats held after ``seq_len`` tokens (constant states ignore it)."""
        return self.floats if self.floats is not None else self.floats_per_token * seq_len


@dataclass(frozen=True)
class RecallModel:
    """A registry entry: how to build the model at a ModelSize and how big its inference state is.

    requires(settings) -> None, or one line saying why the row cannot run under those RecallSettings (a missing
    package, a device, a width); validate_settings raises it. graphable: its training step may be captured as a
    CUDA graph (settings.cuda_graph); False trains it eagerly."""

    name: str
    summary: str
    build: Callable[[ModelSize], nn.Module]
    state_size: Callable[[nn.Module], StateSize]
    requires: Callable[[Any], str | None] | None = None
    graphable: bool = True


RECALL_MODELS: dict[str, RecallModel] = {}
# name -> why it is not registered here (a row whose package is missing); the unknown-model error says it
UNAVAILABLE_MODELS: dict[str, str] = {}


def register_model(entry: RecallModel) -> RecallModel:
    """Add (or replace) a RECALL_MODELS entry."""
    RECALL_MODELS[entry.name] = entry
    return entry


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- the MoM family


def _mom_family(name: str, summary: str, attention_everywhere: bool = False, heads_factor: int = 1,
                head_dim: int | None = None, **overrides: Any) -> RecallModel:
    """A registry entry for a MoMForCausalLM variant; attention_everywhere makes every layer softmax attention;
    head_dim fixes the memory heads' width (else the benchmark's head_dim)."""
    def build(size: ModelSize) -> nn.Module:
        from memmix.models import MoMForCausalLM
        from memmix.models.presets import mom_recall_config

        layers = {"attn_layers": list(range(size.num_layers))} if attention_everywhere else {}
        width = head_dim or size.head_dim
        return MoMForCausalLM(mom_recall_config(size.vocab_size, size.d_model, size.num_layers, width,
                                                heads_factor=heads_factor, **overrides, **layers))

    requires = None if head_dim is None else _width_multiple_of(head_dim)
    return RecallModel(name=name, summary=summary, build=build, state_size=mom_family_state_size, requires=requires)


def _width_multiple_of(head_dim: int) -> Callable[[Any], str | None]:
    """requires(settings): every d_model a multiple of ``head_dim`` (the row's own head width)."""
    def requires(s: Any) -> str | None:
        bad = [d for d in s.d_models if d % head_dim]
        return f"its heads of {head_dim} need every d_model a multiple of {head_dim}, got {bad[0]}" if bad else None
    return requires


def mom_family_state_size(model: nn.Module) -> StateSize:
    """Inference state of a MoMForCausalLM (memories and conv tails; KV cache per token for attention layers)."""
    constant = model.recurrent_state_size(context_length=0)
    per_token = model.recurrent_state_size(context_length=1) - constant
    if per_token == 0:
        return StateSize(constant, None, "")
    c = model.config
    layers, kv_width = len(c.attn_layers), c.attn_num_kv_heads * (c.hidden_size // c.attn_num_heads)
    formula = f"2*{layers}*{kv_width}" + (f" + {constant:,} const" if constant else "")
    return StateSize(None, per_token, formula)


MOM = dict(num_memories=4, topk=2, shared_mem=True, memory_rule="gated_delta")  # the paper's MoM, as benchmarked
GDN = dict(num_memories=1, topk=1, shared_mem=False, memory_rule="gated_delta")
# gdn-wide: one gated-delta memory with as many heads as MoM has memories (routed + shared) per head, so every
# recurrent float matches: H' K V = (M + S) H K V for the memories, and the conv tails (W - 1)(2 H' K + H' V) =
# (M + S)(W - 1)(2 H K + H V). "More state" without routing, told apart from "routed state".
MOM_STATES = MOM["num_memories"] + int(MOM["shared_mem"])


def register_mom_variant(name: str, summary: str, **overrides: Any) -> RecallModel:
    """One line per MoM ablation: the benchmarked MoM (``MOM``) with MoMConfig ``overrides``."""
    return register_model(_mom_family(name, summary, **{**MOM, **overrides}))


# One entry per model; any other builder joins with one more register_model call.
register_model(_mom_family("mom", "MoM: 4 gated-delta memories, top-2 routing, + a shared memory", **MOM))
register_model(_mom_family("gdn", "Gated DeltaNet: the same block with one memory", **GDN))
register_model(_mom_family("gdn-wide", f"Gated DeltaNet with {MOM_STATES}x the heads: one memory, MoM's total state",
                           heads_factor=MOM_STATES, **GDN))
# Head width as a setting: state per head, K x V, bounds what one head can store; at d_model 128 heads of
# 64 are 2 heads of 64 x 64 against 8 heads of 16 x 16 (4x the memory floats, 2x the conv-tail floats).
register_model(_mom_family("mom-h64", "MoM with heads of 64 (whatever head_dim says)", head_dim=64, **MOM))
register_model(_mom_family("gdn-h64", "Gated DeltaNet with heads of 64 (whatever head_dim says)", head_dim=64, **GDN))
register_model(_mom_family("linear", "linear attention: one memory, additive (no decay, no delta) update",
                           num_memories=1, topk=1, shared_mem=False, memory_rule="linear"))
register_model(_mom_family("attention", "softmax attention in every layer (the recall upper bound)",
                           attention_everywhere=True, num_memories=1, topk=1, shared_mem=False))


def _bmojo_family(name: str, summary: str, config_name: str) -> RecallModel:
    """A registry entry for a BMojoForCausalLM built by memmix.models.presets.<config_name>."""
    def build(size: ModelSize) -> nn.Module:
        from memmix.models import BMojoForCausalLM, presets

        config = getattr(presets, config_name)(size.vocab_size, size.d_model, size.num_layers, head_dim=size.head_dim)
        return BMojoForCausalLM(config)

    return RecallModel(name=name, summary=summary, build=build,
                       state_size=lambda model: StateSize(model.recurrent_state_size(), None, ""))


register_model(_bmojo_family(
    "bmojo", "B'MOJO: gated-delta fading memory + innovation-selected eidetic store + sliding-window attention",
    "bmojo_recall_config"))
register_model(_bmojo_family(
    "bmojo-f", "B'MOJO-F: gated-delta fading mixer; one softmax over a 64-token window and the 64 fading tokens "
               "before it", "bmojo_f_recall_config"))

# ----------------------------------------------------------------------------------------------- MoM ablations
# Each changes one MoMConfig field of `mom` (preset "zoology-ablations" runs them against mom and gdn).
register_mom_variant("mom-k1", "MoM with top-1 routing", topk=1)
register_mom_variant("mom-m2", "MoM with 2 routed memories (top-2: every memory every token)", num_memories=2)
register_mom_variant("mom-m8", "MoM with 8 routed memories, top-2", num_memories=8)
register_mom_variant("mom-noshared", "MoM without the shared memory", shared_mem=False)
register_mom_variant("mom-lb0", "MoM without the load-balancing loss", aux_loss_scale=0.0)
register_mom_variant("mom-lb0.1", "MoM with load-balancing weight 0.1 (default 0.01)", aux_loss_scale=0.1)
register_mom_variant("mom-conv-whole", "MoM with the q/k/v short convolution over the whole sequence before routing "
                     "(not over each memory's own tokens)", conv_scope="sequence")
register_mom_variant("mom-route-conv", "MoM routing from a causal short convolution of the layer input",
                     router_input="conv")
register_mom_variant("mom-zloss", "MoM with a router z-loss of weight 1e-3", router_z_loss=1e-3)
register_mom_variant("mom-temp", "MoM with router temperature 2 (softmax over logits / 2)", router_temperature=2.0)
ABLATION_MODELS = ["mom-k1", "mom-m2", "mom-m8", "mom-noshared", "mom-lb0", "mom-lb0.1", "mom-conv-whole",
                   "mom-route-conv", "mom-zloss", "mom-temp"]

# ----------------------------------------------------------------------------------------------- fla reference rows


def _fla_family(name: str, summary: str, layer: str, **overrides: Any) -> RecallModel:
    """``gdn`` or ``mom``'s harness (same config) with every mixer swapped for fla's layer (fla_reference.py)."""
    twin = _mom_family(name, summary, **overrides)

    def build(size: ModelSize) -> nn.Module:
        from memmix.evaluation.recall.fla_reference import FLA_LAYERS, swap_mixers

        return swap_mixers(twin.build(size), FLA_LAYERS[layer])

    def requires(s: Any) -> str | None:
        from memmix.evaluation.recall.fla_reference import fla_unavailable

        return fla_unavailable(s.device)

    return RecallModel(name=name, summary=summary, build=build, state_size=mom_family_state_size, requires=requires,
                       graphable=False)


FLA_MODELS = {
    "fla-gdn": _fla_family("fla-gdn", "gdn's harness with fla.layers.GatedDeltaNet as the mixer (reference)",
                           "gated_delta", **GDN),
    "fla-mom": _fla_family("fla-mom", "mom's harness with fla.layers.MomAttention as the mixer (reference)", "mom",
                           **MOM),
}


def _register_fla_models() -> None:
    """The fla rows when the package fla is installed (looked up, not imported: fla loads only when a row is
    validated or built); else the reason, for the unknown-model error."""
    from memmix.evaluation.recall.fla_reference import fla_installed, fla_unavailable

    for entry in FLA_MODELS.values():
        if fla_installed():
            register_model(entry)
        else:
            UNAVAILABLE_MODELS[entry.name] = fla_unavailable()


_register_fla_models()

BUILTIN_MODELS = dict(RECALL_MODELS)  # what a fresh interpreter (a worker process) has registered
