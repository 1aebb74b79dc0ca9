"""Where documents come from: text files or folders, JSONL, Hugging Face `datasets`.

Every source yields documents as `str`. A plain text file is one document unless `doc_separator`
splits it; a JSONL line is one document (its `text_field`); a `datasets` row is one document.

One encoding policy for every source (`encoding_errors`): "strict" stops at the first byte that is not UTF-8
(or, in already-decoded text, an unpaired surrogate such as a JSON "\udc80" escape) with an error naming the file
and the byte offset; "replace" reads each such byte or surrogate as U+FFFD.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from memmix.data.shards import SHARD_SUFFIX, is_shard_file
from memmix.errors import InputError
from memmix.files import list_files

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
DATA_FORMATS = ("auto", "text", "jsonl", "hf", "shards")
ENCODING_ERRORS = ("strict", "replace")


@dataclass(frozen=True)
class TextSource:
    """How documents are read from a text data path: data_format (DATA_FORMATS), text_field (of a JSONL line or a
    dataset row), split (of a dataset), doc_separator (splits a plain-text file; None: one document a file) and
    encoding_errors (ENCODING_ERRORS; see the module docstring)."""

    data_format: str = "auto"
    text_field: str = "text"
    split: str = "train"
    doc_separator: str | None = None
    encoding_errors: str = "strict"

    @classmethod
    def of(cls, options) -> TextSource:
        """The source named by an object with these five attributes (a TrainConfig, the command line's options)."""
        return cls(options.data_format, options.text_field, options.split, options.doc_separator or None,
                   options.encoding_errors)
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_encoding_errors(encoding_errors: str) -> None:
    if encoding_errors not in ENCODING_ERRORS:
        raise InputError(f"must be one of {', '.join(ENCODING_ERRORS)}; got {encoding_errors!r}", "encoding_errors")


def decode_utf8(data: bytes, where: str, encoding_errors: str = "strict", offset: int = 0) -> str:
    """bytes -> text under the encoding policy; `where` names the source, `offset` is data[0]'s byte offset in it."""
    check_encoding_errors(encoding_errors)
    try:
        return data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as err:
        raise InputError(f"{where} is not valid UTF-8 at byte {offset + err.start} ({err.reason}): convert it to "
                         "UTF-8, or use 'replace' to read such bytes as U+FFFD", "encoding_errors") from None


def check_text(text: str, where: str, encoding_errors: str = "strict") -> str:
    """Text that encodes as UTF-8: an unpaired surrogate is an error ("strict") or becomes U+FFFD ("replace")."""
    match = _SURROGATE.search(text)
    if match is None:
        return text
    if encoding_errors == "replace":
        return _SURROGATE.sub("\ufffd", text)
    raise InputError(f"{where} holds an unpaired surrogate {match.group()!r} at character {match.start()}, which is "
                     "not text: fix it, or use 'replace' to read it as U+FFFD", "encoding_errors")


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise InputError(
            "reading a Hugging Face dataset needs the `datasets` package: pip install datasets"
        ) from None
    return datasets


def is_hf_saved_dataset(path: str) -> bool:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in markers)


def _open_data_file(path: str):
    """open(path, "rb"); InputError naming the file when it cannot be read (a dangling link, no permission)."""
    try:
        return open(path, "rb")
    except OSError as err:
        link = " (a symbolic link to a missing file)" if os.path.islink(path) and not os.path.exists(path) else ""
        raise InputError(f"data file '{path}' cannot be read{link}: {err.strerror or err}; fix or remove it") from None


def _text_value(value, text_field: str, where: str) -> str:
    """A row's text: a string; anything else (a list, a dict, a number) is refused rather than read as its repr."""
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{text_field}' is a {type(value).__name__}, not a string; pass the field "
                         "that holds the text", "text_field")
    return value


def iter_text_file(path: str, doc_separator: str | None = None, encoding_errors: str = "strict") -> Iterator[str]:
    with _open_data_file(path) as f:
        text = decode_utf8(f.read(), f"'{path}'", encoding_errors)
    parts = text.split(doc_separator) if doc_separator else [text]
    yield from (p for p in parts if p.strip())


