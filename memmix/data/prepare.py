"""`memmix prepare`: tokenise documents once into binary shards (see memmix.data.shards)."""
from __future__ import annotations

import os

import numpy as np

from memmix.errors import InputError
from memmix.files import check_writable
from memmix.progress import progress_bar
from memmix.data.shards import SHARD_SUFFIX, ShardWriter
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

    A shard is closed once it holds >= `shard_tokens` tokens (documents are never split).
    """
    if shard_tokens < 1:
        raise InputError(f"must be >= 1, got {shard_tokens}", "shard_tokens")
    reason = check_writable(out_dir, is_dir=True)
    if reason:
        raise InputError(reason, "out_dir")
    existing = [f for f in os.listdir(out_dir) if f.endswith(SHARD_SUFFIX)] if os.path.isdir(out_dir) else []
    if existing and not overwrite:
        raise InputError(f"'{out_dir}' already holds {len(existing)} shards; pass overwrite (--overwrite) or another "
                         "folder", "out_dir")
    name = tokenizer_spec_name(tokenizer_spec)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    written, writer, tokens_done = [], None, 0
    bar = progress_bar(None, "tokenising", "doc", progress)
    try:
        for text in iter_documents(data, source):
            ids = np.concatenate([tokenizer.encode(text), np.asarray(eos, dtype=np.int32)])
            if writer is None:
                os.makedirs(out_dir, exist_ok=True)
                path = os.path.join(out_dir, f"shard_{len(written):05d}{SHARD_SUFFIX}")
                writer = ShardWriter(path, tokenizer.vocab_size, name, tokenizer.eos_token_id, tokenizer.fingerprint)
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
        if writer is not None:  # an error mid-shard: drop the partial file
            writer.abort()
        raise
    bar.close()  # not on an error: its last line would come after the error's
    if not written:
        raise InputError(f"data '{data}' holds no documents; nothing was written")
    _remove_stale_shards(out_dir, written)
    return written


def _remove_stale_shards(out_dir: str, keep: list[str]) -> None:
    """With --overwrite, shards from an older, longer run must not stay behind next to the new ones."""
    keep_names = {os.path.basename(p) for p in keep}
    for name in os.listdir(out_dir):
        if name.endswith(SHARD_SUFFIX) and name not in keep_names:
            os.remove(os.path.join(out_dir, name))
