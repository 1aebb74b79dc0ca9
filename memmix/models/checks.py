"""Table-driven argument checks for the model configs.

A config lists its fields with one rule each (`integer(1)`, `number(positive=True)`, `boolean`, `choice(...)`,
`optional(rule)`); `check_fields` applies the table and raises a ValueError naming the first bad field and what it
accepts. Rules that tie several arguments of one layer together belong to that layer's own check, which the
config calls after this table.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from memmix.checks import is_int
from memmix.ops.common import IMPLS

Rule = Callable[[str, object], None]


def integer(minimum: int | None = None) -> Rule:
    """An int (not a bool), at least `minimum` when given."""

    def check(name: str, value) -> None:
        if not is_int(value) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            raise ValueError(f"{name} must be an integer{bound}, got {value!r}")

    return check


def number(positive: bool = False, non_negative: bool = False) -> Rule:
    """An int or float (not a bool); > 0 with positive, >= 0 with non_negative."""

    def check(name: str, value) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and positive:
            ok = value > 0
        if ok and non_negative:
            ok = value >= 0
        if not ok:
            bound = " > 0" if positive else " >= 0" if non_negative else ""
            raise ValueError(f"{name} must be a number{bound}, got {value!r}")

    return check


def boolean(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def choice(choices: tuple[str, ...]) -> Rule:
    """One of `choices`."""

    def check(name: str, value) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")

    return check


def optional(rule: Rule) -> Rule:
    """None, or a value that passes `rule`."""

    def check(name: str, value) -> None:
        if value is not None:
            rule(name, value)

    return check


def check_fields(values: Mapping[str, object], rules: Mapping[str, Rule]) -> None:
    """Apply rules[name] to values[name] for every name in `rules`, in table order."""
    for name, rule in rules.items():
        rule(name, values[name])


# Fields every memmix causal LM has (embedding, stack, MLP width, norms, init, kernels, HF flags).
LM_FIELD_RULES: dict[str, Rule] = {
    "vocab_size": integer(1),
    "hidden_size": integer(1),
    "num_hidden_layers": integer(1),
    "intermediate_size": integer(1),
    "norm_eps": number(positive=True),
    "initializer_range": number(positive=True),
    "impl": choice(IMPLS),
    "tie_word_embeddings": boolean,
    "use_cache": boolean,
}
