import torch
from train_helpers import TINY_MOM

from memmix.data.tokenizer import ByteTokenizer
from memmix.evaluation.generate import generate_ids, sample_next, stream_text
from memmix.training.presets import build_model


def test_sampling_rules():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 1.0, gen) == 0
    assert sample_next(logits, 0.0, 1.0, gen, vocab_limit=0 + 4) == 0
    assert sample_next(torch.tensor([0.0, 1.0, 9.0]), 0.0, 1.0, gen, vocab_limit=2) == 1
    draws = [sample_next(logits, 1.0, 0.75, gen) for _ in range(300)]
    assert set(draws) == {0, 1}  # nucleus 0.75 keeps 0.5 + 0.3 only
    draws = [sample_next(logits, 1.0, 1.0, gen) for _ in range(300)]
    assert set(draws) == {0, 1, 2, 3}
    assert [sample_next(logits, 1.0, 0.01, gen) for _ in range(20)] == [0] * 20


def test_streamed_pieces_never_split_a_character():
    tok = ByteTokenizer()
    text = "héllo wörld 🙂 ünïcode"
    pieces = list(stream_text(tok, iter(tok.encode(text).tolist() + [tok.eos_token_id])))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 5


def test_cached_generation_equals_rereading_the_whole_sequence():
    torch.manual_seed(0)
    model = build_model("tiny", 64, TINY_MOM).eval()

    class NoCache(torch.nn.Module):  # the same model, seen without `use_cache`: re-reads everything each step
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False)

    prompt = [3, 17, 5, 9, 33]
    cached = list(generate_ids(model, prompt, max_new_tokens=4, temperature=0.0))
    plain = list(generate_ids(NoCache(model), prompt, max_new_tokens=4, temperature=0.0))
    assert cached == plain and len(cached) == 4
    sampled = [list(generate_ids(model, prompt, 4, temperature=1.0, top_p=0.9, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
