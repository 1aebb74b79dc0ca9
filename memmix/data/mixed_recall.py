"""Mixed-modal associative recall: two MQAR streams in two token spaces, interleaved in segments.

A sequence of ``seq_len`` tokens holds two modalities of ``seq_len // 2`` tokens each. Modality 0 ("text") uses
token ids [0, V/2) and modality 1 ("image") uses [V/2, 2 * (V/2)) for V = ``vocab_size``: two disjoint vocabularies.
Each modality's tokens form an MQAR sequence of its own (``memmix.data.mqar``: ``num_kv_pairs`` key-value pairs,
then queries of every key, noise elsewhere) over its half of the vocabulary. Each modality's stream is cut into
``num_segments`` segments at even positions (a pair or a query never straddles a cut) and the two modalities'
segments alternate: ``a0 b0 a1 b1 ...``, the first modality drawn per example. Queries are answered inside their
own modality: the key of a query is always directly followed by its value.

``modality_ids`` gives each position's modality, as the model's ``modality_ids`` input. Labels follow the
Hugging Face causal-LM convention as in MQAR: ``labels[t]`` is a query's value (the logits at ``t - 1`` must predict
it), -100 elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memmix.checks import is_int
from memmix.data.mqar import generate_mqar, max_kv_pairs, split_seed
from memmix.labels import IGNORE_INDEX

MODALITIES = ("text", "image")


@dataclass
class MixedRecallData:
    """input_ids, labels, modality_ids: (n, seq_len) int64 each (labels -100 except at the values of queries)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    modality_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def subset(self, index: torch.Tensor | slice) -> MixedRecallData:
        """The examples at ``index`` (a slice or an int64 index tensor)."""
        return MixedRecallData(self.input_ids[index], self.labels[index], self.modality_ids[index])

    def to(self, device: str | torch.device) -> MixedRecallData:
        """The same examples on ``device``."""
        return MixedRecallData(self.input_ids.to(device), self.labels.to(device), self.modality_ids.to(device))


def modality_vocab(modality: int, vocab_size: int) -> tuple[int, int]:
    """[low, high) token ids of ``modality`` (0 or 1): the two halves of the vocabulary."""
    half = vocab_size // 2
    return modality * half, (modality + 1) * half


