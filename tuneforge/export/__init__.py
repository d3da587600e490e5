"""Export: merge adapters and write a standard Hugging Face model directory.

The package is also callable as `tuneforge.export(config)` (see tuneforge/entry.py: importing it
replaces the function of that name on tuneforge)."""

from tuneforge import entry

from .merge import export_model

entry.callable_package(__name__, entry.export)

__all__ = ["export_model"]
