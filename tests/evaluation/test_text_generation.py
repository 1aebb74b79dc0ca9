import pytest
import torch
from training_helpers import TINY_MOM

from memmix.errors import InputError
from memmix.data.tokenizer import ByteTokenizer
from memmix.evaluation.generate import TextStreamer, check_generate_args, generate_text
from memmix.models.presets import build_model


def test_streamed_pieces_never_split_a_character():
    tok = ByteTokenizer()
    text = "héllo wörld 🙂 ünïcode"
    pieces = []
    streamer = TextStreamer(tok, pieces.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: not written
    for token in tok.encode(text).tolist() + [tok.eos_token_id]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 5


def _model():
    torch.manual_seed(0)
    return build_model("tiny", 320, TINY_MOM, eos_token_id=256).eval()  # ids 257..319: vocabulary padding


def test_greedy_generate_equals_an_argmax_loop_over_the_whole_sequence():
    """model.generate() with the recurrent cache picks what re-reading the whole sequence picks, and never an id
    the tokenizer has no token for."""
    model, tok = _model(), ByteTokenizer()
    prompt = "the cat"
    ids = torch.tensor([tok.encode(prompt).tolist()])
    with torch.no_grad():
        model.lm_head.weight[300] += 100.0  # make a padding id the most likely everywhere
        expected = []
        for _ in range(6):
            logits = model(input_ids=ids, use_cache=False).logits[0, -1, : tok.vocab_size]
            expected.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=1)
    pieces = []
    text = generate_text(model, tok, prompt, max_new_tokens=6, temperature=0.0, write=pieces.append)
    assert text == "".join(pieces) == tok.decode([i for i in expected if i != tok.eos_token_id])


def test_sampling_is_repeatable_with_a_seed_and_top_p_near_zero_is_greedy():
    model, tok = _model(), ByteTokenizer()
    runs = [generate_text(model, tok, "a dog", 8, temperature=1.5, top_p=1.0, seed=s) for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    greedy = generate_text(model, tok, "a dog", 8, temperature=0.0)
    assert generate_text(model, tok, "a dog", 8, temperature=1.5, top_p=1e-6, seed=3) == greedy


@pytest.mark.parametrize("args, argument", [((0, 1.0, 0.9), "max_new_tokens"), ((5, -1.0, 0.9), "temperature"),
                                            ((5, 1.0, 0.0), "top_p"), ((5, 1.0, 2.0), "top_p"),
                                            ((5, float("nan"), 0.9), "temperature")])
def test_bad_arguments_name_the_argument(args, argument):
    with pytest.raises(InputError) as err:
        check_generate_args(*args)
    assert err.value.argument == argument
