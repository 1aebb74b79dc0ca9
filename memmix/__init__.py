"""memmix: linear-time sequence models with several memories."""
__version__ = "0.1.0"

# Models (importing them registers "memmix_mom" with transformers' Auto* classes).
from memmix.models import MoMCache, MoMConfig, MoMForCausalLM, MoMModel  # noqa: E402
# B'MOJO (importing it registers "memmix_bmojo" with the Auto* classes).
from memmix.models.configuration_bmojo import BMojoConfig  # noqa: E402
from memmix.models.modeling_bmojo import BMojoForCausalLM, BMojoModel  # noqa: E402
