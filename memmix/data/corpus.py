"""Load a corpus for training or evaluation from any supported data path."""
from __future__ import annotations

from memmix.errors import InputError
from memmix.data.packing import TokenCorpus, tokenize_documents
from memmix.data.shards import open_shards
from memmix.data.sources import TextSource, detect_format, iter_documents
from memmix.data.tokenizer import tokenizer_spec_name


def load_corpus(
    path: str,
    tokenizer,
    tokenizer_spec: str = "byte",
    source: TextSource = TextSource(),
    verify_shards: bool = True,
) -> TokenCorpus:
    """Token shards are memory-mapped (and checked against the tokenizer); text is tokenised in memory, read as
    `source` says (memmix.data.sources.TextSource)."""
    if not path:
        raise InputError("no training data given: pass a text file/folder, JSONL, dataset or shards", "data")
    fmt = detect_format(path) if source.data_format == "auto" else source.data_format
    if fmt == "shards":
        return _corpus_from_shards(path, tokenizer, tokenizer_spec, verify_shards)
    documents = iter_documents(path, source)
    tokens, offsets = tokenize_documents(documents, tokenizer)
    if len(tokens) == 0:
        raise InputError(f"data '{path}' holds no text (every document is empty); pass a path with text in it")
    return TokenCorpus([(tokens, offsets)], tokenizer_spec_name(tokenizer_spec), tokenizer.vocab_size, path)


def _corpus_from_shards(path: str, tokenizer, tokenizer_spec: str, verify: bool) -> TokenCorpus:
    shards = open_shards(path, verify)
    meta = shards[0].meta
    name = tokenizer_spec_name(tokenizer_spec)
    if meta["tokenizer_fingerprint"] != tokenizer.fingerprint or meta["vocab_size"] != tokenizer.vocab_size:
        raise InputError(
            f"shards at '{path}' were tokenised with '{meta['tokenizer']}' (vocab {meta['vocab_size']}) but "
            f"--tokenizer '{name}' is another vocabulary (vocab {tokenizer.vocab_size}); pass the tokenizer the "
            "shards were made with, or re-run `memmix prepare`"
        )
    parts = [(s.tokens, s.doc_offsets) for s in shards]
    corpus = TokenCorpus(parts, meta["tokenizer"], meta["vocab_size"], path, meta, [s.path for s in shards])
    if corpus.num_tokens == 0:
        raise InputError(f"shards at '{path}' hold no tokens; re-run `memmix prepare` on non-empty data")
    return corpus
