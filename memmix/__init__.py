"""memmix: linear-time sequence models with several memories."""
__version__ = "0.1.0"
