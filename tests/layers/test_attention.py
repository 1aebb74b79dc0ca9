"""CausalSelfAttention against a per-query loop reference: RoPE, GQA, window, cache, padding, packing."""
from __future__ import annotations

import math

import pytest
import torch

from memmix.layers.attention import CausalSelfAttention

TOL = dict(rtol=1e-10, atol=1e-12)
D = 24


def make_layer(seed: int = 0, num_heads: int = 4, num_kv_heads: int = 2, window_size=None) -> CausalSelfAttention:
    torch.manual_seed(seed)
    layer = CausalSelfAttention(D, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=6,
                                rope_theta=500.0, window_size=window_size).double()
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.3)
    return layer


def rope_reference(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + K/2]) of one (K,) vector by position * theta^(-2i/K)."""
    half = x.shape[-1] // 2
    out = x.clone()
    for i in range(half):
        angle = position * theta ** (-2 * i / x.shape[-1])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def attention_reference(layer: CausalSelfAttention, x: torch.Tensor, window=None) -> torch.Tensor:
    """One unpadded sequence x (T, D) -> (T, D) with explicit loops over heads and queries."""
    T = x.shape[0]
    H, Hkv, K = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = (x @ layer.q_proj.weight.T).view(T, H, K)
    k = (x @ layer.k_proj.weight.T).view(T, Hkv, K)
    v = (x @ layer.v_proj.weight.T).view(T, Hkv, K)
    out = torch.zeros(T, H, K, dtype=x.dtype)
    for h in range(H):
        kv_head = h // (H // Hkv)
        for i in range(T):
            qi = rope_reference(q[i, h], i, layer.rope_theta)
            keys = [j for j in range(i + 1) if window is None or i - j < window]
            scores = torch.stack([qi @ rope_reference(k[j, kv_head], j, layer.rope_theta) for j in keys]) / math.sqrt(K)
            weights = scores.softmax(0)
            out[i, h] = sum(w * v[j, kv_head] for w, j in zip(weights, keys))
    return out.reshape(T, H * K) @ layer.o_proj.weight.T


@pytest.mark.parametrize("num_kv_heads, window", [(4, None), (2, None), (1, 3)], ids=["mha", "gqa", "mqa-window"])
def test_forward_matches_loop_reference_values_and_gradients(num_kv_heads, window):
    layer = make_layer(seed=1, num_kv_heads=num_kv_heads, window_size=window)
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    out = layer(x).hidden_states
    expected = torch.stack([attention_reference(layer, x[b], window) for b in range(2)])
    torch.testing.assert_close(out, expected, **TOL)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("window", [None, 3])
def test_cached_steps_reproduce_full_forward(window):
    layer = make_layer(seed=2, window_size=window)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    full = layer(x).hidden_states
    out = layer(x[:, :4], use_cache=True)
    state, steps = out.state, [out.hidden_states]
    for t in range(4, 11):
        out = layer(x[:, t : t + 1], state=state, use_cache=True)
        state = out.state
        steps.append(out.hidden_states)
        if window is not None:
            assert state.seq_len <= window  # the cache keeps only what later queries can see
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    assert state.next_position.tolist() == [11, 11]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_and_continues(side):
    layer = make_layer(seed=3, window_size=4)
    lengths = [3, 8, 6]
    seqs = [torch.randn(n, D, dtype=torch.float64) for n in lengths]
    x = torch.randn(3, 8, D, dtype=torch.float64)  # pads hold random values: only the mask may hide them
    mask = torch.zeros(3, 8, dtype=torch.long)
    for b, seq in enumerate(seqs):
        cols = slice(8 - len(seq), 8) if side == "left" else slice(0, len(seq))
        x[b, cols], mask[b, cols] = seq, 1
    out = layer(x, attention_mask=mask, use_cache=True)
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(out.hidden_states[b][mask[b].bool()], layer(seq[None]).hidden_states[0], **TOL)
    if side == "left":  # decoding after a left-padded prefill continues each sequence
        nxt = torch.randn(3, 1, D, dtype=torch.float64)
        step = layer(nxt, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                     state=out.state, use_cache=True).hidden_states
        for b, seq in enumerate(seqs):
            alone = layer(torch.cat([seq, nxt[b]])[None]).hidden_states[0, -1]
            torch.testing.assert_close(step[b, 0], alone, **TOL)


def test_packed_documents_equal_separate_forwards():
    layer = make_layer(seed=4, window_size=5)
    lengths = [4, 1, 7, 3]
    docs = [torch.randn(n, D, dtype=torch.float64) for n in lengths]
    cu_seqlens = torch.tensor([0, 4, 5, 12, 15])
    out = layer(torch.cat(docs)[None], cu_seqlens=cu_seqlens).hidden_states[0]
    for doc, start, end in zip(docs, cu_seqlens[:-1], cu_seqlens[1:]):
        torch.testing.assert_close(out[start:end], layer(doc[None]).hidden_states[0], **TOL)


def test_rope_is_relative_position_ids_shift_changes_nothing():
    layer = make_layer(seed=5)
    x = torch.randn(1, 6, D, dtype=torch.float64)
    shifted = layer(x, position_ids=torch.arange(6)[None] + 37).hidden_states
    torch.testing.assert_close(shifted, layer(x).hidden_states, **TOL)
    assert not torch.allclose(layer(x, position_ids=torch.arange(6).flip(0)[None]).hidden_states, shifted)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="num_heads must be a positive multiple of num_kv_heads"):
        CausalSelfAttention(D, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be an even integer"):
        CausalSelfAttention(D, num_heads=2, head_dim=5)
    with pytest.raises(ValueError, match="window_size must be None or >= 1"):
        CausalSelfAttention(D, num_heads=2, window_size=0)
    layer = make_layer()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="cu_seqlens needs batch size 1"):
        layer(x, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D \(B, T_total >= T\)"):
        layer(x, attention_mask=torch.ones(2, 4))


# ------------------------------------------------------------------------------------ packed documents, fast paths

import warnings  # noqa: E402

import torch.nn.attention.flex_attention as flex_module  # noqa: E402

import torch.nn.attention.varlen as varlen_module  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memmix.layers import attention as attention_module  # noqa: E402
from memmix.layers.attention import document_block_mask, varlen_document_attention  # noqa: E402
from memmix.host_syncs import find_host_syncs  # noqa: E402


def document_causal_mask(cu_seqlens: torch.Tensor, T: int, window=None) -> torch.Tensor:
    """(T, T) bool: query i sees key j of its own document with j <= i (and i - j < window)."""
    doc = torch.searchsorted(cu_seqlens[1:], torch.arange(T), right=True)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (doc[:, None] == doc[None, :]) & (j <= i)
    return mask & (i - j < window) if window is not None else mask


def blocks_as_dense(num: torch.Tensor, indices: torch.Tensor, nb: int) -> torch.Tensor:
    """BlockMask's ordered (count, indices) of one row set -> (nb, nb) bool of the listed blocks."""
    dense = torch.zeros(nb, nb, dtype=torch.bool)
    for row in range(nb):
        dense[row, indices[0, 0, row, : num[0, 0, row]].long()] = True
    return dense


