"""Text generation with streaming output, temperature and nucleus (top-p) sampling."""
from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch

from memmix.data.errors import InputError


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                vocab_limit: int | None = None) -> int:
    """logits (V,) float -> next token id; temperature 0 is greedy. Ids >= vocab_limit (model rows the
    tokenizer has no token for, e.g. vocabulary padding) are never picked."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[vocab_limit:] = float("-inf")
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _accepts(model, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _returned_cache(output):
    """The recurrent cache a model returned (transformers renamed `past_key_values` to `cache`), or None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: list[int],
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_p: float = 0.95,
    eos_token_id: int | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    vocab_limit: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time. Uses the model's recurrent cache (`past_key_values`) when it
    returns one, else re-reads the whole sequence each step."""
    if temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {top_p}")
    if not prompt_ids:
        raise InputError("the prompt is empty; pass some text with --prompt")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    use_cache = _accepts(model, "use_cache")
    out = model(input_ids=ids, use_cache=True) if use_cache else model(input_ids=ids)
    cache = _returned_cache(out)
    for _ in range(max_new_tokens):
        next_id = sample_next(out.logits[0, -1], temperature, top_p, generator, vocab_limit)
        yield next_id
        if eos_token_id is not None and next_id == eos_token_id:
            return
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
        if cache is not None:
            out = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
            cache = _returned_cache(out)
        else:
            out = model(input_ids=ids)


def stream_text(tokenizer, token_ids: Iterator[int]) -> Iterator[str]:
    """Decode a stream of ids into text pieces, holding back incomplete UTF-8 / merged pieces."""
    generated, emitted = [], ""
    for token in token_ids:
        generated.append(token)
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            continue
        if text.startswith(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(generated)
    if text.startswith(emitted) and len(text) > len(emitted):
        yield text[len(emitted):]
