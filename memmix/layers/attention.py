"""Causal softmax attention with RoPE, grouped-query heads, an optional sliding window and a KV cache.

Used for the attention layers of hybrid models and for the all-attention Transformer baseline. It follows the
MoM layer's calling convention (`attention_mask` = last T columns used, `cu_seqlens`, `state`, `use_cache`) so
the model can treat both kinds of layer alike.

Packed documents (`cu_seqlens`, B == 1: how `memmix train` feeds every micro-batch) take one of three paths,
chosen by `packed_impl`:
  "mask"    the reference: a dense (T, T) document-causal mask through SDPA. At 8 x 2048 packed tokens that is a
            16384^2 mask, it rules out the flash kernel, and every score of every document pair is computed.
  "flex"    FlexAttention with a block mask built on the device from cu_seqlens (document_block_mask): a 128 x 128
            tile of scores is computed only where a query may see a key of its own document, tiles wholly inside one
            document skip the mask, nothing is read back to the host (CUDA graphs can capture it). Compiled Triton
            kernels on CUDA; on the CPU flex runs its eager (dense) reference, forward only.
  "varlen"  flash attention over variable-length documents (torch.nn.attention.varlen, CUDA, 16-bit): exact, but
            it needs the longest document's length on the host; reading it would synchronise, so T is passed as
            the bound and the kernel launches tiles for every document up to T (most exit at once).
  "auto"    "mask" for now: "flex" is the expected fast path on CUDA, to become the default once its GPU tests and
            benchmarks/train_speed.py have run on a GPU (they have not yet).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memmix.checks import check_binary_mask
from memmix.layers.masks import check_hidden_states
from memmix.ops.dtypes import compute_dtype

PACKED_IMPLS = ("auto", "mask", "flex", "varlen")
FLEX_BLOCK_SIZE = 128  # FlexAttention's default tile: one block-mask entry per 128 queries x 128 keys


@dataclass
class AttentionState:
    """KV cache of one attention layer (keys already rotated).

    keys / values: (B, H_kv, T_past, K); key_mask: (B, T_past) bool, True = real token;
    key_positions: (B, T_past) int64 RoPE positions; next_position: (B,) int64 position of the next real token.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_mask: torch.Tensor
    key_positions: torch.Tensor
    next_position: torch.Tensor

    def select(self, batch_idx: torch.Tensor) -> AttentionState:
        """Keep (or repeat) the rows `batch_idx` (int64 (B',)) of every tensor."""
        batch_idx = batch_idx.to(self.keys.device)
        return AttentionState(
            keys=self.keys.index_select(0, batch_idx),
            values=self.values.index_select(0, batch_idx),
            key_mask=self.key_mask.index_select(0, batch_idx),
            key_positions=self.key_positions.index_select(0, batch_idx),
            next_position=self.next_position.index_select(0, batch_idx),
        )

    def reorder(self, beam_idx: torch.Tensor) -> AttentionState:
        """Beam-search reordering: rows follow `beam_idx` (int64 (B,))."""
        return self.select(beam_idx)

    @property
    def seq_len(self) -> int:
        return self.keys.shape[2]


