"""A chat model: base + adapters, the training chat template, streaming generation."""

from __future__ import annotations

from threading import Thread
from typing import Iterator

import torch

from ..loading import load_for_use
from ..models import split_paths
from .generation import (
    chat_input_ids,
    context_length,
    context_room,
    generation_kwargs,
    virtual_prefix,
)
from .stream import RequestError


class ChatModel:
    def __init__(self, cfg):
        """The model, adapters and template `cfg` describes (loading.load_for_use, "chat"):
        raises what that raises."""
        self.cfg = cfg
        ready = load_for_use(cfg, "chat")
        self.model = ready.model
        self.tokenizer = ready.tokenizer
        self.context = context_length(self.model, self.tokenizer)  # None: the model names none

    def _inputs(self, messages: list[dict], system: str | None) -> dict:
        system = system if system is not None else self.cfg.generate.default_system
        ids = chat_input_ids(self.tokenizer, messages, system, self.model.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def virtual_tokens(self) -> tuple[int, str | None]:
        """(N, label): the virtual tokens the active adapter puts before every prompt (prompt /
        prefix tuning, P-tuning, MAM: generation.virtual_prefix) and that adapter as the config
        names it (its path), for messages; (0, None) without such an adapter."""
        virtual, name = virtual_prefix(self.model)
        label = (split_paths(self.cfg.model.adapter_name_or_path) or [name])[-1] if virtual else None
        return virtual, label

    def _generation_kwargs(self, prompt_tokens: int, **overrides) -> dict:
        """The config's generation keys, then `overrides`; max_new_tokens capped to what the
        context leaves after the prompt and the active adapter's virtual tokens (prompt / prefix
        tuning). Raises RequestError (a TuneforgeError) when the prompt leaves no room."""
        kwargs = {**generation_kwargs(self.cfg.generate, self.tokenizer), **overrides}
        if self.context is not None:
            virtual, label = self.virtual_tokens()
            try:
                room = context_room(self.context, prompt_tokens, virtual, label)
            except ValueError as exc:
                raise RequestError(str(exc), param="messages") from None
            kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens") or room, room)
        return kwargs

    def stream(self, messages: list[dict], system: str | None = None, **overrides) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = self._inputs(messages, system)
        kwargs = {**inputs, **self._generation_kwargs(inputs["input_ids"].shape[1], **overrides),
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
        kwargs = self._generation_kwargs(inputs["input_ids"].shape[1], **overrides)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
