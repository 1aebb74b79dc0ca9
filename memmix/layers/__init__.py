"""nn.Modules: token mixers (MoM, attention), norms and MLPs."""
from memmix.layers.mom import MixtureOfMemories, MoMLayerOutput, MoMState
from memmix.layers.norms import GatedRMSNorm, RMSNorm

__all__ = ["MixtureOfMemories", "MoMLayerOutput", "MoMState", "GatedRMSNorm", "RMSNorm"]
