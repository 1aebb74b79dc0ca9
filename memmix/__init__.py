"""memmix: linear-time sequence models with several memories (MoM, B'MOJO, modality-aware routing).

Importing memmix registers "memmix_mom" and "memmix_bmojo" with transformers' Auto* classes.
"""
__version__ = "0.1.0"

from memmix import ops  # noqa: E402
from memmix.models import (  # noqa: E402
    BMojoConfig,
    BMojoForCausalLM,
    BMojoModel,
    MoMCache,
    MoMConfig,
    MoMForCausalLM,
    MoMModel,
)

__all__ = ["BMojoConfig", "BMojoForCausalLM", "BMojoModel", "MoMCache", "MoMConfig", "MoMForCausalLM", "MoMModel",
           "ops"]
