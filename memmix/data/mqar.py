"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (Arora et al., arXiv 2312.04927).

A sequence of ``seq_len`` tokens opens with ``N`` key-value pairs ``k1 v1 k2 v2 ... kN vN``; keys come from the
lower half of the vocabulary (token 0 excluded) and values from the upper half, so the two never collide. The rest
of the sequence is ``(seq_len - 2N) // 2`` two-token slots; every key is queried once, in a slot drawn from a power
law that favours slots near the context (so most queries are close, a few are far). Two styles fill the slots:

- ``"memmix"`` (this project's original data, the CPU demo's): a query slot holds the key and then its value, and
  every other position holds a noise token drawn uniformly from the whole vocabulary;
- ``"zoology"`` (as Zoology's ``multiquery_ar`` with ``random_non_queries=True``): a query slot holds the key and
  then a noise token (the value never reappears in the input), and noise tokens never equal one of the
  sequence's own keys, so no noise bigram re-binds a key of the context before its query (Zoology's generator
  lets that happen; see docs/recall.md).

Labels follow the Hugging Face causal-LM convention: ``labels`` is aligned with ``input_ids`` and the model shifts
it, so ``labels[t]`` is the value that the logits at ``t - 1`` (the queried key) must predict. Every position that
is not the value of a query holds -100, so the loss (and the accuracy) cover query positions only.

Everything is generated from a seed with numpy's ``SeedSequence``; the train, validation and test splits draw
from different seed streams, and the held-out splits are filtered so that none of their sequences equals a train
sequence (nor, for validation, a test sequence).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from memmix.labels import IGNORE_INDEX

MQAR_STYLES = ("memmix", "zoology")
_SPLIT_CODES = {"train": 0, "test": 1}
_VALID_STREAM = 1  # the validation split: the train seed's second SeedSequence stream (spawn_key)
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

    def to(self, device: str | torch.device) -> MQARData:
        """The same examples on ``device``."""
        return MQARData(self.input_ids.to(device), self.labels.to(device), self.num_kv_pairs.to(device))


