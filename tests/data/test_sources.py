import importlib.util
import json
import sys

import pytest

from memmix.data.corpus import load_corpus
from memmix.data.errors import InputError
from memmix.data.sources import detect_format, iter_documents
from memmix.data.tokenizer import ByteTokenizer


def test_folder_mixes_text_and_jsonl_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b" / "c.jsonl").write_text(json.dumps({"body": "row one"}) + "\n\n" + json.dumps({"body": "row two"}) + "\n")
    (tmp_path / "b" / "d.md").write_text("part1<SEP>part2")
    docs = list(iter_documents(str(tmp_path), text_field="body", doc_separator="<SEP>"))
    assert docs == ["first file", "row one", "row two", "part1", "part2"]


def test_jsonl_errors_name_the_line_and_the_fix(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(InputError, match=r"x.jsonl:2 has no field 'text'.*--text-field"):
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
    assert list(iter_documents(str(tmp_path / "ds"), text_field="body")) == ["one", "two"]
    assert list(iter_documents(str(tmp_path / "ds"), text_field="body", split="validation")) == ["three"]
    with pytest.raises(InputError, match="no split 'test'"):
        list(iter_documents(str(tmp_path / "ds"), text_field="body", split="test"))
    with pytest.raises(InputError, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "ds")))
