"""Generation cache: one state object per layer (MoMState, BMojoState, BMojoFState or AttentionState).

`LayerStateCache` subclasses transformers' `Cache` so that `generate()` accepts it, but it keeps its own per-layer
states and overrides every method generation calls, so it does not depend on the layer classes that changed
between transformers 5.17 and 5.24. The recurrent memories have a fixed size; only attention layers grow.
"""
from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from memmix.layers.attention import AttentionState


class LayerStateCache(Cache):
    """Per-layer states of any memmix model (MoM, hybrid, B'MOJO, B'MOJO-F).

    layer_states[i] is None (layer not run yet), a MoMState (memory (B, M + S, H, K, V), conv tails) for MoM
    layers, a BMojoState / BMojoFState for B'MOJO layers, or an AttentionState (keys / values (B, H_kv, T, K))
    for attention layers. Every state object must provide `select(batch_idx)` (and may provide
    `reorder(beam_idx)`), returning the new state.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        try:
            super().__init__(layers=[])
        except TypeError:  # a transformers whose Cache takes no layer arguments
            super().__init__()
        self.layer_states: list[Any] = [None] * num_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layer_states)

    def __repr__(self) -> str:
        kinds = [type(state).__name__ if state is not None else "None" for state in self.layer_states]
        return f"LayerStateCache(seen_tokens={self.seen_tokens}, layers={kinds})"

    # ---- state access used by the model -------------------------------------------------------------------
    def get_layer_state(self, layer_idx: int) -> Any:
        """The state of layer `layer_idx`, or None before its first cached forward."""
        return self.layer_states[layer_idx]

    def set_layer_state(self, layer_idx: int, state: Any) -> None:
        self.layer_states[layer_idx] = state

    def advance(self, num_tokens: int) -> None:
        """Record that `num_tokens` more positions (pads included) went through every layer."""
        self.seen_tokens += num_tokens

    # ---- the Cache interface used by generate() ---------------------------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        if layer_idx is None:
            return self.seen_tokens > 0
        return self.layer_states[layer_idx] is not None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        raise NotImplementedError("LayerStateCache stores whole layer states; use set_layer_state / get_layer_state")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) batch rows `indices` (int64 (B',)) in every layer state."""
        self.layer_states = [None if s is None else s.select(indices) for s in self.layer_states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b of every state becomes old row beam_idx[b]."""
        self.layer_states = [
            None if s is None else (s.reorder(beam_idx) if hasattr(s, "reorder") else s.select(beam_idx))
            for s in self.layer_states
        ]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row `repeats` times in place (beam search / num_return_sequences expansion)."""
        batch_size = self.batch_size
        if batch_size > 0:
            device = next(self._tensors()).device
            self.batch_select_indices(torch.arange(batch_size, device=device).repeat_interleave(repeats))

    def reset(self) -> None:
        self.layer_states = [None] * len(self.layer_states)
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("LayerStateCache cannot be cropped: a recurrent memory cannot forget tokens")

    def activate_past_recording(self) -> None:
        """Rollback is impossible for recurrent states; nothing to record."""

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Offloading is not supported; states stay where they are."""

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Offloading is not supported; nothing to prefetch."""

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layer_states)

    @property
    def is_linear(self) -> list[bool]:
        return [s is not None and not isinstance(s, AttentionState) for s in self.layer_states]

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layer_states)

    @property
    def batch_size(self) -> int:
        """Batch size of the stored states, or -1 before the first forward."""
        tensor = next(self._tensors(), None)
        return -1 if tensor is None else tensor.shape[0]

    def _tensors(self):
        """The first tensor of every non-empty layer state (every state keeps the batch first)."""
        for state in self.layer_states:
            if state is not None:
                yield next(t for t in _state_values(state) if torch.is_tensor(t))

    # ---- sizes -----------------------------------------------------------------------------------------
    def num_floats(self) -> int:
        """Number of stored tensor elements (all states, whole batch)."""
        total = 0
        for state in self.layer_states:
            if state is None:
                continue
            total += sum(v.numel() for v in _state_values(state) if torch.is_tensor(v) and v.is_floating_point())
        return total


def _state_values(state) -> list:
    """The field values of a layer state, in declaration order."""
    return [getattr(state, f.name) for f in fields(state)] if is_dataclass(state) else list(vars(state).values())