def max_mixed_kv_pairs(seq_len: int, vocab_size: int) -> int:
    """The most pairs per modality: MQAR's limit on one modality's stream (seq_len / 2 tokens, vocab_size / 2 ids)."""
    return max_kv_pairs(seq_len // 2, vocab_size // 2)


def validate_mixed_recall(seq_len: int, num_kv_pairs: int, vocab_size: int, num_segments: int) -> None:
    """Raise ValueError naming the argument when these cannot make a mixed-modal recall task."""
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8 (two halves of >= 4 ids), got {vocab_size}")
    if seq_len < 8 or seq_len % 4:
        raise ValueError(f"seq_len must be a multiple of 4 and >= 8 (two even-length modality streams), got {seq_len}")
    if not is_int(num_segments) or not 1 <= num_segments <= seq_len // 4:
        raise ValueError(
            f"num_segments must be in [1, seq_len // 4 = {seq_len // 4}] (segments of >= 2 tokens), got {num_segments}"
        )
    limit = max_mixed_kv_pairs(seq_len, vocab_size)
    if not 1 <= num_kv_pairs <= limit:
        raise ValueError(
            f"num_kv_pairs must be in [1, {limit}] per modality for seq_len={seq_len}, vocab_size={vocab_size} "
            f"(each modality has seq_len/2 tokens and vocab_size/2 ids), got {num_kv_pairs}"
        )


def _segment_of_positions(rng: np.random.Generator, rows: int, length: int, num_segments: int) -> np.ndarray:
    """(rows, length) segment index of every position of a stream cut at num_segments - 1 random even positions."""
    candidates = np.arange(2, length, 2)  # interior even cut points
    pick = rng.random((rows, len(candidates))).argsort(axis=1)[:, : num_segments - 1]
    cuts = np.sort(candidates[pick], axis=1)  # (rows, num_segments - 1)
    return (cuts[:, None, :] <= np.arange(length)[None, :, None]).sum(-1)


def _interleave(segments: list[np.ndarray], first: np.ndarray) -> np.ndarray:
    """(rows, 2L) gather index putting the two streams' segments in turn, ``first`` (rows,) 0/1 leading.

    segments: per modality (rows, L) segment of each position. The streams are laid side by side
    (stream m occupies columns [m L, (m + 1) L)); a stable sort on
    (segment, turn of the modality) keeps each segment's tokens in order."""
    turn = [np.where(first[:, None] == m, 0, 1) for m in range(2)]  # (rows, 1): 0 if modality m leads
    key = np.concatenate([2 * segments[m] + turn[m] for m in range(2)], axis=1)  # (rows, 2L)
    return np.argsort(key, axis=1, kind="stable")


def generate_mixed_recall(num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int, seed: int,
                          num_segments: int = 4, power_a: float = 0.01) -> MixedRecallData:
    """``num_examples`` mixed-modal recall sequences, a pure function of its arguments (see the module doc)."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    validate_mixed_recall(seq_len, num_kv_pairs, vocab_size, num_segments)
    length, half = seq_len // 2, vocab_size // 2
    ids, labels = [], []
    for modality in range(2):
        stream = generate_mqar(num_examples, length, num_kv_pairs, half, 2 * seed + modality, power_a)
        offset = modality_vocab(modality, vocab_size)[0]
        ids.append(stream.input_ids.numpy() + offset)
        labels.append(np.where(stream.labels.numpy() == IGNORE_INDEX, IGNORE_INDEX, stream.labels.numpy() + offset))
    rng = np.random.default_rng([seed, seq_len, vocab_size, num_kv_pairs, num_segments])
    segments = [_segment_of_positions(rng, num_examples, length, num_segments) for _ in range(2)]
    first = rng.integers(0, 2, size=num_examples)
    order = _interleave(segments, first)  # (n, seq_len)
    modality = [np.full((num_examples, length), m, dtype=np.int64) for m in range(2)]

    def gather(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.take_along_axis(np.concatenate(parts, axis=1), order, axis=1))

    return MixedRecallData(gather(ids), gather(labels), gather(modality))


def _row_keys(data: MixedRecallData) -> set[bytes]:
    return {row.tobytes() for row in data.input_ids.numpy()}


def make_mixed_recall_splits(seq_len: int, num_kv_pairs: list[int], vocab_size: int, num_train: int, num_test: int,
                             seed: int, num_segments: int = 4) -> tuple[MixedRecallData, dict[int, MixedRecallData]]:
    """Train data (the pair counts mixed, in equal shares) and test data per pair count, no test row equal to a
    train row. Train and test come from MQAR's split seeds (never shared)."""
    counts = sorted(set(num_kv_pairs))
    shares = [num_train // len(counts) + (i < num_train % len(counts)) for i in range(len(counts))]
    parts = [generate_mixed_recall(n, seq_len, c, vocab_size, split_seed(seed, "train"), num_segments)
             for c, n in zip(counts, shares) if n > 0]
    train = _concat(parts)
    shuffle = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    train = train.subset(shuffle)
    seen = _row_keys(train)
    test = {}
    for count in counts:
        block = generate_mixed_recall(num_test + num_test // 10 + 1, seq_len, count, vocab_size,
                                      split_seed(seed, "test"), num_segments)
        fresh = torch.tensor([row.tobytes() not in seen for row in block.input_ids.numpy()])
        block = block.subset(fresh.nonzero().squeeze(1))
        if len(block) < num_test:
            raise ValueError(f"num_test={num_test}: too few test sequences distinct from the train split for "
                             f"num_kv_pairs={count}; use a larger vocab_size or seq_len")
        test[count] = block.subset(slice(0, num_test))
    return train, test


def _concat(parts: list[MixedRecallData]) -> MixedRecallData:
    fields = ("input_ids", "labels", "modality_ids")
    return MixedRecallData(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))
