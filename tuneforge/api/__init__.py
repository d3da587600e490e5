"""OpenAI-compatible HTTP server: one base model, several LoRA adapters chosen per request.
The HTTP layer lives here; the model, batching and stop strings are tuneforge.infer.engine's."""

from ..infer.engine import Engine

__all__ = ["Engine"]
