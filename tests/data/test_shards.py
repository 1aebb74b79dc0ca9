import os

import numpy as np
import pytest

from memmix.cli import main
from memmix.data.corpus import load_corpus
from memmix.errors import InputError
from memmix.data.prepare import prepare_shards
from memmix.data.shards import HEADER_BYTES, ShardWriter, TokenShard, open_shards
from memmix.data.tokenizer import ByteTokenizer


def _write(path, docs, vocab_size=300, tokenizer="byte"):
    writer = ShardWriter(str(path), vocab_size, tokenizer, eos_token_id=None)
    for doc in docs:
        writer.add_document(np.asarray(doc))
    return writer.close()


@pytest.mark.parametrize("vocab_size, dtype", [(300, np.uint16), (70000, np.uint32)])
def test_shard_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(vocab_size)
    docs = [rng.integers(0, vocab_size, size=n) for n in (5, 1, 17)]
    path = _write(tmp_path / "a.mmtok", docs, vocab_size)
    shard = TokenShard.open(path)
    assert shard.tokens.dtype == dtype
    assert shard.doc_offsets.tolist() == [0, 5, 6, 23]
    np.testing.assert_array_equal(shard.tokens, np.concatenate(docs))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def _flip_byte(path, position):
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_shards_are_detected(tmp_path):
    docs = [np.arange(50) % 300, np.arange(30)]
    cases = {"tokens": lambda p: _flip_byte(p, HEADER_BYTES + 10),
             "truncated": lambda p: os.truncate(p, os.path.getsize(p) - 8),
             "header": lambda p: _flip_byte(p, 2),
             "offsets": lambda p: _flip_byte(p, os.path.getsize(p) - 3)}
    messages = {"tokens": "checksum", "truncated": "truncated", "header": "not a memmix token shard",
                "offsets": "offsets|truncated|checksum"}
    for name, damage in cases.items():
        path = _write(tmp_path / f"{name}.mmtok", docs)
        TokenShard.open(path)
        damage(path)
        with pytest.raises(InputError, match=messages[name]):
            TokenShard.open(path)


def test_shards_of_different_tokenizers_in_one_folder_are_refused(tmp_path):
    from memmix.data.shards import write_record

    paths = [_write(tmp_path / "a.mmtok", [np.arange(10)], 300, "byte"),
             _write(tmp_path / "b.mmtok", [np.arange(10)], 50257, "gpt2")]
    write_record(str(tmp_path), paths, "by hand")
    with pytest.raises(InputError, match="disagree"):
        open_shards(str(tmp_path))


def test_prepare_splits_shards_at_document_ends_and_matches_in_memory(tmp_path):
    src = tmp_path / "data.jsonl"
    texts = [f"document number {i} " * (i + 1) for i in range(12)]
    src.write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    tok = ByteTokenizer()
    paths = prepare_shards(str(src), str(tmp_path / "shards"), tok, shard_tokens=200, progress=False)
    assert len(paths) > 1
    from_shards = load_corpus(str(tmp_path / "shards"), tok)
    in_memory = load_corpus(str(src), tok)
    docs_a, docs_b = list(from_shards.documents()), list(in_memory.documents())
    assert len(docs_a) == len(docs_b) == 12
    for a, b, text in zip(docs_a, docs_b, texts):
        np.testing.assert_array_equal(a, b)
        assert tok.decode(a) == text and a[-1] == tok.eos_token_id
    with pytest.raises(InputError, match="already holds"):
        prepare_shards(str(src), str(tmp_path / "shards"), tok, progress=False)
    assert len(open_shards(str(tmp_path / "shards"))) == len(paths)  # refused run removed nothing


def _word_tokenizer(path) -> str:
    """A different vocabulary: a whitespace word-level Hugging Face tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", "hello", "world,", "a", "small", "corpus"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]").save_pretrained(str(path))
    return str(path)


def test_prepare_cli_and_tokenizer_mismatch(tmp_path, capsys):
    from memmix.data.tokenizer import load_tokenizer

    (tmp_path / "a.txt").write_text("hello world, a small corpus " * 20)
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "wrote 1 shard(s)" in capsys.readouterr().out
    ByteTokenizer().save_pretrained(str(tmp_path / "bytes_hf"))  # the byte vocabulary, saved as an HF folder
    assert load_corpus(str(tmp_path / "s"), load_tokenizer(str(tmp_path / "bytes_hf")), str(tmp_path / "bytes_hf"))
    words = _word_tokenizer(tmp_path / "words")
    with pytest.raises(InputError, match="were tokenised with 'byte'.*--tokenizer 'words' is another vocabulary"):
        load_corpus(str(tmp_path / "s"), load_tokenizer(words), words)
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "w"), "--tokenizer", words,
                 "--no-progress"]) == 0
    corpus = load_corpus(str(tmp_path / "w"), load_tokenizer(words), words)
    assert corpus.num_tokens == 5 * 20 + 1 and corpus.vocab_size == 7
