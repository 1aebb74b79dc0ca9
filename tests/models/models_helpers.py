"""Tiny float64 MoM / hybrid and B'MOJO models for the model tests, and the router z-loss by hand (which
tests/test_routing.py shares)."""
from __future__ import annotations


import torch

from memmix.models import BMojoConfig, BMojoForCausalLM, LayerStateCache, MoMConfig, MoMForCausalLM

VOCAB = 41


def tiny_mom_config(**overrides) -> MoMConfig:
    """A 2-layer config small enough for fast CPU tests; keyword arguments override any field."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        intermediate_size=24,
        num_heads=2,
        head_dim=4,
        num_memories=3,
        topk=2,
        conv_size=3,
        attn_num_heads=2,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    kwargs.update(overrides)
    return MoMConfig(**kwargs)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> MoMForCausalLM:
    """Random tiny MoMForCausalLM in eval mode; weights are perturbed so every parameter matters."""
    torch.manual_seed(seed)
    model = MoMForCausalLM(tiny_mom_config(**overrides)).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # norms start at 1: make them non-trivial
                param.add_(0.1 * torch.randn_like(param))
            elif param.dim() >= 2:
                param.mul_(10.0)  # std 0.2 weights: routing and memories actually vary with the input
    return model


def tiny_bmojo(seed: int = 0, **overrides) -> BMojoForCausalLM:
    """A random float64 2-layer B'MOJO model with enlarged weights (conv filters kept), in eval mode."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, intermediate_size=24, num_heads=2,
                  head_dim=4, window_size=4, chunk_size=3, eidetic_size=3, eidetic_per_chunk=2, conv_size=3,
                  pad_token_id=0, bos_token_id=None, eos_token_id=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = BMojoForCausalLM(BMojoConfig(**kwargs)).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "conv" not in name:
                param.mul_(10.0)
    return model


def tiny_f(seed: int = 0, **overrides) -> BMojoForCausalLM:
    """A random 2-layer B'MOJO-F model in float64 and eval mode, window 3 (fading band [3, 6)); weights scaled
    up (conv filters kept) and norms moved off 1, so that attention is far from uniform and every weight shows."""
    kwargs = dict(variant="f", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, intermediate_size=24,
                  num_heads=2, head_dim=4, window_size=3, conv_size=3, pad_token_id=0, bos_token_id=None,
                  eos_token_id=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = BMojoForCausalLM(BMojoConfig(**kwargs)).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
            elif param.dim() >= 2 and "conv" not in name:
                param.mul_(10.0)
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) int64 token ids in [1, VOCAB) (0 is the pad id)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def output_cache(output):
    """The cache of a model output, whatever transformers calls the field."""
    return output.cache


def step_by_step(model, ids: torch.Tensor, prefill: int = 0) -> torch.Tensor:
    """Logits (B, T, V) from a prefill of `prefill` tokens, then one token per call through the cache."""
    logits, cache = [], None
    if prefill:
        out = model(ids[:, :prefill], use_cache=True)
        logits.append(out.logits)
        cache = output_cache(out)
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = output_cache(out)
        logits.append(out.logits)
    assert isinstance(cache, LayerStateCache) and cache.get_seq_length() == ids.shape[1]
    return torch.cat(logits, dim=1)