def query_positions(labels: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(n, num_queries) int64 hidden positions whose next token is a query's value, in order, for a model's
    ``loss_positions``: position p scores labels[:, p + 1]. Rows with fewer queries repeat position 0, whose next
    label (the first pair's value, context) is always -100. No host read: the caller gives num_queries (e.g. the
    largest pair count of the data)."""
    is_query = labels[:, 1:] != IGNORE_INDEX  # (n, T - 1)
    order = torch.argsort((~is_query).to(torch.int8), dim=1, stable=True)[:, :num_queries]  # queries first
    if order.shape[1] < num_queries:
        order = torch.cat([order, order.new_zeros(order.shape[0], num_queries - order.shape[1])], dim=1)
    count = is_query.sum(1, keepdim=True)
    return torch.where(torch.arange(num_queries, device=labels.device) < count, order, torch.zeros_like(order))


def max_kv_pairs(seq_len: int, vocab_size: int) -> int:
    """The most pairs a sequence can hold: every key queried once (4 tokens a pair) and distinct keys and values."""
    return min(seq_len // 4, vocab_size // 2 - 1)


def validate_mqar(seq_len: int, num_kv_pairs: int, vocab_size: int, power_a: float = 0.01,
                  style: str = "memmix") -> None:
    """Raise ValueError naming the argument when these cannot make MQAR."""
    if style not in MQAR_STYLES:
        raise ValueError(f"style must be one of {list(MQAR_STYLES)}, got {style!r}")
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


def _sample_distinct(rng: np.random.Generator, rows: int, population: int, k: int) -> np.ndarray:
    """(rows, k) uniform draws from range(population), distinct within a row, in O(k) per row (not O(population)).

    Repeats are redrawn until none is left. The procedure commutes with every relabelling of the population, so
    each ordered k-tuple of distinct values is equally likely, as in sampling without replacement.
    """
    draws = rng.integers(0, population, size=(rows, k), dtype=np.int64)
    while True:
        order = np.argsort(draws, axis=1, kind="stable")
        ranked = np.take_along_axis(draws, order, axis=1)
        repeat = np.zeros_like(draws, dtype=bool)
        np.put_along_axis(repeat, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)  # later copies only
        count = int(repeat.sum())
        if count == 0:
            return draws
        draws[repeat] = rng.integers(0, population, size=count, dtype=np.int64)


def _noise_avoiding(rng: np.random.Generator, rows: int, seq_len: int, vocab_size: int,
                    keys: np.ndarray) -> np.ndarray:
    """(rows, seq_len) tokens uniform over the vocabulary minus each row's ``keys`` (rows, n)."""
    is_key = np.zeros((rows, vocab_size), dtype=bool)
    np.put_along_axis(is_key, keys, True, axis=1)
    noise = rng.integers(0, vocab_size, size=(rows, seq_len), dtype=np.int64)
    row_of = np.broadcast_to(np.arange(rows)[:, None], noise.shape)
    while True:
        hit = is_key[row_of, noise]
        count = int(hit.sum())
        if count == 0:
            return noise
        noise[hit] = rng.integers(0, vocab_size, size=count, dtype=np.int64)


def _generate_block(rng: np.random.Generator, rows: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
                    power_a: float, style: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, seq_len) input ids and labels, every row holding ``num_kv_pairs`` pairs, in ``style``."""
    n, half = num_kv_pairs, vocab_size // 2
    distinct = _sample_distinct if style == "zoology" else _sample_without_replacement
    keys = 1 + distinct(rng, rows, half - 1, n)                                # (rows, n) in [1, half)
    values = half + distinct(rng, rows, vocab_size - half, n)                  # (rows, n) in [half, vocab)
    num_slots = (seq_len - 2 * n) // 2
    slot_log_weights = (power_a - 1.0) * np.log(np.arange(1, num_slots + 1))  # p(slot j) ~ (j + 1)^(a - 1)
    slots = _sample_without_replacement(rng, rows, num_slots, n, slot_log_weights)  # (rows, n)

    if style == "zoology":  # noise everywhere first
        input_ids = _noise_avoiding(rng, rows, seq_len, vocab_size, keys)
    else:
        input_ids = rng.integers(0, vocab_size, size=(rows, seq_len), dtype=np.int64)
    labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    input_ids[:, 0:2 * n:2] = keys
    input_ids[:, 1:2 * n:2] = values
    key_pos = 2 * n + 2 * slots                                                # (rows, n)
    np.put_along_axis(input_ids, key_pos, keys, axis=1)
    if style == "memmix":  # Zoology's value slot keeps its noise
        np.put_along_axis(input_ids, key_pos + 1, values, axis=1)
    np.put_along_axis(labels, key_pos + 1, values, axis=1)
    return input_ids, labels


def generate_mqar(num_examples: int, seq_len: int, num_kv_pairs: int | Sequence[int], vocab_size: int,
                  seed: int, power_a: float = 0.01, *, style: str = "memmix", stream: int = 0) -> MQARData:
    """``num_examples`` MQAR sequences of length ``seq_len``, a pure function of its arguments.

    num_kv_pairs: one count, or several: the examples are then split evenly between them, in shuffled order.
    style: "memmix" or "zoology" (module doc). stream: an independent random stream of the same seed (0: the
    default one; the validation split uses 1). Returns MQARData with input_ids and labels (num_examples, seq_len).
    """
    counts = [num_kv_pairs] if isinstance(num_kv_pairs, int) else list(num_kv_pairs)
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if not counts:
        raise ValueError("num_kv_pairs must name at least one count")
    for count in counts:
        validate_mqar(seq_len, count, vocab_size, power_a, style)
    if stream < 0:
        raise ValueError(f"stream must be >= 0, got {stream}")
    entropy = [seed, seq_len, vocab_size, *counts]
    rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(stream,) if stream else ()))
    per_example = rng.permutation(np.resize(np.asarray(counts, dtype=np.int64), num_examples))
    input_ids = np.empty((num_examples, seq_len), dtype=np.int64)
    labels = np.empty((num_examples, seq_len), dtype=np.int64)
    for count in sorted(set(counts)):
        rows = np.flatnonzero(per_example == count)
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start:start + _CHUNK]
            input_ids[chunk], labels[chunk] = _generate_block(rng, len(chunk), seq_len, count, vocab_size, power_a,
                                                              style)
    return MQARData(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(per_example))


def split_seed(seed: int, split: str) -> int:
    """The generator seed of ``split`` ("train" or "test"): train seeds are even, test seeds odd, so never shared.
    The validation split uses the train seed's second stream (``generate_mqar(..., stream=1)``)."""
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
    return generate_held_out(train.seq_len, num_examples, num_kv_pairs, vocab_size, seed, _row_keys(train),
                             "test", power_a, max_rounds=max_rounds)


def generate_held_out(seq_len: int, num_examples: int, num_kv_pairs: int, vocab_size: int, seed: int,
                      exclude: set[bytes], split: str, power_a: float = 0.01, style: str = "memmix",
                      max_rounds: int = 20) -> MQARData:
    """``num_examples`` sequences of the "test" or "valid" split, none in ``exclude`` (row bytes) nor repeated.

    Rows that collide are dropped and replaced from later rounds of the same stream; a ValueError is raised if
    ``max_rounds`` rounds cannot fill ``num_examples`` (the task space is too small).
    """
    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    seen = set(exclude)
    kept: list[MQARData] = []
    have = 0
    for round_idx in range(max_rounds):
        if split == "test":
            round_seed, stream = split_seed(seed, "test") + 2 * round_idx * (1 << 32), 0  # stays odd: a test seed
        else:
            round_seed, stream = split_seed(seed, "train") + 2 * round_idx * (1 << 32), _VALID_STREAM
        block = generate_mqar(num_examples, seq_len, num_kv_pairs, vocab_size, round_seed, power_a, style=style,
                              stream=stream)
        fresh = torch.tensor([row.tobytes() not in seen for row in block.input_ids.numpy()], dtype=torch.bool)
        block = block.subset(fresh.nonzero().squeeze(1))
        seen |= _row_keys(block)  # also keeps the split free of duplicates across rounds
        kept.append(block)
        have += len(block)
        if have >= num_examples:
            return _concat(kept).subset(slice(0, num_examples))
    raise ValueError(
        f"num_examples={num_examples}: only {have} {split} sequences distinct from the other splits exist for "
        f"seq_len={seq_len}, num_kv_pairs={num_kv_pairs}, vocab_size={vocab_size}; use fewer or a larger task"
    )


def _concat(parts: list[MQARData]) -> MQARData:
    return MQARData(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]),
                    torch.cat([p.num_kv_pairs for p in parts]))