def iter_jsonl_file(path: str, text_field: str = "text", encoding_errors: str = "strict") -> Iterator[str]:
    offset = 0
    with _open_data_file(path) as f:
        for line_no, raw in enumerate(f, 1):
            line = decode_utf8(raw, f"'{path}' (line {line_no})", encoding_errors, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{line_no} is not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise InputError(
                    f"{path}:{line_no} has no field '{text_field}' (it has {keys}); pass the field that holds the "
                    "text", "text_field")
            if row[text_field] is None or row[text_field] == "":
                continue
            text = _text_value(row[text_field], text_field, f"{path}:{line_no}")
            yield check_text(text, f"'{path}' (line {line_no})", encoding_errors)


def iter_hf_dataset(name_or_path: str, text_field: str = "text", split: str = "train",
                    encoding_errors: str = "strict") -> Iterator[str]:
    """A `datasets` dataset saved with `save_to_disk`, or a hub name `NAME` / `NAME:CONFIG` (needs network)."""
    datasets = _import_datasets()
    if os.path.isdir(name_or_path):
        ds = datasets.load_from_disk(name_or_path)
    else:
        name, _, config_name = name_or_path.partition(":")
        try:
            ds = datasets.load_dataset(name, config_name or None, split=split)
        except Exception as exc:  # offline, unknown name, ...: one line instead of a long traceback
            raise InputError(
                f"could not load dataset '{name_or_path}' from the Hugging Face hub ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); when offline, save it with "
                "`save_to_disk` elsewhere and pass that folder"
            ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"dataset '{name_or_path}' has no split '{split}' (it has {sorted(ds)})", "split")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise InputError(
            f"dataset '{name_or_path}' has no column '{text_field}' (it has {ds.column_names})", "text_field")
    for index, row in enumerate(ds):
        if row[text_field] is None or row[text_field] == "":
            continue
        text = _text_value(row[text_field], text_field, f"dataset '{name_or_path}' (row {index})")
        yield check_text(text, f"dataset '{name_or_path}' (row {index})", encoding_errors)


def detect_format(path: str) -> str:
    """'text' | 'jsonl' | 'hf' | 'shards' for a data path (see DATA_FORMATS)."""
    if path.startswith("hf:"):
        return "hf"
    if not os.path.exists(path):
        raise InputError(f"data path '{path}' does not exist; pass an existing file or folder (or hf:NAME for the hub)")
    if os.path.isfile(path):
        if is_shard_file(path):
            return "shards"
        return "jsonl" if path.endswith(JSONL_SUFFIXES) else "text"
    if is_hf_saved_dataset(path):
        return "hf"
    if list_files(path, (SHARD_SUFFIX,)):
        return "shards"
    return "text"  # a folder of text and/or JSONL files


def iter_documents(path: str, source: TextSource = TextSource()) -> Iterator[str]:
    """Documents (str) from a data path read as `source` says; see the module docstring for what a document is and
    the encoding policy."""
    data_format, text_field, encoding_errors = source.data_format, source.text_field, source.encoding_errors
    if data_format not in DATA_FORMATS:
        raise InputError(f"must be one of {', '.join(DATA_FORMATS)}; got {data_format!r}", "data_format")
    check_encoding_errors(encoding_errors)
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt == "hf":
        yield from iter_hf_dataset(path.removeprefix("hf:"), text_field, source.split, encoding_errors)
        return
    if fmt == "shards":
        raise InputError(f"'{path}' holds token shards, not text; use it as --data for `memmix train`/`memmix eval`")
    if not os.path.exists(path):
        raise InputError(f"data path '{path}' does not exist; pass an existing file or folder")
    files = [path] if os.path.isfile(path) else list_files(path, TEXT_SUFFIXES + JSONL_SUFFIXES)
    if not files:
        raise InputError(f"no .txt/.md/.jsonl files under '{path}'; pass a file or a folder that holds some")
    for file in files:
        is_jsonl = fmt == "jsonl" or (data_format == "auto" and file.endswith(JSONL_SUFFIXES))
        yield from (iter_jsonl_file(file, text_field, encoding_errors) if is_jsonl
                    else iter_text_file(file, source.doc_separator, encoding_errors))
