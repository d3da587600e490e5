"""OpenAI-compatible HTTP server: one base model, several LoRA adapters chosen per request."""

from .engine import Engine

__all__ = ["Engine"]
