import importlib.util
import json
import sys

import pytest

from memmix.data.corpus import load_corpus
from memmix.errors import InputError
from memmix.data.sources import TextSource, detect_format, iter_documents
from memmix.data.tokenizer import ByteTokenizer


def test_folder_mixes_text_and_jsonl_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b" / "c.jsonl").write_text(json.dumps({"body": "row one"}) + "\n\n" + json.dumps({"body": "row two"}) + "\n")
    (tmp_path / "b" / "d.md").write_text("part1<SEP>part2")
    docs = list(iter_documents(str(tmp_path), TextSource(text_field="body", doc_separator="<SEP>")))
    assert docs == ["first file", "row one", "row two", "part1", "part2"]


def test_jsonl_errors_name_the_line_and_the_fix(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(InputError, match=r"x.jsonl:2 has no field 'text'"):
        list(iter_documents(str(path)))
    path.write_text("{not json\n")
    with pytest.raises(InputError, match=r"x.jsonl:1 is not valid JSON"):
        list(iter_documents(str(path)))


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        detect_format(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no training data"):
        load_corpus("", ByteTokenizer())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .txt/.md/.jsonl files"):
        load_corpus(str(tmp_path / "empty"), ByteTokenizer())
    (tmp_path / "blank.txt").write_text("   \n\n")
    with pytest.raises(InputError, match="holds no text"):
        load_corpus(str(tmp_path / "blank.txt"), ByteTokenizer())


def test_hf_dataset_without_datasets_installed_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(InputError, match="pip install datasets"):
        list(iter_documents("hf:wikitext"))
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    assert detect_format(str(tmp_path / "saved")) == "hf"
    with pytest.raises(InputError, match="pip install datasets"):
        list(iter_documents(str(tmp_path / "saved")))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_saved_hf_dataset_loads_with_its_split_and_field(tmp_path):
    import datasets
    import pyarrow as pa

    def table(rows):  # the plain constructor: no fingerprint hashing (which some dill/pyarrow pairs break)
        return datasets.Dataset(pa.table({"body": rows}), fingerprint=f"memmix-test-{len(rows)}")

    dd = datasets.DatasetDict({"train": table(["one", "", "two"]), "validation": table(["three"])})
    dd.save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(str(tmp_path / "ds"), TextSource(text_field="body"))) == ["one", "two"]
    assert list(iter_documents(str(tmp_path / "ds"), TextSource(text_field="body", split="validation"))) == ["three"]
    with pytest.raises(InputError, match="no split 'test'"):
        list(iter_documents(str(tmp_path / "ds"), TextSource(text_field="body", split="test")))
    with pytest.raises(InputError, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "ds")))


@pytest.mark.parametrize("name, content, where, offset", [
    ("a.txt", b"caf\xc3\xa9 ok\n\xff", "'{path}'", 9), ("a.md", b"\xc3", "'{path}'", 0),
    ("a.jsonl", b'{"text": "fine"}\n{"text": "b\xe9"}\n', "'{path}' (line 2)", 28)])
def test_bytes_that_are_not_utf8_stop_with_the_file_and_byte_offset(tmp_path, name, content, where, offset):
    """One policy for every format: bytes that are not UTF-8 stop with the file and the byte offset."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        list(iter_documents(str(path)))
    assert err.value.argument == "encoding_errors"
    assert err.value.detail.startswith(f"{where.format(path=path)} is not valid UTF-8 at byte {offset} (")
    assert any("\ufffd" in doc for doc in iter_documents(str(path), TextSource(encoding_errors="replace")))


def test_unpaired_surrogates_from_json_escapes_follow_the_same_policy(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "lone \\udc80 here"}\n')
    with pytest.raises(InputError, match=r"s.jsonl' \(line 2\) holds an unpaired surrogate '\\udc80' at character 5"):
        list(iter_documents(str(path)))
    assert list(iter_documents(str(path), TextSource(encoding_errors="replace"))) == ["ok \U0001F600", "lone \ufffd here"]
    with pytest.raises(InputError, match="must be one of strict, replace"):
        list(iter_documents(str(path), TextSource(encoding_errors="ignore")))