@dataclass
class MQARSplits:
    """Train data per training set (a key: seq_len, or (seq_len, num_kv_pairs)); validation and test data per
    (seq_len, num_kv_pairs)."""

    train: dict
    test: dict[tuple[int, int], MQARData]
    valid: dict[tuple[int, int], MQARData] = field(default_factory=dict)


def make_mqar_splits(seq_lens: Sequence[int], num_kv_pairs: Sequence[int], vocab_size: int, num_train: int,
                     num_test: int, seed: int, power_a: float = 0.01, num_valid: int = 0,
                     style: str = "memmix") -> MQARSplits:
    """Train on every valid pair count mixed together at each seq_len; test each (seq_len, count) separately.

    A (seq_len, count) with count > max_kv_pairs(seq_len, vocab_size) is skipped; every seq_len must allow at
    least one count. num_train is per seq_len, num_test (and num_valid, 0 = no validation split) per
    (seq_len, count). The train sets are keyed by seq_len.
    """
    train_sets: dict = {}
    for seq_len in seq_lens:
        counts = [c for c in num_kv_pairs if c <= max_kv_pairs(seq_len, vocab_size)]
        if not counts:
            raise ValueError(
                f"seq_len={seq_len} fits at most {max_kv_pairs(seq_len, vocab_size)} pairs "
                f"(vocab_size={vocab_size}) but num_kv_pairs={list(num_kv_pairs)}"
            )
        train_sets[seq_len] = (seq_len, counts)
    grid = [(t, c) for t, counts in train_sets.values() for c in counts]
    return make_mqar_grid_splits(train_sets, grid, grid if num_valid else [], vocab_size, num_train, num_valid,
                                 num_test, seed, power_a, style)


def make_mqar_grid_splits(train_sets: dict, test_grid: Sequence[tuple[int, int]],
                          valid_grid: Sequence[tuple[int, int]], vocab_size: int, num_train: int, num_valid: int,
                          num_test: int, seed: int, power_a: float = 0.01, style: str = "memmix") -> MQARSplits:
    """Train, validation and test data for explicit settings.

    train_sets: key -> (seq_len, pair counts): num_train examples each, the counts mixed in equal shares (one
    count per set keeps every batch of one shape). test_grid / valid_grid: (seq_len, num_kv_pairs) settings with
    num_test / num_valid examples each. No held-out sequence equals a train sequence of its length, and no
    validation sequence equals a test sequence.
    """
    train = {key: generate_mqar(num_train, seq_len, list(counts), vocab_size, split_seed(seed, "train"), power_a,
                                style=style) for key, (seq_len, counts) in train_sets.items()}
    rows_at: dict[int, set[bytes]] = {}
    for data in train.values():
        rows_at.setdefault(data.seq_len, set()).update(_row_keys(data))
    test = {(t, n): generate_held_out(t, num_test, n, vocab_size, seed, rows_at.get(t, set()), "test", power_a,
                                      style) for t, n in test_grid}
    valid = {}
    for seq_len, count in valid_grid:
        exclude = rows_at.get(seq_len, set()) | (_row_keys(test[(seq_len, count)]) if (seq_len, count) in test
                                                 else set())
        valid[(seq_len, count)] = generate_held_out(seq_len, num_valid, count, vocab_size, seed, exclude, "valid",
                                                    power_a, style)
    return MQARSplits(train=train, test=test, valid=valid)
