"""The MoM mixer op: routed tokens in, every memory's convolution and recurrence, the weighted mix out.

    out = mom_mixer(x, memory_ids, routing_weights, weights, rule="gated_delta", num_heads=H, num_memories=M)
    out.o (B, T, H * V): the mixed memory outputs (before the layer's output norm); out.memory, out.conv: the state

impl picks the path (the same value the MoM layer and its config take, plus "naive"):
- "naive":     the paper's per-token loop (naive.py), the reference;
- "recurrent": the PyTorch path (torch_path.py), the rule as its step loop;
- "chunk":     the PyTorch path, the rule in chunkwise-parallel form;
- "triton":    the Triton path (triton_path.py: segment kernels) and the rule's Triton kernel; CUDA, or Triton's CPU
               interpreter under TRITON_INTERPRET=1;
- "auto":      the Triton path where its kernels run on x, else the PyTorch path; the rule's own "auto".
The Triton path needs the "packed" layout, incoming conv tails without gradient and conv_scope "segment"; otherwise
"auto" and "triton" take the PyTorch path (with the rule's "auto" / "triton"). A decoding step (T == 1 without
cu_seqlens) takes decode.py whatever the impl but "naive".

conv_scope picks what each memory's short convolution runs along: "segment" (the paper's and fla's semantics: the
memory's own tokens) or "sequence" (an ablation: every real token of the sequence, each memory convolving its own
projections; the convolution runs before the memories' tokens are dispatched). The state has the same shape in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import memmix.ops.mom.triton_path as triton_path
from memmix.checks import describe, is_int
from memmix.ops.mom.core import MixerSizes, MoMWeights
from memmix.ops.mom.decode import decode_step
from memmix.ops.mom.naive import naive_mom
from memmix.ops.mom.plan import LAYOUTS, add_shared_slot, plan_dispatch
from memmix.ops.mom.torch_path import torch_memories
from memmix.ops.registry import get_rule

MIXER_IMPLS = ("auto", "naive", "recurrent", "chunk", "triton")
CONV_SCOPES = ("segment", "sequence")
# without cu_seqlens, inputs up to this length use the dense layout (decoding steps, short prompts)
DENSE_LAYOUT_MAX_LEN = 16


@dataclass
class MixerOutput:
    """o: (B, T, H * V) the mixed memory outputs, in x's dtype. memory (N, P, H, K, V) and conv (N, P, W-1, C):
    the new state (float32, float64 for float64 inputs, or the given state's dtype when decoding), None unless
    use_cache."""

    o: torch.Tensor
    memory: Optional[torch.Tensor]
    conv: Optional[torch.Tensor]


def mom_mixer(x: torch.Tensor, memory_ids: torch.Tensor, routing_weights: torch.Tensor, weights: MoMWeights, *,
              rule: str, num_heads: int, num_memories: int, shared_memory: bool = True,
              memory: Optional[torch.Tensor] = None, conv: Optional[torch.Tensor] = None,
              valid: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
              use_cache: bool = False, low_memory: bool = False, inplace: bool = False,
              layout: Optional[str] = None, impl: str = "auto", conv_scope: str = "segment") -> MixerOutput:
    """Route every token's slots to their memories, run each memory over its own sub-sequence, mix the outputs.

    x: (B, T, D); memory_ids: (B, T, k) int64, each token's k distinct picks in [0, num_memories) (not checked:
    it would sync the host); routing_weights: (B, T, k) their mixing weights; weights: MoMWeights;
    rule: a memory rule's name or alias (memmix.ops.registry); num_heads: H; shared_memory: one more memory
    (number M, weight 1) that every token writes to.
    memory (N, P, H, K, V) and conv (N, P, W-1, 2 Kd + Vd): the state from an earlier call (P = M + shared), or
    None for zeros; conv holds each memory's last W-1 convolution inputs (of its own tokens with conv_scope
    "segment", of the sequence's last real tokens under its projections with "sequence"). valid: (B, T) bool, False at padding (touches nothing, outputs 0), None for all True.
    cu_seqlens: (N + 1,) int document bounds of a packed batch (B == 1), else N = B.
    use_cache: return the new state. low_memory: less training memory on the Triton path for more time (the
    convolution rebuilds the k/v projection in its backward, the recurrence runs one head at a time).
    inplace: a decoding step writes the new state into `memory` and `conv` and returns them.
    layout: "packed", "dense" or None (dense without cu_seqlens up to DENSE_LAYOUT_MAX_LEN tokens, or where the
    rule has no kernel on the Triton path's device: see _no_kernel).
    impl: see the module docstring (MIXER_IMPLS). conv_scope: "segment" or "sequence" (CONV_SCOPES; the module
    docstring).
    """
    sizes = _validate(x, memory_ids, routing_weights, weights, rule, num_heads, num_memories, shared_memory,
                      memory, conv, valid, cu_seqlens, layout, impl, use_cache, low_memory, inplace, conv_scope)
    B, T, _ = x.shape
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
    if impl == "naive":
        return _naive(x, memory_ids, routing_weights, weights, sizes, memory, conv, valid, cu_seqlens, use_cache,
                      inplace, conv_scope)
    memory_ids, slot_weights = add_shared_slot(memory_ids, routing_weights, num_memories, shared_memory)
    if T == 1 and cu_seqlens is None:
        if memory is not None and memory.shape[0] != B:
            raise ValueError(f"state holds {memory.shape[0]} sequences but the input has {B}")
        o, memory, conv = decode_step(x, memory_ids, slot_weights, valid, weights, sizes, memory, conv,
                                      use_cache=use_cache, inplace=inplace, impl=impl, conv_scope=conv_scope)
        return MixerOutput(o, memory, conv)

    if layout is None:
        layout = "dense" if cu_seqlens is None and (T <= DENSE_LAYOUT_MAX_LEN or _no_kernel(impl, sizes, x)) else "packed"
    plan = plan_dispatch(memory_ids, valid, sizes.num_slot_memories, cu_seqlens, layout)
    N, R, W = plan.num_sequences, plan.num_segments, sizes.conv_size
    if memory is not None and memory.shape[0] != N:
        raise ValueError(f"state holds {memory.shape[0]} sequences but the input has {N}")
    tails = None if conv is None else conv.reshape(R, W - 1, -1)
    initial = None if memory is None else memory.reshape(R, *memory.shape[2:])
    options = dict(use_cache=use_cache, low_memory=low_memory, impl=impl)
    if conv_scope == "segment" and _triton_path(impl, plan.layout, x, tails):
        o, final, new_tails = triton_path.triton_memories(x, memory_ids, slot_weights, valid, plan, weights, sizes,
                                                          tails, initial, **options)
    else:
        o, final, new_tails = torch_memories(x, memory_ids, slot_weights, valid, cu_seqlens, plan, weights, sizes,
                                             tails, initial, conv_scope=conv_scope, **options)
    if not use_cache:
        return MixerOutput(o, None, None)
    memory = final.reshape(N, sizes.num_slot_memories, *final.shape[1:])
    conv = new_tails.reshape(N, sizes.num_slot_memories, W - 1, -1)
    return MixerOutput(o, memory, conv.to(memory.dtype))


def _no_kernel(impl: str, sizes: MixerSizes, x: torch.Tensor) -> bool:
    """Where the Triton path would run but the rule has no chunked kernel there (linear, gla): the packed layout
    would hand its varlen recurrence to the PyTorch path, which reads the segment bounds back to the host; the
    dense layout (a row of T per segment) keeps the step free of host syncs, so a CUDA graph can capture it."""
    kernel = sizes.rule.chunk_kernel
    head_dim = max(sizes.head_k_dim, sizes.head_v_dim)
    return (impl in ("auto", "triton") and triton_path.runs_on(x)
            and (kernel is None or not kernel.fits(x, head_dim=head_dim)))


def _triton_path(impl: str, layout: str, x: torch.Tensor, tails: Optional[torch.Tensor]) -> bool:
    """The Triton segment kernels: packed layout, impl auto/triton, the kernels run on x's device, and no gradient
    wanted for the incoming conv tails (the PyTorch path differentiates those)."""
    return (layout == "packed" and impl in ("auto", "triton") and triton_path.runs_on(x)
            and not (tails is not None and tails.requires_grad))


def _naive(x, memory_ids, routing_weights, weights, sizes, memory, conv, valid, cu_seqlens, use_cache, inplace,
           conv_scope):
    o, new_memory, new_conv = naive_mom(x, memory_ids, routing_weights, weights, rule=sizes.rule.name,
                                        num_heads=sizes.num_heads, num_memories=sizes.num_memories,
                                        shared_memory=sizes.shared_memory, memory=memory, conv=conv, valid=valid,
                                        cu_seqlens=cu_seqlens, conv_scope=conv_scope)
    if not use_cache:
        return MixerOutput(o, None, None)
    if inplace and memory is not None and x.shape[1] == 1 and cu_seqlens is None:
        memory.copy_(new_memory)
        conv.copy_(new_conv)
        return MixerOutput(o, memory, conv)
    return MixerOutput(o, new_memory, new_conv)


def _validate(x, memory_ids, routing_weights, weights, rule, num_heads, num_memories, shared_memory, memory, conv,
              valid, cu_seqlens, layout, impl, use_cache, low_memory, inplace, conv_scope) -> MixerSizes:
    """The sizes of the call; ValueError naming the first bad argument and what it may be (no host sync)."""
    if impl not in MIXER_IMPLS:
        raise ValueError(f"impl must be one of {MIXER_IMPLS}, got {impl!r}")
    if conv_scope not in CONV_SCOPES:
        raise ValueError(f"conv_scope must be one of {CONV_SCOPES}, got {conv_scope!r}")
    record = get_rule(rule)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be None or one of {LAYOUTS}, got {layout!r}")
    for name, flag in (("shared_memory", shared_memory), ("use_cache", use_cache), ("low_memory", low_memory),
                       ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (B, T, D) tensor, got {describe(x)}")
    B, T, D = x.shape
    if (not isinstance(memory_ids, torch.Tensor) or memory_ids.dim() != 3 or memory_ids.shape[:2] != (B, T)
            or memory_ids.is_floating_point()):
        raise ValueError(f"memory_ids must be an integer (B, T, k) = ({B}, {T}, k) tensor, got {describe(memory_ids)}")
    if not isinstance(routing_weights, torch.Tensor) or routing_weights.shape != memory_ids.shape:
        raise ValueError(f"routing_weights must have memory_ids' shape {tuple(memory_ids.shape)}, "
                         f"got {describe(routing_weights)}")
    if not is_int(num_heads) or num_heads < 1 or not is_int(num_memories) or num_memories < 1:
        raise ValueError(f"num_heads and num_memories must be positive integers, got {num_heads!r}, {num_memories!r}")
    H, P = num_heads, num_memories + int(shared_memory)
    Kd = weights.q_proj.shape[0]
    if weights.q_proj.dim() != 2 or weights.q_proj.shape[1] != D or Kd % H:
        raise ValueError(f"weights.q_proj must be (H * K, D) with H = {H}, D = {D}, got {tuple(weights.q_proj.shape)}")
    if weights.conv.dim() != 2 or weights.conv.shape[1] < 2 or (weights.conv.shape[0] - 2 * Kd) % H \
            or weights.conv.shape[0] <= 2 * Kd:
        raise ValueError(f"weights.conv must be (2 Kd + Vd, W) with Kd = {Kd}, Vd a positive multiple of H = {H} "
                         f"and W >= 2, got {tuple(weights.conv.shape)}")
    Vd, W = weights.conv.shape[0] - 2 * Kd, weights.conv.shape[1]
    features = Kd + Vd + H * (int(record.uses_beta) + int(record.uses_gate))
    if weights.kv_proj.dim() != 3 or weights.kv_proj.shape[0] not in (1, P) or weights.kv_proj.shape[1:] != (
            features, D):
        raise ValueError(f"weights.kv_proj must be (P or 1, Kd + Vd + gates, D) = ({P} or 1, {features}, {D}) for "
                         f"rule {record.name!r}, got {tuple(weights.kv_proj.shape)}")
    if record.uses_gate and (weights.A_log is None or weights.dt_bias is None):
        raise ValueError(f"weights.A_log and weights.dt_bias (H,) are needed by rule {record.name!r}")
    if (memory is None) != (conv is None):
        raise ValueError("memory and conv must be given together (the state) or both be None")
    if memory is not None:
        N = memory.shape[0]
        if memory.shape[1:] != (P, H, Kd // H, Vd // H) or conv.shape[1:] != (P, W - 1, 2 * Kd + Vd):
            raise ValueError(f"state must be memory (N, P, H, K, V) = (N, {P}, {H}, {Kd // H}, {Vd // H}) and conv "
                             f"(N, P, W-1, C) = (N, {P}, {W - 1}, {2 * Kd + Vd}), got {tuple(memory.shape)} and "
                             f"{tuple(conv.shape)}")
        if conv.shape[0] != N:
            raise ValueError(f"memory and conv must hold the same sequences, got {N} and {conv.shape[0]}")
    if valid is not None and (valid.shape != (B, T) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool (B, T) = ({B}, {T}) tensor, got {describe(valid)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs a packed batch of size 1, got batch size {B}")
    return MixerSizes(record, H, Kd // H, Vd // H, num_memories, shared_memory, W)

