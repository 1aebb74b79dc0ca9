"""Text generation through the model's own `generate()` (recurrent cache, CUDA-graph decoding on a GPU), streamed.

    generate_text(model, tokenizer, "Once upon a time", max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0,
                  write=sys.stdout.write)

Importing this module does not import transformers (2 s), so the command line checks its arguments first.
"""
from __future__ import annotations

from collections.abc import Callable

from memmix.errors import InputError


def check_generate_args(max_new_tokens: int, temperature: float, top_p: float, seed: int | None = None) -> None:
    """InputError naming the first bad argument (checked before any model is loaded)."""
    if max_new_tokens < 1:
        raise InputError(f"must be >= 1, got {max_new_tokens}", "max_new_tokens")
    if not 0 <= temperature < float("inf"):
        raise InputError(f"must be >= 0 and finite (0 = greedy), got {temperature}", "temperature")
    if seed is not None and not 0 <= seed < 2**64:
        raise InputError(f"must be an integer in [0, 2**64 - 1], got {seed}", "seed")
    if not 0 < top_p <= 1:
        raise InputError(f"must be in (0, 1], got {top_p}", "top_p")


class TextStreamer:
    """A streamer for transformers' generate() (its BaseStreamer interface: put, end; generate() only calls them,
    so this module need not import transformers) that decodes with a memmix tokenizer and calls write(piece).

    The first put() is the prompt (skipped); a piece is held back while it ends in an incomplete UTF-8 character.
    """

    def __init__(self, tokenizer, write: Callable[[str], object]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.emitted = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())  # (1,) per step for one sequence
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # a multi-byte character may not be complete yet
            self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> None:
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.write(text[len(self.emitted):])
            self.emitted = text


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int | None = None, write: Callable[[str], object] | None = None) -> str:
    """Continue `prompt` with model.generate(): greedy at temperature 0, else nucleus sampling (top_p) at
    `temperature`; `seed` makes sampling repeatable. Calls write(piece) as text arrives; returns the new text.

    Ids the tokenizer has no token for (the model's vocabulary padding) are never generated."""
    import torch

    check_generate_args(max_new_tokens, temperature, top_p, seed)
    if not hasattr(model, "generate"):
        raise InputError(f"{type(model).__name__} has no generate(); pass a memmix causal LM", "model")
    ids = [int(i) for i in tokenizer.encode(prompt)]
    if not ids:
        raise InputError("the prompt is empty after tokenisation; pass some text", "prompt")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    pieces: list[str] = []
    streamer = TextStreamer(tokenizer, lambda piece: (pieces.append(piece), write and write(piece)))
    model_vocab = getattr(model.config, "vocab_size", tokenizer.vocab_size)
    padding = list(range(tokenizer.vocab_size, model_vocab))
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    if seed is not None:
        torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                       eos_token_id=eos, pad_token_id=eos, suppress_tokens=padding or None, streamer=streamer,
                       **sampling)
    return "".join(pieces)
