"""What every launcher of memmix's Triton kernels shares: the interpreter switch, one launch with its
out-of-resources fallback, power-of-two tiles, the GPU's size, and a count of launches for tests.

    launch(kernel, grid, args, constants, config)    # kernel[grid(config)](*args, **constants, **config)
"""
from __future__ import annotations

import collections
import contextlib
import functools
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import triton

from memmix.ops.triton import interpreting

# Triton's CPU interpreter (tests): kernels run on CPU tensors and take no GPU launch options (warps, stages)
INTERPRET = interpreting()
LAUNCH_OPTIONS = ("num_warps", "num_stages")

_CHOSEN: dict = {}  # launch key -> the config that launched
_COUNTERS: list = []  # the open count_launches blocks


def tile(dim: int, cap: Optional[int] = None, floor: int = 16) -> int:
    """The power of two covering `dim`, at least `floor` and at most `cap` (None: no cap)."""
    size = max(floor, triton.next_power_of_2(dim))
    return size if cap is None else min(cap, size)


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter]:
    """Kernel name -> launches inside the block (every memmix kernel launches through `launch`)."""
    counter = collections.Counter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query costs host time on every launch)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(kernel, grid: Union[tuple, Callable[[dict], tuple]], args: Sequence, constants: dict, config: dict,
           fallbacks: Optional[Callable[[dict], Sequence[dict]]] = None) -> None:
    """kernel[grid(config)](*args, **constants, **config); grid: a function of the config (where tiles decide the
    grid) or the grid itself.

    Under the interpreter the launch options are dropped. On a GPU, where `config` needs more shared memory or
    registers than the GPU has (OutOfResources), the configs `fallbacks(config)` gives are tried in order; the config
    that launched is remembered for the same kernel, constants, config and tensor dtypes, so later launches go
    straight to it. A fallback must not change what the caller sized from `config` (its buffers, its grid's
    meaning)."""
    for counter in _COUNTERS:
        counter[kernel.fn.__name__] += 1
    if INTERPRET:
        options = {key: value for key, value in config.items() if key not in LAUNCH_OPTIONS}
        kernel[_grid(grid, options)](*args, **constants, **options)
        return
    if fallbacks is None:  # nothing to step down to: no key to build (host time on every launch)
        kernel[_grid(grid, config)](*args, **constants, **config)
        return
    from triton.runtime.errors import OutOfResources

    dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
    key = (id(kernel), dtypes, tuple(sorted(constants.items())), tuple(sorted(config.items())))
    candidates = [_CHOSEN[key]] if key in _CHOSEN else [config, *fallbacks(config)]
    for i, candidate in enumerate(candidates):
        try:
            kernel[_grid(grid, candidate)](*args, **constants, **candidate)
        except OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _CHOSEN[key] = candidate
        return


def _grid(grid: Union[tuple, Callable[[dict], tuple]], config: dict) -> tuple:
    return grid(config) if callable(grid) else grid
