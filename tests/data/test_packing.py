import numpy as np
import pytest
import torch

from memmix.errors import InputError
from memmix.data.packing import BatchSource, PackedRows, RowOrder, TokenCorpus, pack_rows


def _corpus(seed: int, doc_lengths_per_part: list[list[int]]) -> TokenCorpus:
    rng = np.random.default_rng(seed)
    parts = []
    for lengths in doc_lengths_per_part:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        parts.append((rng.integers(0, 100, size=int(offsets[-1])).astype(np.uint16), offsets))
    return TokenCorpus(parts, "byte", 257, "test")


def _doc_id_per_token(corpus: TokenCorpus) -> list[np.ndarray]:
    return [np.repeat(np.arange(len(off) - 1), np.diff(off)) for _, off in corpus.parts]


@pytest.mark.parametrize("seq_len", [2, 5, 8])
def test_rows_and_document_starts_match_brute_force(seq_len):
    corpus = _corpus(seq_len, [[3, 1, 9, 4], [7, 7, 2]])
    rows = PackedRows(corpus, seq_len)
    doc_ids = _doc_id_per_token(corpus)
    expected_rows = [(p, r) for p, (tok, _) in enumerate(corpus.parts) for r in range(len(tok) // seq_len)]
    assert rows.num_rows == len(expected_rows)
    for index, (part, r) in enumerate(expected_rows):
        tokens, starts = rows.row(index)
        span = slice(r * seq_len, (r + 1) * seq_len)
        np.testing.assert_array_equal(tokens, corpus.parts[part][0][span])
        ids = doc_ids[part][span]
        assert starts.tolist() == [i for i in range(1, seq_len) if ids[i] != ids[i - 1]]


def test_pack_rows_puts_boundaries_at_documents_and_row_ends():
    rows = [(np.arange(6), np.array([2, 5])), (np.arange(6, 12), np.array([], dtype=np.int64)), (np.arange(12, 18), np.array([1]))]
    input_ids, cu_seqlens = pack_rows(rows)
    assert input_ids.shape == (1, 18) and input_ids.dtype == torch.int64
    assert input_ids[0].tolist() == list(range(18))
    assert cu_seqlens.tolist() == [0, 2, 5, 6, 12, 13, 18]


def test_row_order_is_a_permutation_per_epoch_and_reproducible():
    order = RowOrder(7, seed=3)
    first, second = [order[k] for k in range(7)], [order[k] for k in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7))
    assert first != second  # a fresh permutation each epoch (probability of a tie is 1/5040)
    assert [RowOrder(7, seed=3)[k] for k in range(14)] == first + second
    assert [RowOrder(7, shuffle=False)[k] for k in range(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]


def test_batch_source_covers_the_same_rows_for_any_world_size():
    rows = PackedRows(_corpus(0, [[50, 30, 40]]), seq_len=4)

    def rows_of_step(world, accum, micro):
        src = BatchSource(rows, micro, seed=1)
        seen = []
        for a in range(accum):
            for r in range(world):
                ids, _ = src.micro_batch(48, a, r, world)
                seen += ids.view(-1, 4).tolist()
        return sorted(seen)

    reference = rows_of_step(1, 1, 8)
    assert rows_of_step(2, 2, 2) == reference
    assert rows_of_step(4, 1, 2) == reference
    assert rows_of_step(1, 4, 2) == reference


def test_too_little_data_is_an_input_error():
    with pytest.raises(InputError, match="fewer than one row"):
        PackedRows(_corpus(0, [[3, 2]]), seq_len=8)


def test_a_token_outside_the_vocabulary_is_an_input_error_naming_the_shard():
    """Damaged shards read with --no-verify-shards stop with an input error, not an IndexError in the embedding."""
    import pytest

    from memmix.errors import InputError
    from memmix.data.packing import PackedRows, TokenCorpus

    good = (np.arange(8, dtype=np.uint16), np.array([0, 8]))
    bad = (np.array([1, 2, 3, 999, 4, 5, 6, 7], dtype=np.uint16), np.array([0, 8]))
    rows = PackedRows(TokenCorpus([good, bad], "byte", 300, "shards/", part_paths=["s0.mmtok", "s1.mmtok"]), 4)
    assert rows.row(0)[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(InputError, match=r"shard 's1.mmtok' has corrupt tokens: token 3 is id 999, outside the "
                                         r"vocabulary of 300; delete 's1.mmtok' and re-run `memmix prepare`"):
        rows.row(2)
