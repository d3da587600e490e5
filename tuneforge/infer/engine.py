"""The model `tuneforge api` generates with: one base model, several LoRA adapters loaded beside
it by name. Each request names the adapter it wants (or the base). One worker (batcher.py) runs
every request in one continuously batched decode loop: a request joins at the next step, each
row with its own adapter via `route_adapters` and its own sampling, so no global "active
adapter" is switched and nobody waits for another request to finish."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ConfigError, ModelError
from .generation import chat_input_ids, generation_kwargs, pad_id


@dataclass
class GenerationResult:
    """Filled in once a Generation has been iterated to its end."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    text: str = ""


@dataclass
class Generation:
    """Iterate for the answer's text pieces; `result` holds counts once iteration ends."""
    pieces: Iterator[str]
    result: GenerationResult = field(default_factory=GenerationResult)

    def __iter__(self) -> Iterator[str]:
        return self.pieces


class Engine:
    def __init__(self, model, tokenizer, adapters: dict[str, str] | None = None,
                 base_name: str = "base", gen_defaults=None, default_system: str | None = None,
                 max_batch_size: int = 8):
        """adapters: public model id -> adapter name inside `model` (loaded with tuneforge.adapters)."""
        from ..config import GeneratingArguments

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = dict(adapters or {})
        self.base_name = base_name
        if base_name in self.adapters:
            raise ConfigError(f"adapter name {base_name!r} is also the base model's name; rename its folder")
        self.gen = gen_defaults or GeneratingArguments()
        self.default_system = default_system
        from .batcher import Batcher

        self.batcher = Batcher(self.model, pad_id(tokenizer), _ids(tokenizer.eos_token_id),
                               routed=bool(self.adapters), max_batch_size=max_batch_size)

    @classmethod
    def from_config(cls, cfg) -> "Engine":
        """Base from model_name_or_path; every folder in adapter_name_or_path (comma-separated)
        becomes a servable model named after the folder (not merged, unlike `tuneforge chat`)."""
        from .. import adapters as engine
        from ..data import apply_template
        from ..models import load_model_and_tokenizer, split_paths
        from ..quant.provenance import check_base

        paths = split_paths(cfg.model.adapter_name_or_path)
        names = [Path(p).name for p in paths]
        for path in paths:
            if not Path(path).is_dir():
                raise ModelError(f"adapter path '{path}' does not exist")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"adapter_name_or_path: several adapter folders are named {dupes}; "
                              "the served model ids are folder names, so rename them")
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        apply_template(tokenizer, cfg.data.template)
        internal = {}
        for i, (name, path) in enumerate(zip(names, paths)):
            check_base(model, path)
            internal[name] = f"serve_{i}"  # folder names may hold characters adapter names may not
            engine.load_adapter(model, path, name=internal[name])
        model.config.use_cache = True
        base = Path(str(getattr(model, "name_or_path", "") or "base").rstrip("/")).name or "base"
        return cls(model, tokenizer, internal, base_name=base, gen_defaults=cfg.generate,
                   default_system=cfg.generate.default_system,
                   max_batch_size=cfg.serve.api_max_batch_size)

    def model_ids(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def has_model(self, name: str) -> bool:
        return name == self.base_name or name in self.adapters

    # ---- generation ----------------------------------------------------------------------------
    def encode(self, messages: list[dict]) -> torch.Tensor:
        return chat_input_ids(self.tokenizer, messages, self.default_system, self.model.device)

    def generation_kwargs(self, temperature=None, top_p=None, max_tokens=None) -> dict:
        """Request values first, the config's generation keys for what the request leaves out."""
        return generation_kwargs(self.gen, self.tokenizer, temperature, top_p, max_tokens)

    def generate(self, model_name: str, messages: list[dict], stop: list[str] | None = None,
                 seed: int | None = None, **sampling) -> Generation:
        """Queue the request for adapter `model_name` (or the base) and stream its answer. Stop
        strings end the answer and are not part of it; text that might begin a stop string is
        held back until it is known not to."""
        from ..adapters.routing import BASE
        from .batcher import END, Job

        if not self.has_model(model_name):
            raise KeyError(model_name)
        input_ids = self.encode(messages)
        kwargs = self.generation_kwargs(**sampling)
        job = self.batcher.submit(Job(input_ids, self.adapters.get(model_name, BASE), kwargs, seed))
        result = GenerationResult(prompt_tokens=input_ids.shape[1])

        def tokens():
            while (item := job.out.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                yield item

        def pieces() -> Iterator[str]:
            stops = stop or []
            hold = max((len(s) for s in stops), default=1) - 1
            ids: list[int] = []
            text, sent, stopped = "", 0, False
            try:
                for tok in tokens():
                    ids.append(tok)
                    if stopped:
                        continue  # drain until the batch notices the cancel flag
                    decoded = self.tokenizer.decode(ids, skip_special_tokens=True)
                    if decoded.endswith("\ufffd") or not decoded.startswith(text):
                        continue  # half a character, or a merge that rewrites the tail: wait
                    text = decoded
                    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        text, stopped = text[:cut], True
                        job.cancel.set()
                    safe = len(text) if stopped else max(sent, len(text) - hold)
                    if safe > sent:
                        yield text[sent:safe]
                        sent = safe
                if not stopped:
                    final = self.tokenizer.decode(ids, skip_special_tokens=True)
                    text = final if final.startswith(text[:sent]) else text
                    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        text, stopped = text[:cut], True
                if sent < len(text):
                    yield text[sent:]
            finally:
                job.cancel.set()  # also when the client went away mid-stream
            result.completion_tokens = len(ids)
            result.text = text
            ended_by_eos = bool(ids) and ids[-1] in _ids(kwargs["eos_token_id"])
            result.finish_reason = ("length" if not stopped and not ended_by_eos
                                    and len(ids) >= kwargs["max_new_tokens"] else "stop")

        return Generation(pieces(), result)


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}
