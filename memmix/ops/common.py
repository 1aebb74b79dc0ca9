"""Shared plumbing for the memory-rule ops: validation, varlen padding, impl dispatch, chunk helpers.

Every rule in this package is called the same way (flash-linear-attention layout):
q, k: (B, T, H, K); v: (B, T, H, V); g: (B, T, H) log decay; beta: (B, T, H);
states (N, H, K, V); with `cu_seqlens` (int, length N + 1) B must be 1 and the T axis packs N sequences.

`run_rule` validates the arguments once, picks an implementation, brings the inputs to the compute dtype
(float32, or float64 for float64 inputs), pads a packed batch into one row per sequence and hands a
rule's core function (its registry record's `recurrent` or `chunk`) plain dense tensors:

    core(q, k, v, g, beta, state) -> (o, final_state)
    q, k: (N, L, H, K) (q already normalised and scaled); v: (N, L, H, V); g, beta: (N, L, H) or None;
    state: (N, H, K, V).

Padding tokens have k = v = g = beta = 0, which leaves every state untouched, so a core never needs
to know about sequence lengths.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from memmix.ops.dtypes import compute_dtype
from memmix.ops.normalize import l2norm
from memmix.ops.registry import MemoryRule, get_rule

IMPLS = ("auto", "recurrent", "chunk", "triton")
CHUNK_SIZE = 64
# On CPU, "auto" runs the step loop for sequences this short (decode steps, tiny prompts); measured
# crossover with "chunk" at B=1, H=4, K=V=64: T ~ 8-12.
RECURRENT_MAX_LEN = 8


def log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, dtype: Optional[torch.dtype] = None
              ) -> torch.Tensor:
    """The gated rules' log decay per head, g = -exp(A_log) * softplus(a + dt_bias): a (..., H); A_log, dt_bias (H,).
    In `dtype` (default: a's dtype, at least float32)."""
    dtype = dtype or compute_dtype(a.dtype)
    return -A_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype))


# --------------------------------------------------------------------------- validation

def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_cu_seqlens_structure(cu_seqlens, batch: int) -> None:
    """Checks on cu_seqlens that need no host sync: tensor, 1-D, integer, B == 1, N >= 1."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of length N + 1")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must have an integer dtype (torch.int64 or torch.int32), got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens requires a packed batch with B == 1, got B = {batch}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must have length N + 1 >= 2 (at least one sequence)")


def cu_seqlens_bounds(cu_seqlens: torch.Tensor, seq_len: int) -> list[int]:
    """cu_seqlens as a Python list, its values checked (the single host sync of the PyTorch varlen path)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if bounds[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at T = {seq_len}, got {bounds[-1]}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError("cu_seqlens must be non-decreasing")
    return bounds


def validate_inputs(q, k, v, g, beta, *, scale, initial_state, cu_seqlens, impl,
                    needs_g: bool, needs_beta: bool, low_memory: bool = False) -> None:
    """Check every argument of a rule without syncing the host (cu_seqlens' values: cu_seqlens_bounds).

    Raises ValueError naming the offending argument and what it may be.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (B, T, H, K) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (B, T, H, V) with (B, T, H) = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    for name, x, needed in (("g", g, needs_g), ("beta", beta, needs_beta)):
        if not needed:
            continue
        _check_tensor(name, x, 3)
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} must have shape (B, T, H) = {tuple(q.shape[:3])}, got {tuple(x.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be None or a number, got {type(scale).__name__}")
    if not isinstance(low_memory, bool):
        raise ValueError(f"low_memory must be True or False, got {low_memory!r}")
    if cu_seqlens is not None:
        _check_cu_seqlens_structure(cu_seqlens, B)
    num_seqs = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        if tuple(initial_state.shape) != (num_seqs, H, K, V):
            raise ValueError(f"initial_state must have shape (N, H, K, V) = {(num_seqs, H, K, V)} "
                             f"(N = number of sequences), got {tuple(initial_state.shape)}")
    tensors = [("q", q), ("k", k), ("v", v), ("g", g if needs_g else None),
               ("beta", beta if needs_beta else None), ("initial_state", initial_state),
               ("cu_seqlens", cu_seqlens)]
    for name, x in tensors:
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")


# --------------------------------------------------------------------------- impl dispatch

def resolve_impl(impl: str, rule: MemoryRule, q: torch.Tensor, v: Optional[torch.Tensor] = None) -> str:
    """Turn "auto" into a concrete implementation of `rule` (its registry record) for inputs q (B, T, H, K) and
    v (B, T, H, V) (default: q).

    auto: CUDA -> "triton" where a backend registered a chunk kernel for the rule and the kernel fits the inputs
          (Kernel.fits: dtype, head widths), else "chunk";
          other devices -> "recurrent" for T <= RECURRENT_MAX_LEN (decode steps), else "chunk".
    """
    if impl != "auto":
        return impl
    if q.device.type == "cuda":
        kernel = rule.chunk_kernel
        v = q if v is None else v
        fits = kernel is not None and kernel.fits(q, v, head_dim=max(q.shape[-1], v.shape[-1]))
        return "triton" if fits else "chunk"
    return "recurrent" if q.shape[1] <= RECURRENT_MAX_LEN else "chunk"


# --------------------------------------------------------------------------- varlen padding

def _segment_index(bounds: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed token: (its sequence id, its position inside that sequence), both (T,) int64."""
    cu = torch.tensor(bounds, dtype=torch.long, device=device)
    lengths = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=device), lengths)  # (T,)
    pos = torch.arange(bounds[-1], device=device) - cu[seq_id]  # (T,)
    return seq_id, pos


