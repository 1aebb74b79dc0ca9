"""Tokenizers: a built-in byte-level tokenizer (no download) and local Hugging Face tokenizers."""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache

import numpy as np

from memmix.errors import InputError

BYTE_EOS = "<|endoftext|>"


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """Byte -> printable character, the GPT-2 byte-level alphabet (so tokenizer.json stays readable)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus an end-of-document token (id 256).

    vocab_size = 257. `save_pretrained` writes an equivalent Hugging Face fast tokenizer, so a saved
    model loads through `AutoTokenizer.from_pretrained` with no memmix code.
    """

    name = "byte"
    fingerprint = "byte"
    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> np.ndarray:
        """text -> int32 (T,) token ids (no end-of-document token)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """ids (T,) -> text; the end-of-document token and ids >= 257 are dropped, bad UTF-8 replaced."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_hf(self):
        """An equivalent `transformers.PreTrainedTokenizerFast` (ids identical to `encode`)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {char: byte for byte, char in _byte_to_unicode().items()}
        vocab[BYTE_EOS] = self.eos_token_id
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=BYTE_EOS, pad_token=BYTE_EOS)
        return hf

    def save_pretrained(self, path: str) -> None:
        self.to_hf().save_pretrained(path)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (never downloads)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises several types for a folder without a tokenizer
            raise InputError(
                f"could not load a tokenizer from '{path}' ({type(exc).__name__}); pass 'byte' "
                "or a folder holding tokenizer.json / tokenizer_config.json", "tokenizer"
            ) from None
        self._describe(os.path.basename(os.path.normpath(path)))

    @classmethod
    def from_hf(cls, hf, name: str) -> "HFTokenizer":
        tok = cls.__new__(cls)
        tok.hf = hf
        tok._describe(name)
        return tok

    def _describe(self, name: str) -> None:
        self.name = name
        self.vocab_size = len(self.hf)
        self.eos_token_id = self.hf.eos_token_id
        self.fingerprint = vocab_fingerprint(self.hf.get_vocab())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False), dtype=np.int32)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_hf(self):
        return self.hf

    def save_pretrained(self, path: str) -> None:
        self.hf.save_pretrained(path)


def _digest(vocab: dict[str, int]) -> str:
    return hashlib.sha1(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def _byte_vocab_digest() -> str:
    return _digest(ByteTokenizer().to_hf().get_vocab())


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    """Identity of a vocabulary (what shards and checkpoints are checked against): 'byte' for the built-in
    byte tokenizer and its Hugging Face export, else 'hf-' + a hash of the token -> id map."""
    digest = _digest(vocab)
    return "byte" if digest == _byte_vocab_digest() else f"hf-{digest}"


def load_tokenizer(spec: str):
    """'byte' -> ByteTokenizer; a local folder -> HFTokenizer. Anything else is an InputError."""
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isdir(spec):
        return HFTokenizer(spec)
    raise InputError(
        f"'{spec}' is neither 'byte' nor a local folder; pass 'byte' or the path of a saved Hugging Face tokenizer "
        "(nothing is downloaded)", "tokenizer"
    )


def tokenizer_spec_name(spec: str) -> str:
    """The readable name stored in shard headers for a --tokenizer value."""
    return "byte" if spec == "byte" else os.path.basename(os.path.normpath(spec))
