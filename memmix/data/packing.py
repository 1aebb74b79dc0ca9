"""Token corpora and packing into fixed-length rows whose document boundaries become `cu_seqlens`.

A corpus is cut into rows of `seq_len` consecutive tokens (the tail shorter than a row is dropped).
A micro-batch of B rows is packed into ONE sequence of B*seq_len tokens, with `cu_seqlens` marking
every document start inside a row and every row end, so the model resets its memories at both and
never predicts across them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from memmix.errors import InputError


@dataclass
class TokenCorpus:
    """Token arrays with their document offsets: shards (memory-mapped) or tokenised text (in memory)."""

    parts: list[tuple[np.ndarray, np.ndarray]]  # [(tokens (T,), doc_offsets (D+1,)), ...]
    tokenizer: str
    vocab_size: int
    source: str = ""
    meta: dict = field(default_factory=dict)
    part_paths: list[str] = field(default_factory=list)  # the shard file of each part (empty for text)

    @property
    def num_tokens(self) -> int:
        return sum(len(tokens) for tokens, _ in self.parts)

    @property
    def num_docs(self) -> int:
        return sum(len(offsets) - 1 for _, offsets in self.parts)

    def fingerprint(self) -> str:
        """'<tokens>:<crc32>' of the token stream: a resume checks that it reads the data its run read. Shards
        give their header checksums (no pass over the tokens); text tokenised in memory is checksummed here."""
        import zlib

        crc = 0
        for index, (tokens, offsets) in enumerate(self.parts):
            if self.part_paths:
                from memmix.data.shards import read_header

                crc = zlib.crc32(str(read_header(self.part_paths[index])["tokens_crc32"]).encode(), crc)
            else:
                crc = zlib.crc32(np.ascontiguousarray(tokens).tobytes(), crc)
            crc = zlib.crc32(np.ascontiguousarray(offsets).tobytes(), crc)
        return f"{self.num_tokens}:{crc:08x}"

    def documents(self) -> Iterable[np.ndarray]:
        """Each document's tokens, in order."""
        for tokens, offsets in self.parts:
            for start, end in zip(offsets[:-1], offsets[1:]):
                yield np.asarray(tokens[int(start) : int(end)])


def tokenize_documents(documents: Iterable[str], tokenizer, append_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (tokens int32 (T,), doc_offsets int64 (D+1,)); each document ends with EOS if `append_eos`."""
    pieces, offsets = [], [0]
    eos = np.asarray([tokenizer.eos_token_id], dtype=np.int32) if append_eos and tokenizer.eos_token_id is not None else None
    for text in documents:
        ids = tokenizer.encode(text)
        if eos is not None:
            ids = np.concatenate([ids, eos])
        if len(ids):
            pieces.append(ids)
            offsets.append(offsets[-1] + len(ids))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return tokens, np.asarray(offsets, dtype=np.int64)


@dataclass
class PackedRows:
    """Rows of `seq_len` tokens cut from a corpus, each with the positions where a document starts."""

    corpus: TokenCorpus
    seq_len: int

    def __post_init__(self):
        if self.seq_len < 2:
            raise InputError(f"must be >= 2, got {self.seq_len}", "seq_len")
        self.rows_per_part = [len(tokens) // self.seq_len for tokens, _ in self.corpus.parts]
        self.first_row = np.concatenate([[0], np.cumsum(self.rows_per_part)]).astype(np.int64)
        if self.num_rows == 0:
            raise InputError(f"data '{self.corpus.source}' has {self.corpus.num_tokens} tokens, fewer than one row of "
                             f"{self.seq_len}; lower it or add data", "seq_len")

    @property
    def num_rows(self) -> int:
        return int(self.first_row[-1])

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (tokens int64 (seq_len,), doc_starts int64 (k,): positions in (0, seq_len) where a document starts)."""
        part = int(np.searchsorted(self.first_row, index, side="right")) - 1
        tokens, offsets = self.corpus.parts[part]
        start = (index - int(self.first_row[part])) * self.seq_len
        end = start + self.seq_len
        row = np.asarray(tokens[start:end], dtype=np.int64)
        if row.size and int(row.max()) >= self.corpus.vocab_size:  # unverified shards: damaged tokens
            self._out_of_range(part, start, row)
        lo, hi = np.searchsorted(offsets, [start, end], side="right")
        doc_starts = np.asarray(offsets[lo:hi], dtype=np.int64) - start
        doc_starts = doc_starts[(doc_starts > 0) & (doc_starts < self.seq_len)]
        return row, doc_starts


    def _out_of_range(self, part: int, start: int, row: np.ndarray) -> None:
        position = int(np.argmax(row >= self.corpus.vocab_size))
        where = self.corpus.part_paths[part] if self.corpus.part_paths else self.corpus.source
        raise InputError(f"shard '{where}' has corrupt tokens: token {start + position} is id {int(row[position])}, "
                         f"outside the vocabulary of {self.corpus.vocab_size}; delete '{where}' and re-run "
                         "`memmix prepare` (the token checksum, skipped by --no-verify-shards, finds such damage "
                         "when the shards are opened)")


def pack_rows(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """B rows -> (input_ids int64 (1, B*L), cu_seqlens int64 (N+1,)) with boundaries at doc starts and row ends."""
    bounds, offset = [0], 0
    for tokens, doc_starts in rows:
        bounds.extend((doc_starts + offset).tolist())
        offset += len(tokens)
        bounds.append(offset)
    input_ids = torch.from_numpy(np.concatenate([tokens for tokens, _ in rows])).unsqueeze(0)
    return input_ids, torch.tensor(bounds, dtype=torch.int64)


def pad_bounds(cu_seqlens: torch.Tensor, minimum: int = 8) -> torch.Tensor:
    """cu_seqlens (N+1,) repeated at its end up to the next power of two >= max(N+1, minimum) entries: empty documents
    that change nothing, so batches come in few shapes (a captured CUDA graph needs static shapes). The micro-batches
    of one step, given the same minimum (their largest N+1), come out the same length."""
    length = 1 << (max(minimum, cu_seqlens.numel()) - 1).bit_length()
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(length - cu_seqlens.numel())])


class RowOrder:
    """Which corpus row is the k-th one consumed: epoch after epoch, each a seeded permutation (or in order)."""

    def __init__(self, num_rows: int, seed: int = 0, shuffle: bool = True):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self._epoch, self._perm = -1, None

    def __getitem__(self, k: int) -> int:
        epoch, pos = divmod(k, self.num_rows)
        if not self.shuffle:
            return pos
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return int(self._perm[pos])


class BatchSource:
    """Micro-batches for data-parallel training, addressed by a global count of rows consumed.

    One optimiser step consumes `world_size * grad_accum * micro_batch_size` rows. Micro-batch `a` of
    rank `r` takes rows starting at `rows_consumed + (a * world_size + r) * micro_batch_size`, so the
    data seen depends only on `rows_consumed` (saved in checkpoints) and the step size, not on the
    world size a run was started with.
    """

    def __init__(self, rows: PackedRows, micro_batch_size: int, seed: int = 0, shuffle: bool = True):
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.order = RowOrder(rows.num_rows, seed, shuffle)

    def micro_batch(self, rows_consumed: int, micro_index: int, rank: int, world_size: int):
        """-> (input_ids (1, B*L), cu_seqlens (N+1,)) for one rank's micro-batch."""
        first = rows_consumed + (micro_index * world_size + rank) * self.micro_batch_size
        picked = [self.rows.row(self.order[k]) for k in range(first, first + self.micro_batch_size)]
        return pack_rows(picked)
