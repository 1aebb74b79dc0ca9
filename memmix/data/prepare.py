"""`memmix prepare`: tokenise documents once into binary shards (see memmix.data.shards)."""
from __future__ import annotations

import os

import numpy as np

from memmix.errors import InputError
from memmix.files import atomic_replace_dir, check_outputs_apart, check_writable
from memmix.progress import progress_bar
from memmix.data.shards import RECORD_NAME, SHARD_SUFFIX, ShardWriter, write_record
from memmix.data.sources import TextSource, iter_documents
from memmix.data.tokenizer import tokenizer_spec_name


def prepare_shards(
    data: str,
    out_dir: str,
    tokenizer,
    tokenizer_spec: str = "byte",
    source: TextSource = TextSource(),
    shard_tokens: int = 100_000_000,
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Tokenise every document of `data` (EOS appended, read as `source` says: memmix.data.sources.TextSource) into
    `out_dir/shard_00000.mmtok`, ... Returns the paths.

    A shard is closed once it holds >= `shard_tokens` tokens (documents are never split). The folder is built
    beside `out_dir`, completed with its record (memmix.data.shards.write_record) and swapped in whole: an error, a
    Ctrl-C or a kill leaves the old `out_dir` (or none), never a mix.
    """
    if shard_tokens < 1:
        raise InputError(f"must be >= 1, got {shard_tokens}", "shard_tokens")
    reason = check_writable(out_dir, is_dir=True)
    if reason:
        raise InputError(reason, "out_dir")
    check_outputs_apart({"out_dir": (out_dir, True)}, {"data": data, "tokenizer": tokenizer_spec})
    _check_replaceable(out_dir, overwrite)
    name = tokenizer_spec_name(tokenizer_spec)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    bar = progress_bar(None, "tokenising", "doc", progress)
    names: list[str] = []

    def fill(staging: str) -> None:
        written, writer, tokens_done = [], None, 0
        try:
            for text in iter_documents(data, source):
                ids = np.concatenate([tokenizer.encode(text), np.asarray(eos, dtype=np.int32)])
                if writer is None:
                    path = os.path.join(staging, f"shard_{len(written):05d}{SHARD_SUFFIX}")
                    writer = ShardWriter(path, tokenizer.vocab_size, name, tokenizer.eos_token_id,
                                         tokenizer.fingerprint)
                writer.add_document(ids)
                tokens_done += len(ids)
                bar.set_postfix(tokens=f"{tokens_done:,}", shards=len(written) + 1, refresh=False)
                bar.update(1)
                if writer.num_tokens >= shard_tokens:
                    written.append(writer.close())
                    writer = None
            if writer is not None:
                written.append(writer.close())
                writer = None
        except BaseException:
            if writer is not None:  # an error mid-shard: close the partial file (its folder is dropped)
                writer.abort()
            raise
        if not written:
            raise InputError(f"data '{data}' holds no documents; nothing was written")
        write_record(staging, written, data)
        names.extend(os.path.basename(p) for p in written)

    try:
        atomic_replace_dir(out_dir, fill)
    except OSError as err:  # disk full, a file that vanished: one line, the old folder untouched
        raise InputError(f"could not write the shards of '{out_dir}' ({err.strerror or err}); nothing was changed",
                         "out_dir") from None
    bar.close()  # not on an error: its last line would come after the error's
    return [os.path.join(out_dir, n) for n in names]


def _check_replaceable(out_dir: str, overwrite: bool) -> None:
    """--out is replaced whole: it must be new, empty, or (with overwrite) a folder of shards."""
    if not os.path.isdir(out_dir):
        return
    entries = [e for e in os.listdir(out_dir) if not e.startswith(".")]
    shards = [e for e in entries if e.endswith(SHARD_SUFFIX) or e == RECORD_NAME]
    if shards and not overwrite:
        count = sum(e.endswith(SHARD_SUFFIX) for e in entries)
        raise InputError(f"'{out_dir}' already holds {count} shards; pass overwrite (--overwrite) or another "
                         "folder", "out_dir")
    others = [e for e in entries if e not in shards]
    if others:
        raise InputError(f"'{out_dir}' holds other files (e.g. '{others[0]}'), and prepare replaces the whole "
                         "folder; pass a new or empty folder", "out_dir")
