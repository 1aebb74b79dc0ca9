"""The Mixture-of-Memories mixer (Du et al., arXiv 2502.13685) as one op, with its reference beside it.

    mixer.py       mom_mixer: the op (validation, impl choice, state in and out)
    naive.py       naive_mom: the paper's per-token loop, the reference the paths are tested against
    plan.py        slots, segments and the dispatch plan (both buffer layouts), computed on the device
    core.py        what both paths share: weights and sizes, slot projections, gates, the recurrence call
    torch_path.py  the PyTorch path: dispatch copies, short convolution over the segments (memmix.ops.short_conv),
                   recurrence, combine; sequence_conv (the short convolution along each sequence's real tokens:
                   conv_scope "sequence", the router's)
    triton_path.py the Triton path: gathered segment convolution and combine on memmix.ops.triton's kernels
    decode.py      one decoding step: only the picked memories' states and conv tails, optionally in place

docs/design.md explains the design; memmix.layers.MixtureOfMemories holds the weights and calls mom_mixer once.
"""
from memmix.ops.mom.core import MoMWeights
from memmix.ops.mom.mixer import CONV_SCOPES, DENSE_LAYOUT_MAX_LEN, MIXER_IMPLS, MixerOutput, mom_mixer
from memmix.ops.mom.naive import naive_mom
from memmix.ops.mom.plan import LAYOUTS, DispatchPlan, SegmentRows, add_shared_slot, plan_dispatch
from memmix.ops.mom.torch_path import sequence_conv

__all__ = ["CONV_SCOPES", "DENSE_LAYOUT_MAX_LEN", "LAYOUTS", "MIXER_IMPLS", "DispatchPlan", "MixerOutput",
           "MoMWeights", "SegmentRows", "add_shared_slot", "mom_mixer", "naive_mom", "plan_dispatch", "sequence_conv"]
