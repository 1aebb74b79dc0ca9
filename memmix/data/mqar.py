"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (Arora et al., arXiv 2312.04927).

A sequence of ``seq_len`` tokens opens with ``N`` key-value pairs ``k1 v1 k2 v2 ... kN vN``; keys come from the
lower half of the vocabulary (token 0 excluded) and values from the upper half, so the two never collide. The rest
of the sequence is ``(seq_len - 2N) // 2`` two-token slots; every key is queried once, in a slot drawn from a power
law that favours slots near the context (so most queries are close, a few are far), and the slot holds the key and
then its value. Every other position holds a noise token drawn uniformly from the whole vocabulary.

Labels follow the Hugging Face causal-LM convention: ``labels`` is aligned with ``input_ids`` and the model shifts
it, so ``labels[t]`` is the value that the logits at ``t - 1`` (the queried key) must predict. Every position that
is not the value of a query holds -100, so the loss (and the accuracy) cover query positions only.

Everything is generated from a seed with numpy's ``SeedSequence``; the train and test splits draw from different
seed streams, and the test split is additionally filtered so that no test sequence equals a train sequence.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
_SPLIT_CODES = {"train": 0, "test": 1}
_CHUNK = 1024  # rows generated at once; bounds the (rows, vocab / 2) scratch matrices


@dataclass
class MQARData:
    """Examples of one sequence length.

    input_ids: (n, seq_len) int64.  labels: (n, seq_len) int64, -100 except at the values of queries.
    num_kv_pairs: (n,) int64, the number of pairs in each example.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_kv_pairs: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def subset(self, index: torch.Tensor | slice) -> MQARData:
        """The examples at ``index`` (a slice or an int64 index tensor)."""
        return MQARData(self.input_ids[index], self.labels[index], self.num_kv_pairs[index])


def max_kv_pairs(seq_len: int, vocab_size: int) -> int:
    """The most pairs a sequence can hold: every key queried once (4 tokens a pair) and distinct keys and values."""
    return min(seq_len // 4, vocab_size // 2 - 1)


def validate_mqar(seq_len: int, num_kv_pairs: int, vocab_size: int, power_a: float = 0.01) -> None:
    """Raise ValueError naming the argument when (seq_len, num_kv_pairs, vocab_size, power_a) cannot make MQAR."""
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (one key, two values and noise), got {vocab_size}")
    if seq_len < 4:
        raise ValueError(f"seq_len must be >= 4 (one pair and one query), got {seq_len}")
    if not 0.0 < power_a <= 1.0:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    limit = max_kv_pairs(seq_len, vocab_size)
    if not 1 <= num_kv_pairs <= limit:
        raise ValueError(
            f"num_kv_pairs must be in [1, {limit}] for seq_len={seq_len} and vocab_size={vocab_size} "
            f"(4 tokens per pair: pair + query; keys and values drawn without replacement from vocab halves), "
            f"got {num_kv_pairs}"
        )


def _sample_without_replacement(rng: np.random.Generator, rows: int, population: int, k: int,
                                 log_weights: np.ndarray | None = None) -> np.ndarray:
    """(rows, k) int64 draws from range(population), distinct within a row; weighted by exp(log_weights) if given.

    Top-k of Gumbel-perturbed log-weights is exactly sequential weighted sampling without replacement.
    """
    scores = rng.gumbel(size=(rows, population))
    if log_weights is not None:
        scores += log_weights
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


def _generate_block(rng: np.random.Generator, rows: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
                    power_a: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, seq_len) input ids and labels, every row holding ``num_kv_pairs`` pairs."""
    n, half = num_kv_pairs, vocab_size // 2
    keys = 1 + _sample_without_replacement(rng, rows, half - 1, n)            # (rows, n) in [1, half)
    values = half + _sample_without_replacement(rng, rows, vocab_size - half, n)  # (rows, n) in [half, vocab)
    num_slots = (seq_len - 2 * n) // 2
    slot_log_weights = (power_a - 1.0) * np.log(np.arange(1, num_slots + 1))  # p(slot j) ~ (j + 1)^(a - 1)
    slots = _sample_without_replacement(rng, rows, num_slots, n, slot_log_weights)  # (rows, n)

    input_ids = rng.integers(0, vocab_size, size=(rows, seq_len), dtype=np.int64)  # noise everywhere first
    labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    input_ids[:, 0:2 * n:2] = keys
    input_ids[:, 1:2 * n:2] = values
    key_pos = 2 * n + 2 * slots                                                # (rows, n)
    np.put_along_axis(input_ids, key_pos, keys, axis=1)
    np.put_along_axis(input_ids, key_pos + 1, values, axis=1)
    np.put_along_axis(labels, key_pos + 1, values, axis=1)
    return input_ids, labels


