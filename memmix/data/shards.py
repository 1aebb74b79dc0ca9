"""Pre-tokenised binary shards: memory-mapped token files with a header that catches corruption.

Layout of one shard (`*.mmtok`), all little-endian:

    bytes [0, 4096)       header: magic b"MEMMIXTK", u32 version, u32 JSON length, JSON metadata
                          {dtype, num_tokens, num_docs, vocab_size, tokenizer, eos_token_id,
                           tokenizer_fingerprint, tokens_crc32, offsets_crc32}, zero padded
    tokens                dtype (uint16 when vocab_size <= 65536, else uint32), (num_tokens,)
    doc_offsets           uint64, (num_docs + 1,): document d is tokens[doc_offsets[d]:doc_offsets[d+1]]

A shard is written to a temporary name and renamed when complete. `memmix prepare` builds a whole folder of
shards beside its --out, writes its completion record `prepared.json` last (the shards' names, token counts and
checksums) and swaps the folder in: readers refuse a folder of shards without its record or with other shards
than it lists, so an interrupted or mixed folder is never read as data.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from memmix.errors import InputError
from memmix.files import atomic_write_json, list_files

MAGIC = b"MEMMIXTK"
VERSION = 1
HEADER_BYTES = 4096
SHARD_SUFFIX = ".mmtok"
RECORD_NAME = "prepared.json"
RECORD_FORMAT = "memmix-prepared-shards"
_CRC_CHUNK = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _crc32(array: np.ndarray) -> int:
    crc = 0
    flat = array.reshape(-1)
    step = max(1, _CRC_CHUNK // max(1, flat.itemsize))
    for start in range(0, flat.size, step):
        crc = zlib.crc32(np.ascontiguousarray(flat[start : start + step]).tobytes(), crc)
    return crc


def is_shard_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class ShardWriter:
    """Streams documents' tokens into one shard file; `close()` finishes it atomically."""

    def __init__(self, path: str, vocab_size: int, tokenizer: str, eos_token_id: int | None,
                 tokenizer_fingerprint: str | None = None):
        self.path = path
        self.tmp_path = f"{path}.tmp{os.getpid()}"
        self.dtype = token_dtype(vocab_size)
        self.meta = {"vocab_size": int(vocab_size), "tokenizer": tokenizer, "eos_token_id": eos_token_id,
                     "tokenizer_fingerprint": tokenizer_fingerprint or tokenizer}
        self.offsets = [0]
        self.tokens_crc = 0
        self.file = open(self.tmp_path, "wb")
        self.file.write(b"\0" * HEADER_BYTES)

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    def add_document(self, tokens: np.ndarray) -> None:
        """tokens: integer (T,) ids of one document (with its end-of-document token if wanted)."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.tokens_crc = zlib.crc32(data, self.tokens_crc)
        self.offsets.append(self.offsets[-1] + len(tokens))

    def close(self) -> str:
        offsets = np.asarray(self.offsets, dtype=np.uint64)
        self.file.write(offsets.tobytes())
        meta = dict(self.meta, dtype=self.dtype.name, num_tokens=self.num_tokens, num_docs=len(self.offsets) - 1,
                    tokens_crc32=self.tokens_crc, offsets_crc32=zlib.crc32(offsets.tobytes()))
        self.file.seek(0)
        self.file.write(_encode_header(meta))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def _encode_header(meta: dict) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode()
    header = MAGIC + struct.pack("<II", VERSION, len(body)) + body
    assert len(header) <= HEADER_BYTES, "shard metadata does not fit in the header"
    return header + b"\0" * (HEADER_BYTES - len(header))


def read_header(path: str) -> dict:
    """The JSON metadata of a shard; InputError naming the problem if the header is damaged."""
    fix = f"delete '{path}' and re-run `memmix prepare`"
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if not head.startswith(MAGIC):  # another kind of file: never advise deleting it
        raise InputError(f"'{path}' is not a memmix token shard (no shard header); pass a folder that `memmix "
                         "prepare` wrote, or give the text with another data format (auto, text or jsonl)")
    if len(head) < HEADER_BYTES:
        raise InputError(f"'{path}' is not a memmix token shard (bad or missing header); {fix}")
    version, length = struct.unpack("<II", head[len(MAGIC) : len(MAGIC) + 8])
    if version != VERSION:
        raise InputError(f"shard '{path}' has format version {version}, this memmix reads {VERSION}; {fix}")
    try:
        return json.loads(head[len(MAGIC) + 8 : len(MAGIC) + 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"shard '{path}' has a corrupt header; {fix}") from None


@dataclass
class TokenShard:
    """One shard's tokens (memory-mapped) and document offsets."""

    path: str
    tokens: np.ndarray  # (num_tokens,) uint16/uint32
    doc_offsets: np.ndarray  # (num_docs + 1,) uint64
    meta: dict

    @classmethod
    def open(cls, path: str, verify: bool = True) -> "TokenShard":
        """Open and check a shard: sizes always; token checksum too when `verify`."""
        meta = read_header(path)
        fix = f"delete '{path}' and re-run `memmix prepare`"
        dtype = np.dtype(meta["dtype"])
        n_tok, n_doc = int(meta["num_tokens"]), int(meta["num_docs"])
        expected = HEADER_BYTES + n_tok * dtype.itemsize + (n_doc + 1) * 8
        actual = os.path.getsize(path)
        if actual != expected:
            raise InputError(f"shard '{path}' is {actual} bytes, its header says {expected} (truncated?); {fix}")
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tok,))
        offsets = np.memmap(path, dtype=np.uint64, mode="r", offset=HEADER_BYTES + n_tok * dtype.itemsize,
                            shape=(n_doc + 1,))
        if zlib.crc32(np.asarray(offsets).tobytes()) != meta["offsets_crc32"]:
            raise InputError(f"shard '{path}' has corrupt document offsets (checksum mismatch); {fix}")
        if verify and _crc32(tokens) != meta["tokens_crc32"]:
            raise InputError(f"shard '{path}' has corrupt tokens (checksum mismatch); {fix}")
        return cls(path, tokens, offsets, meta)


