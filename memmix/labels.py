"""IGNORE_INDEX: the label of a position that no loss scores (PyTorch's cross_entropy default)."""

IGNORE_INDEX = -100