@dataclass
class AttentionOutput:
    """hidden_states (B, T, D); state (AttentionState or None); router_logits is always None (no router)."""

    hidden_states: torch.Tensor
    state: AttentionState | None = None
    router_logits: torch.Tensor | None = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dimension, split in halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split convention).

    x: (B, H, T, K) float; positions: (B, T) int64. Angles are computed in float64 for float64 inputs, else float32.
    """
    head_dim = x.shape[-1]
    angle_dtype = compute_dtype(x.dtype)
    exponents = torch.arange(0, head_dim, 2, device=x.device, dtype=angle_dtype) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (K/2,)
    angles = positions.to(angle_dtype)[..., None] * inv_freq  # (B, T, K/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, K)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin


def document_ids(cu_seqlens: torch.Tensor, total_len: int) -> torch.Tensor:
    """Document index of every packed token: cu_seqlens int64 (N+1,) -> (T,) int64."""
    tokens = torch.arange(total_len, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


def document_block_mask(
    cu_seqlens: torch.Tensor, total_len: int, window_size: int | None = None, block_size: int = FLEX_BLOCK_SIZE
):
    """FlexAttention BlockMask of causal attention within packed documents (and a sliding window, if given).

    cu_seqlens int64 (N+1,) on the tensors' device, ending at total_len = T. Built from the first and last document
    of every block of `block_size` tokens, on the device and without host synchronisation: query block i needs key
    block j <= i when their documents overlap (and some pair is within the window); the pair is "full" (no
    mask evaluated) when both blocks lie in one document, j < i and no window applies. Partial blocks evaluate
    mask_mod: same document, key <= query (, query - key < window).
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = cu_seqlens.device
    num_blocks = -(-total_len // block_size)
    doc = document_ids(cu_seqlens, total_len)  # (T,), non-decreasing
    # padded to whole blocks with an id no real token has, so tile-edge indices never match a document
    doc = torch.cat((doc, doc.new_full((num_blocks * block_size - total_len,), cu_seqlens.numel())))
    blocks = torch.arange(num_blocks, device=device)
    starts = blocks * block_size
    first_doc = doc[starts]  # (nb,)
    last_doc = doc[(starts + block_size).clamp(max=total_len) - 1]
    q_block, kv_block = blocks[:, None], blocks[None, :]  # rows: query blocks i, columns: key blocks j
    needed = (kv_block <= q_block) & (last_doc[None, :] >= first_doc[:, None])  # (nb, nb)
    if window_size is not None:  # the closest pair of the two blocks: first query, last key
        needed &= starts[:, None] - (starts[None, :] + block_size - 1) < window_size
        full = torch.zeros_like(needed)
    else:
        full = (kv_block < q_block) & (first_doc[None, :] == last_doc[:, None])
    partial = needed & ~full

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        if window_size is not None:
            keep = keep & (q_idx - kv_idx < window_size)
        return keep

    kv_num, kv_indices = _ordered_blocks(partial)
    full_num, full_indices = _ordered_blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(total_len, total_len))


