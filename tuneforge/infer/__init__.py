"""Generation: streaming chat on a base model plus adapters."""

from .chat import ChatModel

__all__ = ["ChatModel"]
