"""A chat model: base + adapters, the training chat template, streaming generation."""

from __future__ import annotations

from threading import Thread
from typing import Iterator

import torch

from ..loading import load_for_use
from .generation import chat_input_ids, generation_kwargs


class ChatModel:
    def __init__(self, cfg):
        """The model, adapters and template `cfg` describes (loading.load_for_use, "chat"):
        raises what that raises."""
        self.cfg = cfg
        ready = load_for_use(cfg, "chat")
        self.model = ready.model
        self.tokenizer = ready.tokenizer

    def _inputs(self, messages: list[dict], system: str | None) -> dict:
        system = system if system is not None else self.cfg.generate.default_system
        ids = chat_input_ids(self.tokenizer, messages, system, self.model.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _generation_kwargs(self, **overrides) -> dict:
        return {**generation_kwargs(self.cfg.generate, self.tokenizer), **overrides}

    def stream(self, messages: list[dict], system: str | None = None, **overrides) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**self._inputs(messages, system), **self._generation_kwargs(**overrides),
                  "streamer": streamer}
        errors: list[BaseException] = []

        def generate():
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = Thread(target=generate, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    def answer(self, messages: list[dict], system: str | None = None, **overrides) -> str:
        inputs = self._inputs(messages, system)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self._generation_kwargs(**overrides))
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
