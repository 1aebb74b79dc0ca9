from __future__ import annotations

import pytest
import torch

from memmix.data.mqar import (
    IGNORE_INDEX,
    generate_mqar,
    generate_test_split,
    make_mqar_splits,
    max_kv_pairs,
    split_seed,
    validate_mqar,
)


def _pairs(row: torch.Tensor, num_pairs: int) -> dict[int, int]:
    """key -> value of the context that opens ``row``."""
    return {int(row[2 * i]): int(row[2 * i + 1]) for i in range(num_pairs)}


@pytest.mark.parametrize("seq_len,num_kv_pairs,vocab_size", [(16, 1, 8), (64, 16, 256), (65, 7, 40), (128, [2, 5, 32], 512)])
def test_shapes_dtypes_and_counts(seq_len, num_kv_pairs, vocab_size):
    data = generate_mqar(37, seq_len, num_kv_pairs, vocab_size, seed=3)
    assert data.input_ids.shape == data.labels.shape == (37, seq_len)
    assert data.input_ids.dtype == data.labels.dtype == data.num_kv_pairs.dtype == torch.int64
    assert data.input_ids.min() >= 0 and data.input_ids.max() < vocab_size
    # every pair is queried exactly once
    assert torch.equal((data.labels != IGNORE_INDEX).sum(1), data.num_kv_pairs)
    counts = [num_kv_pairs] if isinstance(num_kv_pairs, int) else num_kv_pairs
    assert set(data.num_kv_pairs.tolist()) == set(counts)


@pytest.mark.parametrize("seed", [0, 11])
def test_every_query_is_answerable_and_keys_values_are_disjoint(seed):
    vocab_size, seq_len = 64, 96
    data = generate_mqar(50, seq_len, [1, 4, 13, 24], vocab_size, seed=seed)
    half = vocab_size // 2
    for row, labels, n in zip(data.input_ids, data.labels, data.num_kv_pairs.tolist()):
        pairs = _pairs(row, n)
        assert len(pairs) == n  # distinct keys
        assert all(1 <= k < half for k in pairs) and all(half <= v < vocab_size for v in pairs.values())
        assert len(set(pairs.values())) == n
        assert (labels[: 2 * n] == IGNORE_INDEX).all()  # no loss inside the context
        positions = (labels != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        queried = []
        for pos in positions:
            key = int(row[pos - 1])  # the model sees the key at pos - 1 and must predict labels[pos]
            assert pos > 2 * n and (pos - 2 * n) % 2 == 1  # value slot of a query after the context
            assert int(labels[pos]) == pairs[key] == int(row[pos])
            queried.append(key)
        assert sorted(queried) == sorted(pairs)


def test_query_gaps_follow_a_decaying_power_law():
    data = generate_mqar(4000, 256, 8, 256, seed=0)
    slots = ((data.labels != IGNORE_INDEX).nonzero()[:, 1] - 16 - 1) // 2  # (n * 8,) slot index after the context
    hist = torch.bincount(slots, minlength=120).float()
    assert hist[:10].sum() > hist[10:30].sum() > hist[100:120].sum() > 0


def test_deterministic_per_seed_and_seeds_differ():
    a = generate_mqar(20, 64, [4, 8], 128, seed=5)
    b = generate_mqar(20, 64, [4, 8], 128, seed=5)
    c = generate_mqar(20, 64, [4, 8], 128, seed=6)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_split_seeds_never_coincide():
    train = {split_seed(s, "train") for s in range(1000)}
    test = {split_seed(s, "test") for s in range(1000)}
    assert not train & test and len(train) == len(test) == 1000
    with pytest.raises(ValueError, match="split"):
        split_seed(0, "valid")


def test_test_split_avoids_train_sequences_where_collisions_are_likely():
    # vocab 4 has one key and two values; seq_len 5 adds one noise token: only 2 * 4 = 8 sequences exist
    train = generate_mqar(5, 5, 1, 4, seed=split_seed(0, "train"))
    train_rows = {tuple(r) for r in train.input_ids.tolist()}
    assert len(train_rows) < 8
    test = generate_test_split(train, 8 - len(train_rows), 1, 4, seed=0)
    test_rows = [tuple(r) for r in test.input_ids.tolist()]
    assert len(set(test_rows)) == len(test_rows) == 8 - len(train_rows)
    assert not train_rows.intersection(test_rows)


def test_test_split_raises_when_the_task_space_is_exhausted():
    train = generate_mqar(50, 4, 1, 4, seed=split_seed(0, "train"))  # [1, v, 1, v]: only 2 sequences
    assert len({tuple(r) for r in train.input_ids.tolist()}) == 2
    with pytest.raises(ValueError, match="num_examples"):
        generate_test_split(train, 1, 1, 4, seed=0, max_rounds=3)


def test_splits_disjoint_and_cover_the_grid():
    splits = make_mqar_splits([32, 64], [2, 8, 16], vocab_size=20, num_train=300, num_test=200, seed=1)
    assert set(splits.train) == {32, 64}
    assert set(splits.test) == {(32, 2), (32, 8), (64, 2), (64, 8)}  # 16 pairs fit neither (vocab 20: 9 keys)
    for (seq_len, n), test in splits.test.items():
        assert len(test) == 200 and (test.num_kv_pairs == n).all()
        train_rows = {tuple(r) for r in splits.train[seq_len].input_ids.tolist()}
        test_rows = [tuple(r) for r in test.input_ids.tolist()]
        assert not train_rows.intersection(test_rows)
        assert len(set(test_rows)) == len(test_rows)
    assert set(splits.train[64].num_kv_pairs.tolist()) == {2, 8}  # trained on the mix


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seq_len=63, num_kv_pairs=16, vocab_size=256), "num_kv_pairs"),  # 4 tokens a pair
        (dict(seq_len=64, num_kv_pairs=8, vocab_size=16), "num_kv_pairs"),  # only 7 keys
        (dict(seq_len=64, num_kv_pairs=0, vocab_size=256), "num_kv_pairs"),
        (dict(seq_len=3, num_kv_pairs=1, vocab_size=256), "seq_len"),
        (dict(seq_len=64, num_kv_pairs=1, vocab_size=3), "vocab_size"),
        (dict(seq_len=64, num_kv_pairs=1, vocab_size=256, power_a=0.0), "power_a"),
    ],
)
def test_validation_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_mqar(**kwargs)
    with pytest.raises(ValueError, match=match):
        generate_mqar(4, seed=0, **kwargs)


