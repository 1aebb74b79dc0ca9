import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from training_helpers import register_standin, write_corpus  # noqa: E402


@pytest.fixture
def corpus_path(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl")


@pytest.fixture
def standin():
    return register_standin()
