import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_helpers import StandInLM

from memmix.errors import InputError
from memmix.evaluation.perplexity import perplexity, windows


@pytest.mark.parametrize("length", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("window, stride", [(8, 8), (8, 3), (5, 1), (4, 4)])
def test_windows_score_every_token_once(length, window, stride):
    scored = []
    for begin, end, n in windows(length, window, stride):
        assert 0 < end - begin <= window and 1 <= n <= end - begin - 1
        scored += list(range(end - n, end))  # target positions
    if window == stride:  # chunked: the first token of every window has no context inside it
        assert scored == [t for t in range(length) if t % window != 0]
    else:
        assert scored == list(range(1, length))


def _brute_force(model, docs, window, stride):
    nll, count = 0.0, 0
    for doc in docs:
        for begin, end, n in windows(len(doc), window, stride):
            ids = torch.as_tensor(doc[begin:end], dtype=torch.long)[None]
            logits = model(input_ids=ids).logits[0]
            targets = ids[0, 1:]
            nll += F.cross_entropy(logits[:-1][-n:], targets[-n:], reduction="sum").item()
            count += n
    return nll / count, count


@pytest.mark.parametrize("mode, stride", [("chunked", None), ("sliding", 3)])
def test_packed_windows_equal_one_window_at_a_time(mode, stride):
    torch.manual_seed(0)
    model = StandInLM(50, dim=8).eval()
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 50, size=n) for n in (1, 9, 20, 4)]
    window = 6
    expected, count = _brute_force(model, docs, window, window if mode == "chunked" else stride)
    for tokens_per_batch in (1, 10_000):  # one window per forward pass, and everything packed in one
        with torch.no_grad():
            result = perplexity(model, docs, window, stride, mode, tokens_per_batch)
        assert result["tokens"] == count and result["documents"] == 4
        assert result["nll"] == pytest.approx(expected, rel=1e-5)
        assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


class _Uniform(torch.nn.Module):
    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 37))


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    result = perplexity(_Uniform(), [np.arange(30) % 37], window=8)
    assert result["ppl"] == pytest.approx(37.0)


@pytest.mark.parametrize("kwargs, argument", [({"mode": "strided"}, "mode"), ({"window": 1}, "window"),
                                              ({"mode": "sliding", "stride": 9}, "stride"),
                                              ({"mode": "sliding", "stride": 0}, "stride"),
                                              ({"stride": 4}, "stride"), ({"tokens_per_batch": 0}, "tokens_per_batch")])
def test_bad_arguments_name_the_argument(kwargs, argument):
    """A stride of 0, a stride in chunked mode and 0 tokens per batch are input errors, not silently ignored."""
    args = dict(window=8, stride=None, mode="chunked") | kwargs
    with pytest.raises(InputError) as err:
        perplexity(_Uniform(), [np.arange(10)], **args)
    assert err.value.argument == argument


def test_progress_adds_up_to_the_documents_tokens():
    docs = [np.arange(n) % 37 for n in (1, 9, 20, 0, 4)]
    for mode, stride, per_batch in (("chunked", None, 1), ("sliding", 3, 10), ("chunked", None, 10_000)):
        seen = []
        perplexity(_Uniform(), docs, 6, stride, mode, per_batch, progress=seen.append)
        assert sum(seen) == 34 and all(n > 0 for n in seen)
