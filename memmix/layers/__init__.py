"""nn.Modules: token mixers (MoM, attention), norms and MLPs."""
from memmix.layers.bmojo import BMojo, BMojoLayerOutput, BMojoState
from memmix.layers.mom import MixtureOfMemories, MoMLayerOutput, MoMState
from memmix.layers.norms import GatedRMSNorm, RMSNorm

__all__ = ["BMojo", "BMojoLayerOutput", "BMojoState", "MixtureOfMemories", "MoMLayerOutput", "MoMState", "GatedRMSNorm", "RMSNorm"]