def kernel_view(block_mask, T: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a flex kernel attends: full blocks whole, partial blocks through mask_mod, nothing else.
    Returns (the (T, T) mask, partial blocks (nb, nb), full blocks (nb, nb))."""
    nb = -(-T // block)
    partial = blocks_as_dense(block_mask.kv_num_blocks, block_mask.kv_indices, nb)
    full = blocks_as_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nb)
    qb, kb = torch.arange(T)[:, None] // block, torch.arange(T)[None, :] // block
    mod = block_mask.mask_mod(0, 0, torch.arange(T)[:, None], torch.arange(T)[None, :])
    return full[qb, kb] | (partial[qb, kb] & mod), partial, full


def random_cu_seqlens(gen: torch.Generator, T: int) -> torch.Tensor:
    """Documents of random lengths (1 up to T) filling T tokens."""
    bounds, pos = [0], 0
    while pos < T:
        pos = min(T, pos + int(torch.randint(1, max(2, T // 3), (1,), generator=gen)))
        bounds.append(pos)
    return torch.tensor(bounds)


PACKINGS = {
    "odd_lengths_and_length_1": ([0, 5, 6, 13, 14, 23], 23),
    "three_rows_of_8_cut_at_row_ends": ([0, 3, 8, 16, 17, 20, 24], 24),
    "one_document": ([0, 17], 17),
    "every_document_length_1": (list(range(10)), 9),
    "empty_document_entry": ([0, 4, 4, 11], 11),
}


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("packing", list(PACKINGS) + ["random_0", "random_1", "random_2"])
def test_document_block_mask_is_the_document_causal_mask_and_lists_only_needed_blocks(packing, window, block):
    if packing.startswith("random"):
        gen = torch.Generator().manual_seed(100 + int(packing[-1]) + 7 * block + (window or 0))
        T = int(torch.randint(block, 6 * block, (1,), generator=gen))
        cu_seqlens = random_cu_seqlens(gen, T)
    else:
        bounds, T = PACKINGS[packing]
        cu_seqlens = torch.tensor(bounds)
    block_mask = document_block_mask(cu_seqlens, T, window, block_size=block)
    seen, partial, full = kernel_view(block_mask, T, block)
    expected = document_causal_mask(cu_seqlens, T, window)
    assert torch.equal(seen, expected)
    qb, kb = torch.arange(T)[:, None] // block, torch.arange(T)[None, :] // block
    nb = -(-T // block)
    any_pair = torch.zeros(nb, nb, dtype=torch.long).index_put_((qb.expand(T, T), kb.expand(T, T)), expected.long(),
                                                                 accumulate=True)
    assert not (partial & full).any()
    assert (any_pair[partial | full] > 0).all()  # no tile of keys the queries cannot see is computed
    assert ((partial | full) == (any_pair > 0)).all()  # and every tile they can see is


def make_packed_layer(impl: str, seed: int, num_kv_heads: int = 2, window=None) -> CausalSelfAttention:
    layer = make_layer(seed=seed, num_kv_heads=num_kv_heads, window_size=window)
    layer.packed_impl = impl
    return layer


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """Let flex_attention's eager (dense, float64-capable) reference differentiate on the CPU: torch refuses CPU
    backward only in this device check; its eager backward is the plain math the CUDA kernels are tested against.
    The block structure the kernels use is tested separately (test_document_block_mask_...)."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        warnings.filterwarnings("ignore", message=".*_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG.*")
        yield


@pytest.mark.parametrize("num_kv_heads, window", [(4, None), (2, None), (1, 4)], ids=["mha", "gqa", "mqa-window"])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_flex_matches_masked_reference_values_and_gradients(flex_backward_on_cpu, num_kv_heads, window, seed):
    gen = torch.Generator().manual_seed(200 + seed)
    T = 37
    cu_seqlens = random_cu_seqlens(gen, T) if seed else torch.tensor([0, 6, 7, 20, 21, 37])
    fast = make_packed_layer("flex", seed=10 + seed, num_kv_heads=num_kv_heads, window=window)
    reference = make_packed_layer("mask", seed=10 + seed, num_kv_heads=num_kv_heads, window=window)
    x = torch.randn(1, T, D, dtype=torch.float64, generator=gen, requires_grad=True)
    out = fast(x, cu_seqlens=cu_seqlens).hidden_states
    expected = reference(x, cu_seqlens=cu_seqlens).hidden_states
    torch.testing.assert_close(out, expected, **TOL)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(out, [x, *fast.parameters()], grad_out)
    expected_grads = torch.autograd.grad(expected, [x, *reference.parameters()], grad_out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **TOL)


def test_packed_rows_equal_separate_rows_on_the_flex_path(flex_backward_on_cpu):
    """B rows of L tokens cut at row ends (memmix train's micro-batch) give each row's own forward."""
    layer = make_packed_layer("flex", seed=6)
    rows = torch.randn(3, 9, D, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 4, 9, 18, 19, 27])  # row 0 holds two documents, row 2 a length-1 one and the rest
    out = layer(rows.reshape(1, 27, D), cu_seqlens=cu_seqlens).hidden_states[0]
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        alone = layer(rows.reshape(27, D)[start:end][None]).hidden_states[0]
        torch.testing.assert_close(out[start:end], alone, **TOL)


