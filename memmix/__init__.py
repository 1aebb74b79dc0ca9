"""memmix: linear-time sequence models with several memories (MoM, B'MOJO, modality-aware routing).

`import memmix` is light: torch and transformers load on first use of an attribute (`memmix.MoMConfig`,
`memmix.ops`, ...). Importing memmix still registers "memmix_mom" and "memmix_bmojo" with transformers' Auto*
classes, in either import order: at once when transformers is already imported, otherwise as soon as transformers
finishes importing.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# attribute -> the module that defines it (PEP 562: imported on first access)
_LAZY = {
    "BMojoConfig": "memmix.models",
    "BMojoForCausalLM": "memmix.models",
    "BMojoModel": "memmix.models",
    "LayerStateCache": "memmix.models",
    "MoMConfig": "memmix.models",
    "MoMForCausalLM": "memmix.models",
    "MoMModel": "memmix.models",
}
_SUBMODULES = ("ops", "layers", "models", "data", "training", "evaluation", "files")

__all__ = sorted(_LAZY) + ["ops"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"memmix.{name}")
    else:
        raise AttributeError(f"module 'memmix' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def _register_auto_classes() -> None:
    """Register memmix's configs and models with transformers' Auto* classes (idempotent)."""
    partial = sys.modules.get("memmix.models")
    if partial is not None and getattr(getattr(partial, "__spec__", None), "_initializing", False):
        return  # memmix.models is being imported right now (it imports transformers); it registers itself
    models = importlib.import_module("memmix.models")
    models.register_auto_classes()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """One-shot import hook: once the top-level `transformers` module has finished importing, register memmix."""

    memmix_hook = True

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)  # the ordinary finders; this hook is already gone
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                _register_auto_classes()
            except Exception as exc:  # never break the user's `import transformers`
                warnings.warn(f"memmix could not register its models with transformers: {exc!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_register  # this loader instance serves this one module only
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "memmix_hook", False)]


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(getattr(f, "memmix_hook", False) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
