"""The model `tuneforge api` generates with: one base model, several LoRA adapters loaded beside
it by name. Each request names the adapter it wants (or the base). One worker (batcher.py) runs
every request in one continuously batched decode loop: a request joins at the next step, each
row with its own adapter via `route_adapters` and its own sampling, so no global "active
adapter" is switched and nobody waits for another request to finish."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..adapters.routing import BASE
from ..config import GeneratingArguments
from ..data.templates import TemplateRefused
from ..errors import ConfigError
from ..loading import load_for_use
from .batcher import Batcher, Job
from .generation import (
    chat_input_ids,
    context_length,
    context_room,
    generation_kwargs,
    pad_id,
    virtual_prefix,
)
from .stream import Generation, GenerationResult, RequestError, Unavailable
from .textstream import TextAssembler

__all__ = ["Engine", "Generation", "GenerationResult", "RequestError", "Unavailable"]


class Engine:
    def __init__(self, model, tokenizer, adapters: dict[str, str] | None = None,
                 base_name: str = "base", gen_defaults=None, default_system: str | None = None,
                 max_batch_size: int = 8, context: int | None = None):
        """adapters: public model id -> adapter name inside `model` (loaded with tuneforge.adapters).
        context: most tokens a prompt and its answer may hold together; None reads the model's
        own (max_position_embeddings, ...). Raises ConfigError for an adapter named as the base."""

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = dict(adapters or {})
        self.base_name = base_name
        if base_name in self.adapters:
            raise ConfigError(f"adapter name {base_name!r} is also the base model's name; rename its folder")
        self.gen = gen_defaults or GeneratingArguments()
        self.default_system = default_system
        self.context = context if context is not None else context_length(model, tokenizer)
        self.accepting = True
        self._encode_lock = threading.Lock()  # one tokenizer, requests arriving on many threads

        self.eos_ids = _ids(tokenizer.eos_token_id)
        self.batcher = Batcher(self.model, pad_id(tokenizer), self.eos_ids,
                               routed=bool(self.adapters), max_batch_size=max_batch_size)

    @classmethod
    def from_config(cls, cfg) -> "Engine":
        """Base from model_name_or_path; every folder in adapter_name_or_path (comma-separated)
        becomes a servable model named after the folder (not merged, unlike `tuneforge chat`),
        loaded by loading.load_for_use ("serve"). Raises ModelError for an adapter path that is
        missing or a file, ConfigError for two adapter folders of one name and for a LoftQ
        adapter beside others, and what loading the model or an adapter raises."""

        ready = load_for_use(cfg, "serve")
        model = ready.model
        base = Path(str(getattr(model, "name_or_path", "") or "base").rstrip("/")).name or "base"
        return cls(model, ready.tokenizer, ready.served, base_name=base, gen_defaults=cfg.generate,
                   default_system=cfg.generate.default_system,
                   max_batch_size=cfg.serve.api_max_batch_size)

    def model_ids(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def has_model(self, name: str) -> bool:
        return name == self.base_name or name in self.adapters

    # ---- generation ----------------------------------------------------------------------------
    def encode(self, messages: list[dict]) -> torch.Tensor:
        """The prompt's token ids. Raises RequestError when the model's chat template refuses the
        messages (many raise for roles that do not alternate, or for a system turn)."""

        try:
            with self._encode_lock:
                return chat_input_ids(self.tokenizer, messages, self.default_system, self.model.device)
        except TemplateRefused as exc:
            raise RequestError(f"this model's chat template refuses the messages: {exc.reason}",
                               param="messages") from None

    def generation_kwargs(self, temperature=None, top_p=None, max_tokens=None) -> dict:
        """Request values first, the config's generation keys for what the request leaves out."""
        return generation_kwargs(self.gen, self.tokenizer, temperature, top_p, max_tokens)

    def virtual_tokens(self, model_name: str | None = None) -> tuple[int, str | None]:
        """(N, name): the context positions the virtual tokens of served model `model_name` take
        (prompt / prefix tuning, P-tuning, MAM adapters; generation.virtual_prefix) and the name
        to give them in messages; (0, None) for the base and adapters without virtual tokens. A
        model served without adapters runs with whatever is active in it."""
        if not self.adapters:
            return virtual_prefix(self.model)
        name = model_name if model_name is not None else self.base_name
        count, _ = virtual_prefix(self.model, self.adapters.get(name, BASE))
        return (count, name) if count else (0, None)

    def answer_budget(self, prompt_tokens: int, max_tokens: int | None, model_name: str | None = None) -> int:
        """Most tokens the answer may have: max_tokens capped to what the context leaves after
        the prompt and the virtual tokens of the adapter `model_name` names (the answer then ends
        with finish_reason "length", as OpenAI's API does); no max_tokens: all the context
        leaves. Raises RequestError (param "messages") for a prompt that leaves no room."""
        if self.context is None:  # a model that names no context length
            return max_tokens or self.gen.max_new_tokens
        try:
            room = context_room(self.context, prompt_tokens, *self.virtual_tokens(model_name))
        except ValueError as exc:
            raise RequestError(str(exc), param="messages") from None
        return room if max_tokens is None else min(max_tokens, room)

    def generate(self, model_name: str, messages: list[dict], stop: list[str] | None = None,
                 seed: int | None = None, **sampling) -> Generation:
        """One answer; see generate_choices."""
        return self.generate_choices(model_name, messages, 1, stop, seed, **sampling)[0]

    def generate_choices(self, model_name: str, messages: list[dict], n: int = 1,
                         stop: list[str] | None = None, seed: int | None = None,
                         temperature: float | None = None, top_p: float | None = None,
                         max_tokens: int | None = None) -> list[Generation]:
        """Queue n answers to one prompt for adapter `model_name` (or the base); they share the
        batch, choice i seeded with seed + i. Stop strings end an answer and are not part of it.
        Raises KeyError for an unknown model, RequestError for a prompt the context cannot hold,
        Unavailable once the server is shutting down."""

        if not self.accepting:
            raise Unavailable("the server is shutting down and takes no new requests; retry later")
        if not self.has_model(model_name):
            raise KeyError(model_name)
        input_ids = self.encode(messages)
        prompt_tokens = input_ids.shape[1]
        budget = self.answer_budget(prompt_tokens, max_tokens, model_name)
        kwargs = self.generation_kwargs(temperature, top_p, budget)
        adapter = self.adapters.get(model_name, BASE)
        generations = []
        for i in range(n):
            job = Job(input_ids, adapter, kwargs, None if seed is None else seed + i)
            generations.append(Generation(job, TextAssembler(self.tokenizer, stop),
                                          self.eos_ids, prompt_tokens))
        self.batcher.submit(*(g.job for g in generations))
        return generations

    # ---- shutting down -------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        """New requests raise Unavailable from now on; running ones go on."""
        self.accepting = False

    def stop_all(self) -> int:
        """Stop every running and queued request (their readers get Unavailable); returns how many."""
        return self.batcher.stop_all("shutdown")


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}