@pytest.mark.parametrize("impl", ["auto", "flex"])
def test_padding_and_cached_decoding_keep_the_reference_path(impl):
    """packed_impl only concerns cu_seqlens: padded batches and KV-cache decoding are unchanged by it."""
    layer, reference = make_packed_layer(impl, seed=7, window=4), make_packed_layer("mask", seed=7, window=4)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    assert torch.equal(layer(x, attention_mask=mask).hidden_states, reference(x, attention_mask=mask).hidden_states)
    out, ref = layer(x[:, :5], use_cache=True), reference(x[:, :5], use_cache=True)
    step = layer(x[:, 5:6], state=out.state, use_cache=True).hidden_states
    assert torch.equal(step, reference(x[:, 5:6], state=ref.state, use_cache=True).hidden_states)


def test_auto_is_the_reference_until_flex_is_measured_on_a_gpu():
    layer, reference = make_packed_layer("auto", seed=8), make_packed_layer("mask", seed=8)
    x, cu_seqlens = torch.randn(1, 12, D, dtype=torch.float64), torch.tensor([0, 5, 12])
    assert torch.equal(layer(x, cu_seqlens=cu_seqlens).hidden_states,
                       reference(x, cu_seqlens=cu_seqlens).hidden_states)


def test_flex_path_reads_nothing_back_to_the_host(monkeypatch):
    """The layer's packed path (block mask, RoPE positions, projections) and its backward: no host read.
    find_host_syncs's dispatch mode cannot see inside the flex_attention higher-order op, so a stand-in of the
    same shapes takes its place here; flex's own kernels read nothing back (they take the block mask as tensors)."""
    monkeypatch.setattr(flex_module, "flex_attention", lambda q, k, v, block_mask, enable_gqa: q * 1.5)
    layer = make_packed_layer("flex", seed=9)
    x, cu_seqlens = torch.randn(1, 40, D, dtype=torch.float64), torch.tensor([0, 3, 4, 29, 40])
    assert find_host_syncs(lambda: layer(x, cu_seqlens=cu_seqlens).hidden_states.sum().backward()) == []
    assert find_host_syncs(lambda: document_block_mask(cu_seqlens, 40, 5, block_size=8)) == []


