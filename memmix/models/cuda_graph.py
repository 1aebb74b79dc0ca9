"""CUDA-graph decoding: one captured graph replays a whole decode step of a recurrent MoM model.

A decode step (one new token per sequence) launches hundreds of small kernels; replaying them as one CUDA
graph removes the launch and Python overhead. The graph reads the token ids from a static buffer and
updates a static state bank in place (the preallocated "static cache": memory states and convolution
tails of every layer), so it needs no host synchronisation and no allocation per token.

Used by `MoMForCausalLM.forward` (hence by `generate()`) for decode steps on CUDA when
`model.cuda_graph_decoding` is True (the default); set it to False to opt out. Models with softmax-attention
layers (a growing KV cache) are not graphed.
"""
from __future__ import annotations

import torch

from memmix.layers.mom import MixtureOfMemories, MoMState


class CudaGraphDecoder:
    """A captured decode step for a fixed batch size. `step(input_ids, cache)` -> logits (B, 1, V)."""

    def __init__(self, model, cache, batch_size: int):
        self.model = model
        self.batch_size = batch_size
        device = model.lm_head.weight.device
        self.static_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.static_mask = torch.ones(batch_size, 1, dtype=torch.long, device=device)
        self.states = [s.clone() for s in cache.layer_states]
        saved = [s.clone() for s in self.states]
        with _inplace_decode(model):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):  # warm-up outside the graph (allocator, lazy kernels)
                    self._forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.static_logits = self._forward()
        for static, original in zip(self.states, saved):  # the warm-up stepped the states: undo
            static.copy_(original)

    def _forward(self) -> torch.Tensor:
        model = self.model.model
        hidden = model.embeddings(self.static_ids)
        for block, state in zip(model.layers, self.states):
            hidden = block(hidden, self.static_mask, None, state, True).hidden_states
        return self.model.lm_head(model.norm(hidden))

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
        """input_ids (B, 1); attention_mask (B, T_total) or None (its last column marks the new token).
        Copies the inputs and (if the cache moved on its own, e.g. beam reordering) the states in, replays."""
        self.static_ids.copy_(input_ids)
        self.static_mask.fill_(1) if attention_mask is None else self.static_mask.copy_(attention_mask[:, -1:])
        for idx, (static, current) in enumerate(zip(self.states, cache.layer_states)):
            if current is not static:
                static.copy_(current)
                cache.set_layer_state(idx, static)
        self.graph.replay()
        cache.advance(1)
        return self.static_logits.clone()


def can_graph_decode(model, input_ids, cache, flags: dict) -> bool:
    """True for a plain decode step of an all-recurrent model on CUDA with a filled cache."""
    if not getattr(model, "cuda_graph_decoding", False) or model.training or input_ids is None:
        return False
    if input_ids.dim() != 2 or input_ids.shape[1] != 1 or not input_ids.is_cuda or torch.is_grad_enabled():
        return False
    if any(flags.get(name) is not None for name in ("labels", "inputs_embeds", "cu_seqlens", "loss_positions")):
        return False
    if flags.get("output_hidden_states") or flags.get("output_router_logits"):
        return False
    if flags.get("use_cache") is False or cache is None or not hasattr(cache, "layer_states"):
        return False
    states = cache.layer_states
    return bool(states) and all(isinstance(s, MoMState) and s.memory.shape[0] == input_ids.shape[0] for s in states)


class _inplace_decode:
    """Within the block, every MoM layer updates the given state's tensors in place on decode steps."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, MixtureOfMemories)]

    def __enter__(self):
        for layer in self.layers:
            layer.inplace_decode = True

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.inplace_decode = False