def _ordered_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nb, nb) bool -> BlockMask's (1, 1, nb) int32 count per row and (1, 1, nb, nb) int32 column indices, the
    row's True columns first in increasing order."""
    count = blocks.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count[None, None], order[None, None]


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    """flex_attention compiled to its fused Triton kernels (called eagerly it is a dense reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            window_size: int | None = None, block_size: int = FLEX_BLOCK_SIZE) -> torch.Tensor:
    """Causal attention within packed documents through FlexAttention.

    q (1, H, T, K), k / v (1, H_kv, T, K) with H a multiple of H_kv; cu_seqlens int64 (N+1,). Returns (1, H, T, K).
    """
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = document_block_mask(cu_seqlens, q.shape[2], window_size, block_size)
    fn = _compiled_flex_attention() if q.is_cuda else flex_attention
    gqa = q.shape[1] != k.shape[1]
    # q, k, v already share one dtype (autocast made them in the layer); flex's kernels need no autocast
    with torch.autocast(q.device.type, enabled=False):
        return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def varlen_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                              window_size: int | None = None) -> torch.Tensor:
    """Causal attention within packed documents through torch's variable-length flash attention (CUDA, fp16/bf16).

    q (1, H, T, K), k / v (1, H_kv, T, K); cu_seqlens int64 (N+1,). Returns (1, H, T, K). The longest document is
    bounded by T (its true length would need a host read).
    """
    from torch.nn.attention.varlen import varlen_attn

    total_len, groups = q.shape[2], q.shape[1] // k.shape[1]
    params = _varlen_parameters()
    kwargs = {}
    if groups > 1 and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    left = -1 if window_size is None else window_size - 1  # flash counts the keys left of the query
    if "window_size" in params:  # newer torch: causal is the window (left, 0)
        kwargs["window_size"] = (left, 0)
    elif window_size is None:  # older torch: is_causal, and no window
        kwargs["is_causal"] = True
    else:
        raise ValueError("packed_impl='varlen' with a window needs a torch whose varlen_attn takes window_size")
    cu = cu_seqlens.to(torch.int32)
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # (T, H, K), rows of K contiguous
    out = varlen_attn(q, k, v, cu, cu, total_len, total_len, **kwargs)  # (T, H, K)
    return out.transpose(0, 1)[None]


@functools.lru_cache(maxsize=None)
def _varlen_parameters() -> frozenset[str]:
    """Keyword names of this torch's varlen_attn (its causal / window / GQA spelling changed between versions)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def new_token_positions(
    valid: torch.Tensor, state: AttentionState | None, cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    """RoPE positions of the new tokens: counting real tokens only, continuing after the cache.

    valid: (B, T) bool; returns (B, T) int64 (pads get the position of the previous real token, they are masked).
    """
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens, valid.shape[1])
        return (torch.arange(valid.shape[1], device=valid.device) - cu_seqlens[doc])[None]
    start = state.next_position if state is not None else torch.zeros_like(valid[:, 0], dtype=torch.long)
    return (start[:, None] + valid.long().cumsum(-1) - 1).clamp(min=0)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE and grouped-query heads (no biases).

    Parameters: q_proj.weight (H*K, D), k_proj.weight (H_kv*K, D), v_proj.weight (H_kv*K, D), o_proj.weight (D, H*K).
    packed_impl: "auto" | "mask" | "flex" | "varlen", the kernel for packed documents (module docstring).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        window_size: int | None = None,
        layer_idx: int | None = None,
        packed_impl: str = "auto",
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads must be a positive multiple of num_kv_heads, got num_heads={num_heads}, "
                f"num_kv_heads={num_kv_heads}"
            )
        if head_dim < 2 or head_dim % 2 != 0:
            raise ValueError(f"head_dim must be an even integer >= 2 (RoPE), got {head_dim}")
        if window_size is not None and window_size < 1:
            raise ValueError(f"window_size must be None or >= 1, got {window_size}")
        if packed_impl not in PACKED_IMPLS:
            raise ValueError(f"packed_impl must be one of {PACKED_IMPLS}, got {packed_impl!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.window_size = window_size
        self.layer_idx = layer_idx
        self.packed_impl = packed_impl  # how packed documents (cu_seqlens) are attended: see the module docstring
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: AttentionState | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> AttentionOutput:
        """hidden_states (B, T, D); attention_mask (B, T_total) 0/1, last T columns used; cu_seqlens int64 (N+1,)
        with B == 1; state: cache from earlier calls; position_ids (B, T) overrides the RoPE positions."""
        check_hidden_states(hidden_states, self.hidden_size)
        if attention_mask is not None:
            check_binary_mask("attention_mask", attention_mask)
        batch_size, seq_len, _ = hidden_states.shape
        if cu_seqlens is not None and (batch_size != 1 or state is not None or use_cache):
            raise ValueError("cu_seqlens needs batch size 1 and no cache (state=None, use_cache=False)")
        valid = self._new_token_mask(attention_mask, batch_size, seq_len, hidden_states.device)
        positions = position_ids if position_ids is not None else new_token_positions(valid, state, cu_seqlens)
        positions = positions.to(hidden_states.device).long().expand(batch_size, seq_len)

        q = self.q_proj(hidden_states).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch_size, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch_size, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)  # (B, H, T, K)

        packed = self._packed_kernel(q, attention_mask, cu_seqlens)
        if packed is not None:  # training on packed documents: no mask of T x T, no cache
            if packed == "flex":
                out = flex_document_attention(q, k, v, cu_seqlens, self.window_size)  # (1, H, T, K)
            else:
                out = varlen_document_attention(q, k, v, cu_seqlens, self.window_size)
            out = self.o_proj(out.transpose(1, 2).reshape(batch_size, seq_len, self.num_heads * self.head_dim))
            return AttentionOutput(hidden_states=out)

        full = self._extend_state(state, k, v, valid, positions)
        groups = self.num_heads // self.num_kv_heads
        keys = full.keys.repeat_interleave(groups, dim=1)  # (B, H, T_past + T, K)
        values = full.values.repeat_interleave(groups, dim=1)
        if attention_mask is None and cu_seqlens is None and state is None and self.window_size is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)  # (B, H, T, K), fused kernels
        else:
            mask = self._attention_mask(full, positions, seq_len, cu_seqlens)  # (B, 1, T, T_past + T)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = self.o_proj(out.transpose(1, 2).reshape(batch_size, seq_len, self.num_heads * self.head_dim))
        new_state = self._trim_to_window(full) if use_cache else None
        return AttentionOutput(hidden_states=out, state=new_state)

    def _packed_kernel(self, q: torch.Tensor, attention_mask, cu_seqlens) -> str | None:
        """"flex" / "varlen" when packed documents take a fast kernel, None for the masked reference path."""
        if cu_seqlens is None or attention_mask is not None:
            return None
        impl = self.packed_impl
        if impl == "auto":
            impl = "mask"  # until "flex" is measured and tested on a GPU (module docstring)
        if impl == "varlen" and not q.is_cuda:
            raise ValueError("packed_impl='varlen' needs CUDA tensors; use 'flex' or 'mask' on other devices")
        return None if impl == "mask" else impl

    @staticmethod
    def _new_token_mask(
        attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, device: torch.device
    ) -> torch.Tensor:
        """(B, T) bool: True where the new token is real."""
        if attention_mask is None:
            return torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
            raise ValueError(
                f"attention_mask must be 2-D (B, T_total >= T) = ({batch_size}, >= {seq_len}), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        return attention_mask[:, -seq_len:].to(device=device, dtype=torch.bool)

    @staticmethod
    def _extend_state(
        state: AttentionState | None,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
    ) -> AttentionState:
        """Append the new keys/values (B, H_kv, T, K), their mask and positions (B, T) to the cache."""
        next_position = torch.where(valid, positions + 1, torch.zeros_like(positions)).amax(dim=1)
        if state is None:
            return AttentionState(k, v, valid, positions, next_position)
        next_position = torch.maximum(next_position, state.next_position)
        return AttentionState(
            keys=torch.cat((state.keys, k), dim=2),
            values=torch.cat((state.values, v), dim=2),
            key_mask=torch.cat((state.key_mask, valid), dim=1),
            key_positions=torch.cat((state.key_positions, positions), dim=1),
            next_position=next_position,
        )

    def _attention_mask(
        self,
        full: AttentionState,
        positions: torch.Tensor,
        seq_len: int,
        cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, 1, T, T_past + T) bool, True = the query may attend to the key."""
        total = full.seq_len
        past = total - seq_len
        device = positions.device
        query_index = torch.arange(past, total, device=device)[:, None]
        key_index = torch.arange(total, device=device)[None, :]
        mask = (key_index <= query_index)[None] & full.key_mask[:, None, :]  # (B, T, T_total)
        if self.window_size is not None:
            distance = positions[:, :, None] - full.key_positions[:, None, :]
            mask = mask & (distance < self.window_size)
        if cu_seqlens is not None:
            doc = document_ids(cu_seqlens, seq_len)
            mask = mask & (doc[:, None] == doc[None, :])[None]
        # Queries with nothing to attend to (pads) would give NaN; let them see everything, their output is unused.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        return mask[:, None]

    def _trim_to_window(self, state: AttentionState) -> AttentionState:
        """Drop leading cache columns that no later query can see (sliding window only)."""
        if self.window_size is None:
            return state
        needed = state.key_mask & (state.key_positions > state.next_position[:, None] - self.window_size)
        needed_columns = needed.any(dim=0).nonzero()
        first = int(needed_columns[0]) if needed_columns.numel() > 0 else state.seq_len
        if first == 0:
            return state
        return AttentionState(
            keys=state.keys[:, :, first:],
            values=state.values[:, :, first:],
            key_mask=state.key_mask[:, first:],
            key_positions=state.key_positions[:, first:],
            next_position=state.next_position,
        )
