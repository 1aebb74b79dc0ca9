"""Mixed-modal recall data: two MQAR streams in disjoint vocabularies, interleaved in alternating segments."""
from __future__ import annotations

import pytest
import torch

from memmix.data.mixed_recall import (
    generate_mixed_recall,
    make_mixed_recall_splits,
    modality_vocab,
    validate_mixed_recall,
)
from memmix.data.mqar import generate_mqar
from memmix.labels import IGNORE_INDEX

CASES = [dict(seq_len=32, num_kv_pairs=2, vocab_size=16, num_segments=3),
         dict(seq_len=64, num_kv_pairs=8, vocab_size=64, num_segments=1),
         dict(seq_len=24, num_kv_pairs=1, vocab_size=9, num_segments=6)]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_each_modality_is_an_mqar_stream_in_its_own_vocabulary(case):
    data = generate_mixed_recall(7, seed=3, **case)
    length, half = case["seq_len"] // 2, case["vocab_size"] // 2
    for m in range(2):
        low, high = modality_vocab(m, case["vocab_size"])
        where = data.modality_ids == m
        assert (where.sum(1) == length).all()
        tokens = data.input_ids[where].view(7, length)
        assert ((tokens >= low) & (tokens < high)).all()
        stream = generate_mqar(7, length, case["num_kv_pairs"], half, 2 * 3 + m)
        torch.testing.assert_close(tokens - low, stream.input_ids, rtol=0, atol=0)
        labels = data.labels[where].view(7, length)
        shifted = torch.where(stream.labels == IGNORE_INDEX, stream.labels, stream.labels + low)
        torch.testing.assert_close(labels, shifted)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_segments_alternate_and_queries_stay_inside_their_modality(case):
    data = generate_mixed_recall(9, seed=4, **case)
    changes = (data.modality_ids[:, 1:] != data.modality_ids[:, :-1]).sum(1)
    assert (changes == 2 * case["num_segments"] - 1).all()  # 2K non-empty segments, modalities alternating
    assert (data.modality_ids[:, 0] == 0).any() and (data.modality_ids[:, 0] == 1).any()  # either may lead
    rows, cols = (data.labels != IGNORE_INDEX).nonzero(as_tuple=True)
    assert len(rows) == 9 * 2 * case["num_kv_pairs"]
    assert (data.modality_ids[rows, cols - 1] == data.modality_ids[rows, cols]).all()  # key right before its value
    for r, c in zip(rows.tolist(), cols.tolist()):
        key, value = data.input_ids[r, c - 1], data.labels[r, c]
        first = (data.input_ids[r] == key).nonzero()[0, 0]  # the pair: the key's first appearance
        assert data.input_ids[r, first + 1] == value and data.input_ids[r, c] == value


def test_generation_is_a_pure_function_of_the_seed():
    a = generate_mixed_recall(5, 32, 2, 16, seed=0)
    b = generate_mixed_recall(5, 32, 2, 16, seed=0)
    c = generate_mixed_recall(5, 32, 2, 16, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.modality_ids, b.modality_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_splits_mix_pair_counts_and_keep_test_rows_out_of_train():
    train, test = make_mixed_recall_splits(32, [1, 3], 16, num_train=41, num_test=10, seed=0, num_segments=2)
    assert len(train) == 41 and sorted(test) == [1, 3]
    queries = (train.labels != IGNORE_INDEX).sum(1)
    assert sorted(set(queries.tolist())) == [2, 6]  # 2 modalities x pairs
    seen = {row.tobytes() for row in train.input_ids.numpy()}
    for count, block in test.items():
        assert len(block) == 10 and ((block.labels != IGNORE_INDEX).sum(1) == 2 * count).all()
        assert not any(row.tobytes() in seen for row in block.input_ids.numpy())


@pytest.mark.parametrize("args, match", [
    (dict(seq_len=30), "seq_len must be a multiple of 4"),
    (dict(vocab_size=6), "vocab_size must be >= 8"),
    (dict(num_segments=9), r"num_segments must be in \[1, seq_len // 4 = 8\]"),
    (dict(num_segments=0), "num_segments"),
    (dict(num_segments=True), "num_segments"),  # a bool is no count
    (dict(num_kv_pairs=4), r"num_kv_pairs must be in \[1, 3\]"),
])
def test_bad_settings_name_the_argument(args, match):
    kwargs = dict(seq_len=32, num_kv_pairs=2, vocab_size=16, num_segments=2) | args
    with pytest.raises(ValueError, match=match):
        validate_mixed_recall(**kwargs)
