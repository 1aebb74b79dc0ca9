"""nn.Modules: token mixers (MoM, attention), norms and MLPs."""
from memmix.layers.bmojo import BMojo, BMojoLayerOutput, BMojoState
from memmix.layers.bmojo_f import BMojoF, BMojoFLayerOutput, BMojoFState, bmojo_f_reference
from memmix.layers.mom import MixtureOfMemories, MoMLayerOutput, MoMState
from memmix.layers.norms import GatedRMSNorm, RMSNorm

__all__ = ["BMojo", "BMojoLayerOutput", "BMojoState", "BMojoF", "BMojoFLayerOutput", "BMojoFState", "bmojo_f_reference",
           "MixtureOfMemories", "MoMLayerOutput", "MoMState", "GatedRMSNorm", "RMSNorm"]
