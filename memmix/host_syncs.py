"""find_host_syncs: the device-to-host synchronisations a function makes, found on any device (a CUDA graph cannot
capture them; TrainStep checks its step with it before a capture, and tests check CUDA paths on the CPU)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# aten ops that read a device value back to the host (or size an output by data) and so cannot be captured
_SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                "unique_consecutive", "unique_dim", "equal", "is_nonzero", "bincount")


class _SyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        data_sized = name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(
            args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor))
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        to_host = name in ("_to_copy", "copy_") and _moves_to_host(func, args, kwargs)
        if name in _SYNCING_OPS or data_sized or boolean_index or to_host:
            self.found.append(str(func))
        return func(*args, **kwargs)


def _moves_to_host(func, args, kwargs) -> bool:
    """A copy from an accelerator tensor into host memory (on CUDA: a synchronising device-to-host copy)."""
    name = func.overloadpacket.__name__
    if name == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    target = kwargs.get("device")
    return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


def _flag_tensor_method(recorder: _SyncRecorder, name: str):
    original = getattr(torch.Tensor, name)

    def flagged(self, *args, **kwargs):
        recorder.found.append(f"Tensor.{name}")
        return original(self, *args, **kwargs)

    return original, flagged


def find_host_syncs(fn: Callable[[], Any]) -> list[str]:
    """Run fn() and return the aten ops it called that would synchronise a CUDA device with the host (or give an
    output sized by data): .item()/.tolist()/bool(tensor), nonzero, boolean-mask indexing, unique,
    repeat_interleave without output_size, bincount, device-to-host copies. Works on any device, so a CPU test can
    check most of a CUDA path (run the Triton path under TRITON_INTERPRET=1); it cannot see a host-to-device copy of
    data built on the host (torch.tensor(list, device=...)), which a capture also refuses.
    """
    recorder = _SyncRecorder()
    patched = {name: _flag_tensor_method(recorder, name) for name in ("tolist", "numpy")}  # not aten ops
    try:
        for name, (_, flagged) in patched.items():
            setattr(torch.Tensor, name, flagged)
        with recorder:
            fn()
    finally:
        for name, (original, _) in patched.items():
            setattr(torch.Tensor, name, original)
    return recorder.found
