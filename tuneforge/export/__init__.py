"""Export: merge adapters and write a standard Hugging Face model directory."""

from .merge import export_model

__all__ = ["export_model"]