def write_record(folder: str, paths: list[str], source: str) -> str:
    """The completion record of a prepared folder: written last, it lists every shard the folder holds."""
    shards = [{"name": os.path.basename(p), "num_tokens": int(meta["num_tokens"]),
               "tokens_crc32": meta["tokens_crc32"]} for p, meta in ((p, read_header(p)) for p in paths)]
    record = os.path.join(folder, RECORD_NAME)
    atomic_write_json(record, {"format": RECORD_FORMAT, "source": source, "shards": shards})
    return record


def _recorded_shards(folder: str, found: list[str]) -> list[str]:
    """The shards of one prepared folder, as its completion record lists them; InputError for a folder without
    its record (an interrupted or older `memmix prepare`) or whose shards differ from the record."""
    fix = f"re-run `memmix prepare` into '{folder}' (with --overwrite)"
    record_path = os.path.join(folder, RECORD_NAME)
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        names = [entry["name"] for entry in record["shards"]]
        if record["format"] != RECORD_FORMAT:
            raise ValueError(record["format"])
    except FileNotFoundError:
        raise InputError(f"'{folder}' holds shards but no completion record ({RECORD_NAME}): it is an interrupted "
                         f"or older `memmix prepare`; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"the completion record '{record_path}' is damaged; {fix}") from None
    listed = {os.path.join(folder, name) for name in names}
    extra, missing = sorted(set(found) - listed), sorted(listed - set(found))
    if extra or missing:
        what = f"'{extra[0]}' is not in its record" if extra else f"'{missing[0]}' is missing"
        raise InputError(f"the shards in '{folder}' are not the ones `memmix prepare` wrote ({what}); {fix}")
    return [os.path.join(folder, name) for name in names]


def shard_paths(path: str) -> list[str]:
    """A shard file, or every `*.mmtok` file under a folder, each folder's as its completion record lists them."""
    if os.path.isfile(path):
        return [path]
    found = list_files(path, (SHARD_SUFFIX,)) if os.path.isdir(path) else []
    if not found:
        raise InputError(f"no {SHARD_SUFFIX} shards found at '{path}'; create them with `memmix prepare`")
    by_folder: dict[str, list[str]] = {}
    for shard in found:
        by_folder.setdefault(os.path.dirname(shard), []).append(shard)
    return [p for folder in sorted(by_folder) for p in _recorded_shards(folder, by_folder[folder])]


def open_shards(path: str, verify: bool = True) -> list[TokenShard]:
    """All shards of a data path, checked to share one tokenizer and vocabulary."""
    shards = [TokenShard.open(p, verify) for p in shard_paths(path)]
    first = shards[0].meta
    for shard in shards[1:]:
        for key in ("tokenizer_fingerprint", "vocab_size"):
            if shard.meta[key] != first[key]:
                raise InputError(
                    f"shards under '{path}' disagree: '{shards[0].path}' has {key}={first[key]!r}, "
                    f"'{shard.path}' has {shard.meta[key]!r}; keep shards of one tokenizer per folder"
                )
    return shards
