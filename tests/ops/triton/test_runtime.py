"""The Triton runtime's host-side pieces: tiles, the forced sequence form, and the launch count (the launches
themselves run in the interpreter tests)."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


def test_tiles_are_powers_of_two_within_floor_and_cap():
    from memmix.ops.triton.runtime import tile

    assert [tile(n) for n in (1, 16, 17, 100, 300)] == [16, 16, 32, 128, 512]  # no cap by default
    assert tile(100, 64) == 64 and tile(3, 64, floor=4) == 4 and tile(3, floor=1) == 4 and tile(1, floor=1) == 1


def test_forced_form_overrides_the_choice_by_head_width_inside_its_block_only():
    from memmix.ops.triton import RECURRENT_KERNEL_MAX_K, RECURRENT_MAX_K, forced_form, sequence_form

    assert sequence_form(RECURRENT_MAX_K) == "recurrent" and sequence_form(RECURRENT_MAX_K + 1) == "chunked"
    with forced_form("chunked"):
        assert sequence_form(16) == "chunked"
        with forced_form(None):  # nested: the choice by width again
            assert sequence_form(16) == "recurrent"
        assert sequence_form(16) == "chunked"
    with forced_form("recurrent"):
        assert sequence_form(RECURRENT_KERNEL_MAX_K) == "recurrent"
        assert sequence_form(RECURRENT_KERNEL_MAX_K + 1) == "chunked"  # beyond what the recurrent kernels take
    assert sequence_form(16) == "recurrent"
    with pytest.raises(ValueError, match="form must be None or one of"):
        with forced_form("fused"):
            pass


def test_count_launches_counts_by_kernel_name_inside_its_block(monkeypatch):
    from memmix.ops.triton import runtime

    launched = []

    class FakeKernel:  # what runtime.launch needs of a JITFunction: .fn and kernel[grid](...)
        def fn(self):
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, args, kwargs))

    monkeypatch.setattr(runtime, "INTERPRET", False)
    kernel = FakeKernel()
    with runtime.count_launches() as outer:
        runtime.launch(kernel, (2, 3), (1,), {"K": 16}, {"num_warps": 4})
        with runtime.count_launches() as inner:
            runtime.launch(kernel, lambda config: (config["BV"],), (), {}, {"BV": 8})
    runtime.launch(kernel, (1,), (), {}, {})
    assert outer == {"fn": 2} and inner == {"fn": 1}
    assert launched[0] == ((2, 3), (1,), {"K": 16, "num_warps": 4}) and launched[1][0] == (8,)