def test_max_kv_pairs_is_tight():
    assert max_kv_pairs(64, 256) == 16 and max_kv_pairs(64, 16) == 7
    generate_mqar(3, 64, 16, 256, seed=0)  # the limit itself works
    with pytest.raises(ValueError, match="num_examples"):
        generate_mqar(0, 64, 4, 256, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        make_mqar_splits([8, 64], [4], vocab_size=256, num_train=4, num_test=4, seed=0)


# ----------------------------------------------------------------------------------------------- zoology style


def _zoology_rows(num_examples, seq_len, num_kv_pairs, vocab_size, seed):
    data = generate_mqar(num_examples, seq_len, num_kv_pairs, vocab_size, seed=seed, style="zoology")
    yield from zip(data.input_ids, data.labels, data.num_kv_pairs.tolist())


@pytest.mark.parametrize("seq_len,num_kv_pairs,vocab_size", [(64, 4, 8192), (256, 64, 8192), (1024, 256, 8192),
                                                             (32, 7, 16), (65, [1, 5], 40)])
def test_zoology_style_hides_the_value_and_noise_never_repeats_a_key(seq_len, num_kv_pairs, vocab_size):
    half = vocab_size // 2
    for row, labels, n in _zoology_rows(20, seq_len, num_kv_pairs, vocab_size, seed=4):
        pairs = _pairs(row, n)
        assert len(pairs) == n and len(set(pairs.values())) == n
        assert all(1 <= k < half for k in pairs) and all(half <= v < vocab_size for v in pairs.values())
        positions = (labels != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert sorted(int(row[p - 1]) for p in positions) == sorted(pairs)  # each key queried once, after the pairs
        assert all(p > 2 * n and (p - 2 * n) % 2 == 1 for p in positions)
        assert all(int(labels[p]) == pairs[int(row[p - 1])] for p in positions)
        key_positions = {i for i in range(2 * n) if i % 2 == 0} | {p - 1 for p in positions}
        for i, token in enumerate(row.tolist()):
            if i not in key_positions:
                assert token not in pairs  # a key appears only in its pair and in its query
        # Zoology's query slot holds the key and then noise: the value is not shown again (sometimes noise
        # equals it by chance, never always)
    shown = sum(int(row[p]) == int(labels[p]) for row, labels, _ in _zoology_rows(50, seq_len, num_kv_pairs,
                                                                                  vocab_size, seed=5)
                for p in (labels != IGNORE_INDEX).nonzero().squeeze(1).tolist())
    queries = sum(n for *_, n in _zoology_rows(50, seq_len, num_kv_pairs, vocab_size, seed=5))
    assert shown < 0.3 * queries


def test_zoology_style_noise_is_uniform_over_the_vocabulary_without_the_keys():
    data = generate_mqar(400, 64, 2, 16, seed=1, style="zoology")
    counts = torch.zeros(16)
    for row, labels in zip(data.input_ids, data.labels):
        keys = {int(row[0]), int(row[2])}
        query_keys = {p - 1 for p in (labels != IGNORE_INDEX).nonzero().squeeze(1).tolist()}
        for i in range(4, 64):
            if i not in query_keys:
                counts[int(row[i])] += 1
        assert not keys & {int(row[i]) for i in range(4, 64) if i not in query_keys}
    share = counts / counts.sum()
    assert share.min() > 0.5 / 16 and share.max() < 1.5 / 16  # every token, keys included, shows up as noise


def test_distinct_sampler_is_uniform_over_ordered_tuples():
    import numpy as np

    from memmix.data.mqar import _sample_distinct

    draws = _sample_distinct(np.random.default_rng(0), 30_000, 4, 2)  # 12 ordered pairs of distinct values
    assert (draws[:, 0] != draws[:, 1]).all()
    counts = np.bincount(draws[:, 0] * 4 + draws[:, 1], minlength=16).reshape(4, 4)
    off_diagonal = counts[~np.eye(4, dtype=bool)]
    assert np.diag(counts).sum() == 0 and off_diagonal.min() > 0.9 * 2500 and off_diagonal.max() < 1.1 * 2500


def test_zoology_query_gaps_follow_the_power_law():
    data = generate_mqar(3000, 256, 8, 8192, seed=0, style="zoology")
    slots = ((data.labels != IGNORE_INDEX).nonzero()[:, 1] - 16 - 1) // 2
    hist = torch.bincount(slots, minlength=120).float()
    assert hist[:10].sum() > hist[10:30].sum() > hist[100:120].sum() > 0


def test_style_is_validated():
    with pytest.raises(ValueError, match="style"):
        generate_mqar(2, 16, 2, 16, seed=0, style="based")


def test_memmix_style_is_unchanged_by_the_new_arguments():
    a = generate_mqar(30, 32, [2, 4], 64, seed=2)
    b = generate_mqar(30, 32, [2, 4], 64, seed=2, style="memmix", stream=0)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    c = generate_mqar(30, 32, [2, 4], 64, seed=2, stream=1)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize("style", ["memmix", "zoology"])
def test_grid_splits_one_shape_per_training_set_and_three_disjoint_splits(style):
    from memmix.data.mqar import make_mqar_grid_splits

    train_sets = {(16, 2): (16, [2]), (32, 4): (32, [4])}
    splits = make_mqar_grid_splits(train_sets, [(16, 2), (64, 5)], [(16, 2), (32, 4)], vocab_size=12,
                                   num_train=60, num_valid=20, num_test=20, seed=3, style=style)
    assert {k: (len(v), v.seq_len, set(v.num_kv_pairs.tolist())) for k, v in splits.train.items()} == {
        (16, 2): (60, 16, {2}), (32, 4): (60, 32, {4})}
    assert set(splits.test) == {(16, 2), (64, 5)} and set(splits.valid) == {(16, 2), (32, 4)}
    rows = {split: {tuple(r) for d in getattr(splits, split).values() for r in d.input_ids.tolist()}
            for split in ("train", "valid", "test")}
    assert not rows["train"] & rows["valid"] and not rows["train"] & rows["test"] and not rows["valid"] & rows["test"]
    for (seq_len, n), data in splits.valid.items():
        assert len(data) == 20 and data.seq_len == seq_len and (data.num_kv_pairs == n).all()


def test_product_splits_with_validation_keep_train_and_test_as_before():
    before = make_mqar_splits([16, 32], [2, 4], vocab_size=32, num_train=50, num_test=10, seed=1)
    after = make_mqar_splits([16, 32], [2, 4], vocab_size=32, num_train=50, num_test=10, seed=1, num_valid=10)
    for key in before.train:
        assert torch.equal(before.train[key].input_ids, after.train[key].input_ids)
    for key in before.test:
        assert torch.equal(before.test[key].input_ids, after.test[key].input_ids)
    assert set(after.valid) == set(after.test) and not before.valid
