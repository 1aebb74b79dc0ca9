"""Stateless ops (pure PyTorch, any device; Triton kernels under memmix.ops.triton, found through the registry).

Memory rules (one record each in memmix.ops.registry) share one calling convention (flash-linear-attention
layout), see memmix.ops.common:

    o, final_state = rule(q, k, v[, g][, beta], *, scale=None, initial_state=None, output_final_state=False,
                          cu_seqlens=None, use_qk_l2norm=False, low_memory=False, impl="auto")

impl: "recurrent" (step loop, the readable reference), "chunk" (chunkwise-parallel, chunks of 64),
"triton" (the kernel memmix.ops.triton registers, CUDA only) or "auto": on CUDA the Triton kernel when one is
registered for the rule, else "chunk"; on CPU "recurrent" for T <= 8 (decode steps), else "chunk".

memory_step (memmix.ops.decode) is one decoding step of any rule for picked states of a state bank, in place.
memmix.ops.mom is the Mixture-of-Memories mixer: routed tokens -> per-memory convolution and recurrence -> mix.
"""
from memmix.ops.decode import memory_step
from memmix.ops.delta_rule import delta_rule, gated_delta_rule
from memmix.ops.linear_attention import gated_linear_attention, linear_attention
from memmix.ops.normalize import l2norm

__all__ = ["delta_rule", "gated_delta_rule", "gated_linear_attention", "l2norm", "linear_attention",
           "memory_step"]
