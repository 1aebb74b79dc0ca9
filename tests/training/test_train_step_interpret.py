"""The training step of every recall model reads nothing back to the host on the path CUDA takes, so a CUDA graph
can capture it: MoM and its single-memory twins on the Triton segment kernels and the Triton gated delta rule, linear
attention on the dense layout, softmax attention, B'MOJO. Checked on the CPU with Triton's interpreter standing in
for the GPU (the optimiser is left out: on the CPU Adam reads its step count back, on CUDA it is capturable). The MoM
ablations of the recall study too: the z-loss, the router temperature, routing from a short convolution (with the
Triton segment kernels), the sequence-wide convolution (the PyTorch path's convolution, the Triton recurrence).

TRITON_INTERPRET=1 must be set before triton is imported, so the cases run in a child process (this file as a
script prints one JSON object) and the tests check them.
"""
from __future__ import annotations

import pytest
import torch

from helpers import count_recurrence_passes, forced_sequence_form, print_case_results

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16, attn_num_heads=2,
            intermediate_size=64)
CASES = {  # the recall benchmark's models at a tiny size, with the kernels CUDA would run
    "mom": dict(num_memories=4, topk=2, shared_mem=True, impl="triton"),
    "gdn": dict(num_memories=1, topk=1, shared_mem=False, impl="triton"),
    "linear": dict(num_memories=1, topk=1, shared_mem=False, memory_rule="linear"),
    "attention": dict(num_memories=1, topk=1, shared_mem=False, attn_layers=[0, 1]),
    "bmojo": dict(),
    "mom-zloss": dict(num_memories=4, topk=2, shared_mem=True, impl="triton", router_z_loss=1e-3),
    "mom-temp": dict(num_memories=4, topk=2, shared_mem=True, impl="triton", router_temperature=2.0),
    "mom-route-conv": dict(num_memories=4, topk=2, shared_mem=True, impl="triton", router_input="conv"),
    "mom-conv-whole": dict(num_memories=4, topk=2, shared_mem=True, impl="triton", conv_scope="sequence"),
}
SEGMENT_KERNEL_CASES = ("mom", "gdn", "mom-zloss", "mom-temp", "mom-route-conv")
# mom and gdn take the kernels' own choice for their heads of 16 (the recurrent form); the other cases the chunked
# form, so both forms are checked for host reads and the interpreter's per-token loop runs twice, not seven times
RECURRENT_FORM_CASES = ("mom", "gdn")


def run_case(name: str, seed: int) -> dict:
    from memmix.models import BMojoForCausalLM, MoMConfig, MoMForCausalLM
    from memmix.models.presets import bmojo_recall_config
    from memmix.ops.mom import triton_path
    from memmix.host_syncs import find_host_syncs
    from memmix.training.step import clip_grad_norm

    torch.manual_seed(seed)
    if name == "bmojo":
        model = BMojoForCausalLM(bmojo_recall_config(64, 32, 2, head_dim=16))
    else:
        model = MoMForCausalLM(MoMConfig(**TINY, **CASES[name]))
    ids = torch.randint(0, 64, (2, 40))
    from memmix.ops.triton import gated_delta_rule as kernels

    calls = []
    original, original_key = triton_path.triton_memories, kernels._layout_key
    triton_path.triton_memories = lambda *a, **k: calls.append(1) or original(*a, **k)
    # the chunk-layout cache keys CPU bounds by their values (a host read that only the CPU takes); on CUDA it keys
    # them by the tensor, and a captured step misses the cache (new bounds each forward): build, as there
    kernels._layout_key = lambda batch, seq_len, cu_seqlens, device: (
        None if cu_seqlens is not None else original_key(batch, seq_len, cu_seqlens, device))
    try:
        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            return loss

        form = None if name in RECURRENT_FORM_CASES else "chunked"
        with count_recurrence_passes() as passes, forced_sequence_form(form):
            syncs = find_host_syncs(step)
    finally:
        triton_path.triton_memories, kernels._layout_key = original, original_key
    return {"syncs": syncs, "triton_segment_calls": len(calls), "recurrence_passes": passes}


INTERPRET_TIMEOUT = 600


@pytest.mark.parametrize("name", list(CASES))
def test_training_step_never_syncs_the_host(interpret_results, name):
    result = interpret_results[name]
    assert result["syncs"] == [], f"{name}: host reads {result['syncs']}"
    if name in SEGMENT_KERNEL_CASES:
        assert result["triton_segment_calls"] == 2  # one per layer: the Triton path ran, not the PyTorch one
    if name == "mom-conv-whole":  # the PyTorch path's convolution, the recurrence on its Triton kernel
        assert result["triton_segment_calls"] == 0 and result["recurrence_passes"]["backward"] == 2


if __name__ == "__main__":
    print_case_results(run_case, CASES)
