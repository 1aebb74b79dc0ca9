import numpy as np
import pytest

from memmix.errors import InputError
from memmix.data.tokenizer import ByteTokenizer, load_tokenizer


def _random_text(seed: int, n: int = 400) -> str:
    rng = np.random.default_rng(seed)
    pools = [(0, 128), (128, 0x2FFF), (0x1F300, 0x1F600)]
    chars = []
    for _ in range(n):
        lo, hi = pools[rng.integers(len(pools))]
        code = int(rng.integers(lo, hi))
        if 0xD800 <= code <= 0xDFFF:  # surrogates are not encodable
            code = ord("x")
        chars.append(chr(code))
    return "".join(chars)


@pytest.mark.parametrize("seed", [0, 1])
def test_byte_tokenizer_round_trips_utf8(seed):
    tok = ByteTokenizer()
    text = _random_text(seed)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert bytes(ids.astype(np.uint8).tolist()) == text.encode("utf-8")
    assert tok.decode(list(ids) + [tok.eos_token_id]) == text


def test_hf_export_matches_builtin_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = ByteTokenizer()
    tok.save_pretrained(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = _random_text(3)
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text).tolist()
    assert hf.decode(tok.encode(text).tolist()) == text
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eos_token_id


def test_load_tokenizer_from_local_folder_and_errors(tmp_path):
    ByteTokenizer().save_pretrained(str(tmp_path / "tok"))
    hf_tok = load_tokenizer(str(tmp_path / "tok"))
    assert hf_tok.vocab_size == 257 and hf_tok.encode("hé").tolist() == [104, 195, 169]
    with pytest.raises(InputError, match="neither 'byte' nor a local folder"):
        load_tokenizer("gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