def generate_mqar(num_examples: int, seq_len: int, num_kv_pairs: int | Sequence[int], vocab_size: int,
                  seed: int, power_a: float = 0.01) -> MQARData:
    """``num_examples`` MQAR sequences of length ``seq_len``, a pure function of its arguments.

    num_kv_pairs: one count, or several: the examples are then split evenly between them, in shuffled order.
    Returns MQARData with input_ids and labels (num_examples, seq_len) int64.
    """
    counts = [num_kv_pairs] if isinstance(num_kv_pairs, int) else list(num_kv_pairs)
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if not counts:
        raise ValueError("num_kv_pairs must name at least one count")
    for count in counts:
        validate_mqar(seq_len, count, vocab_size, power_a)
    rng = np.random.default_rng([seed, seq_len, vocab_size, *counts])
    per_example = rng.permutation(np.resize(np.asarray(counts, dtype=np.int64), num_examples))
    input_ids = np.empty((num_examples, seq_len), dtype=np.int64)
    labels = np.empty((num_examples, seq_len), dtype=np.int64)
    for count in sorted(set(counts)):
        rows = np.flatnonzero(per_example == count)
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start:start + _CHUNK]
            input_ids[chunk], labels[chunk] = _generate_block(rng, len(chunk), seq_len, count, vocab_size, power_a)
    return MQARData(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(per_example))


def split_seed(seed: int, split: str) -> int:
    """The generator seed of ``split`` ("train" or "test"): train seeds are even, test seeds odd, so never shared."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return 2 * seed + _SPLIT_CODES[split]


def _row_keys(data: MQARData) -> set[bytes]:
    return {row.tobytes() for row in data.input_ids.numpy()}


def generate_test_split(train: MQARData, num_examples: int, num_kv_pairs: int, vocab_size: int, seed: int,
                        power_a: float = 0.01, max_rounds: int = 20) -> MQARData:
    """Test examples at ``train``'s seq_len from the test seed stream, none equal to a train sequence.

    Rows that collide with a train row are dropped and replaced from later rounds of the same stream; a
    ValueError is raised if ``max_rounds`` rounds cannot fill ``num_examples`` (the task space is too small).
    """
    seen = _row_keys(train)
    kept: list[MQARData] = []
    have = 0
    for round_idx in range(max_rounds):
        round_seed = split_seed(seed, "test") + 2 * round_idx * (1 << 32)  # stays odd: still a test seed
        block = generate_mqar(num_examples, train.seq_len, num_kv_pairs, vocab_size, round_seed, power_a)
        fresh = torch.tensor([row.tobytes() not in seen for row in block.input_ids.numpy()], dtype=torch.bool)
        block = block.subset(fresh.nonzero().squeeze(1))
        seen |= _row_keys(block)  # also keeps the test split free of duplicates across rounds
        kept.append(block)
        have += len(block)
        if have >= num_examples:
            return _concat(kept).subset(slice(0, num_examples))
    raise ValueError(
        f"num_examples={num_examples}: only {have} test sequences distinct from the train split exist for "
        f"seq_len={train.seq_len}, num_kv_pairs={num_kv_pairs}, vocab_size={vocab_size}; use fewer or a larger task"
    )


def _concat(parts: list[MQARData]) -> MQARData:
    return MQARData(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]),
                    torch.cat([p.num_kv_pairs for p in parts]))


@dataclass
class MQARSplits:
    """Train data per seq_len (a mix of pair counts) and test data per (seq_len, num_kv_pairs)."""

    train: dict[int, MQARData]
    test: dict[tuple[int, int], MQARData]


def make_mqar_splits(seq_lens: Sequence[int], num_kv_pairs: Sequence[int], vocab_size: int, num_train: int,
                     num_test: int, seed: int, power_a: float = 0.01) -> MQARSplits:
    """Train on every valid pair count mixed together at each seq_len; test each (seq_len, count) separately.

    A (seq_len, count) with count > max_kv_pairs(seq_len, vocab_size) is skipped; every seq_len must allow at
    least one count. num_train is per seq_len, num_test per (seq_len, count).
    """
    train: dict[int, MQARData] = {}
    test: dict[tuple[int, int], MQARData] = {}
    for seq_len in seq_lens:
        counts = [c for c in num_kv_pairs if c <= max_kv_pairs(seq_len, vocab_size)]
        if not counts:
            raise ValueError(
                f"seq_len={seq_len} fits at most {max_kv_pairs(seq_len, vocab_size)} pairs "
                f"(vocab_size={vocab_size}) but num_kv_pairs={list(num_kv_pairs)}"
            )
        train[seq_len] = generate_mqar(num_train, seq_len, counts, vocab_size, split_seed(seed, "train"), power_a)
        for count in counts:
            test[(seq_len, count)] = generate_test_split(train[seq_len], num_test, count, vocab_size, seed, power_a)
    return MQARSplits(train=train, test=test)