def documents_attention(q, k, v, cu_seq_q, left: int) -> torch.Tensor:
    """varlen_attn's documented semantics, one document at a time: q (T, H, K), k / v (T, H, K); key j is seen by
    query i of its document when j <= i and (left < 0 or i - j <= left)."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        n = end - start
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        mask = (j <= i) & ((i - j <= left) if left >= 0 else True)
        out[start:end] = F.scaled_dot_product_attention(
            *(x[start:end].transpose(0, 1) for x in (q, k, v)), attn_mask=mask).transpose(0, 1)
    return out


def new_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1),
                    enable_gqa=False):
    assert cu_seq_q.dtype == torch.int32 and max_q >= int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    assert window_size[1] == 0 and (enable_gqa or query.shape[1] == key.shape[1])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return documents_attention(query, key, value, cu_seq_q, window_size[0])


def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    assert is_causal and query.shape[1] == key.shape[1]
    return documents_attention(query, key, value, cu_seq_q, -1)


@pytest.fixture
def fresh_varlen_signature():
    """The wrapper caches varlen_attn's signature; stand-ins have their own."""
    attention_module._varlen_parameters.cache_clear()
    yield
    attention_module._varlen_parameters.cache_clear()


@pytest.mark.parametrize("kernel", [new_varlen_attn, old_varlen_attn], ids=["window_size_api", "is_causal_api"])
@pytest.mark.parametrize("num_kv_heads, window", [(4, None), (2, None), (1, 4)], ids=["mha", "gqa", "mqa-window"])
def test_varlen_wrapper_passes_documents_layout_heads_and_window(monkeypatch, fresh_varlen_signature, kernel,
                                                                num_kv_heads, window):
    """The CUDA kernel cannot run here; a stand-in with its documented semantics checks what the wrapper hands it:
    (T, H, K) layout, int32 offsets, a length bound, GQA, and the window as flash counts it (window - 1 keys)."""
    monkeypatch.setattr(varlen_module, "varlen_attn", kernel)
    gen = torch.Generator().manual_seed(num_kv_heads)
    T, cu_seqlens = 29, torch.tensor([0, 6, 7, 20, 29])
    q = torch.randn(1, 4, T, 6, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(1, num_kv_heads, T, 6, dtype=torch.float64, generator=gen) for _ in range(2))
    if kernel is old_varlen_attn and window is not None:
        with pytest.raises(ValueError, match="with a window needs a torch whose varlen_attn takes window_size"):
            varlen_document_attention(q, k, v, cu_seqlens, window)
    else:
        mask = document_causal_mask(cu_seqlens, T, window)
        groups = 4 // num_kv_heads
        expected = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                                  attn_mask=mask)
        torch.testing.assert_close(varlen_document_attention(q, k, v, cu_seqlens, window), expected, **TOL)


def test_invalid_packed_impl_raises():
    with pytest.raises(ValueError, match="packed_impl must be one of"):
        CausalSelfAttention(D, num_heads=2, packed_impl="flash")
    layer = make_packed_layer("varlen", seed=0)
    with pytest.raises(ValueError, match="packed_impl='varlen' needs CUDA tensors"):
        layer(torch.randn(1, 5, D, dtype=torch.float64), cu_seqlens=torch.tensor([0, 5]))