def pad_packed(x: Optional[torch.Tensor], index: tuple[torch.Tensor, torch.Tensor], num_seqs: int,
               max_len: int) -> Optional[torch.Tensor]:
    """(1, T, ...) packed -> (N, max_len, ...) zero-padded, one row per sequence (differentiable)."""
    if x is None:
        return None
    out = x.new_zeros((num_seqs, max_len) + tuple(x.shape[2:]))
    return out.index_put(index, x[0])


def unpad_packed(x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(N, max_len, ...) padded -> (1, T, ...) packed."""
    return x[index].unsqueeze(0)


# --------------------------------------------------------------------------- chunk helpers

def fit_chunk_size(chunk_size: int, seq_len: int, rows: int = 1) -> int:
    """The chunk size for `rows` independent (sequence, head) rows of seq_len tokens: chunk_size, or the power of
    two >= seq_len (at least 8) when that is smaller, so that short inputs do not pay for (C, C) intra-chunk
    matrices mostly made of padding. Pass rows = N * H on the CPU: the intra-chunk work grows as rows * T * C while
    the sequential pass costs a fixed overhead per chunk, so many rows favour small chunks (measured on one core:
    81 x 4 rows of 64 tokens, C = 16 took half the time of C = 64; one row of 2048 tokens was fastest at 64)."""
    if rows > 64:
        chunk_size = min(chunk_size, 16)
    elif rows > 16:
        chunk_size = min(chunk_size, 32)
    return min(chunk_size, max(8, 1 << max(seq_len - 1, 0).bit_length()))


def cpu_rows(x: torch.Tensor) -> int:
    """N * H of an (N, L, H, ...) input on the CPU (for fit_chunk_size), 1 elsewhere."""
    return x.shape[0] * x.shape[2] if x.device.type == "cpu" else 1


def split_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N, L, H, ...) -> (N, H, NC, C, ...), zero-padded at the end to NC * C >= L tokens."""
    N, L, H = x.shape[:3]
    pad = (-L) % chunk_size
    if pad:
        x = torch.cat([x, x.new_zeros((N, pad) + tuple(x.shape[2:]))], dim=1)
    x = x.reshape((N, (L + pad) // chunk_size, chunk_size) + tuple(x.shape[2:]))  # (N, NC, C, H, ...)
    return x.movedim(3, 1)


def merge_chunks(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(N, H, NC, C, D) -> (N, seq_len, H, D), dropping the padding split_chunks added."""
    N, H, NC, C, D = x.shape
    return x.movedim(1, 3).reshape(N, NC * C, H, D)[:, :seq_len]


def chunk_log_decay(g: Optional[torch.Tensor], chunked_q: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Cumulative log decay inside each chunk, b_i = g_1 + ... + g_i: (N, L, H) -> (N, H, NC, C).

    chunked_q: (N, H, NC, C, K), the query already split; g None (no decay) gives zeros.
    """
    if g is None:
        return chunked_q.new_zeros(chunked_q.shape[:4])
    return split_chunks(g, chunk_size).cumsum(-1)


def causal_decay(b: torch.Tensor) -> torch.Tensor:
    """exp(b_i - b_j) for j <= i, 0 above the diagonal: (..., C) -> (..., C, C).

    The upper triangle is masked before exp, so positive exponents never overflow.
    """
    C = b.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    return (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()


# --------------------------------------------------------------------------- the runner

def run_rule(name: str, q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
             low_memory, impl):
    """Validate, dispatch and run the memory rule `name` (the public ops' entry); see run_checked.

    Raises ValueError naming the first bad argument (validate_inputs)."""
    rule = get_rule(name)
    validate_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, impl=impl,
                    needs_g=rule.uses_gate, needs_beta=rule.uses_beta, low_memory=low_memory)
    return run_checked(rule, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                       low_memory=low_memory, impl=impl)


def run_checked(rule: MemoryRule, q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                cu_seqlens=None, use_qk_l2norm=False, low_memory=False, impl="auto"):
    """Dispatch and run `rule` on arguments a caller has already checked (the MoM mixer validates its own inputs
    once); see the module docstring for the core contract.

    g / beta are None for rules without decay / without beta. low_memory: the Triton kernel runs one head at a
    time, forward and backward (least memory); the PyTorch paths ignore it.
    Returns (o (B, T, H, V) in v's dtype, final_state (N, H, K, V) float32/float64 or None).
    The Triton path gets the arguments as given and never syncs the host, so there the values of
    cu_seqlens (start 0, end T, non-decreasing) are the caller's promise; the PyTorch paths check them.
    impl="triton" where the kernel cannot run: RuntimeError naming the alternatives (the kernel's runs_on decides:
    CUDA tensors, or CPU ones under Triton's interpreter in kernel tests).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = resolve_impl(impl, rule, q, v)
    if impl == "triton":
        if rule.chunk_kernel is None:
            raise RuntimeError(f"impl='triton': no kernel is registered for {rule.name!r} (memmix.ops.triton "
                               "provides the delta rules when Triton is installed); use impl='chunk' or 'recurrent' "
                               "(or 'auto')")
        if not rule.chunk_kernel.runs_on(q):
            raise RuntimeError(f"impl='triton' needs CUDA tensors, got device {q.device}; "
                               "use impl='chunk' or 'recurrent' (or 'auto')")
        return rule.chunk_kernel.fn(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                    use_qk_l2norm=use_qk_l2norm, low_memory=low_memory)

    core = rule.recurrent if impl == "recurrent" else rule.chunk
    o, state = _run_pytorch(core, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                            cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)
    return o, (state if output_final_state else None)


def _run_pytorch(core, q, k, v, g, beta, *, scale: float, initial_state, cu_seqlens, use_qk_l2norm):
    """Compute dtype, l2norm and scale, varlen padding around a core; returns (o in v's dtype, state)."""
    bounds = None if cu_seqlens is None else cu_seqlens_bounds(cu_seqlens, q.shape[1])
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    q, k, v, g, beta = (None if x is None else x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale

    B, T, H, K = q.shape
    num_seqs = B if bounds is None else len(bounds) - 1
    state = (q.new_zeros(num_seqs, H, K, v.shape[-1]) if initial_state is None
             else initial_state.to(dtype))
    if bounds is not None:
        index = _segment_index(bounds, q.device)
        max_len = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        q, k, v, g, beta = (pad_packed(x, index, num_seqs, max_len) for x in (q, k, v, g, beta))

    if q.shape[1] == 0:  # nothing to run: empty output, untouched state
        o, state = v.new_zeros(v.shape), state.clone()
    else:
        o, state = core(q, k, v, g, beta, state)
    if bounds is not None:
        o = unpad_packed(o, index)
    return o.to(out_dtype), state
