"""DreamMix: subject-driven image inpainting with decoupled, editable attributes."""

__version__ = "0.1.0"
