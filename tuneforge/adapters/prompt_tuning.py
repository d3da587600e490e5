"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
`num_virtual_tokens` learned embeddings put before the input embeddings; nothing else changes.
peft's `PromptTuningConfig` field names, peft_type "PROMPT_TUNING".

    from tuneforge import PromptTuningConfig, add_adapter
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="text",
                                          prompt_tuning_init_text="Answer the question:"))

The adapter is one (num_virtual_tokens, token_dim) fp32 parameter
(`tuneforge_virtual_tokens.encoders.<adapter>.embedding.weight`), the file's `prompt_embeddings`.
It starts random (N(0, 1), as peft's nn.Embedding), as the embeddings of random vocabulary tokens
(`sample_vocab`), or (`text`) as the embeddings of the tokenised `prompt_tuning_init_text`
(tokenizer: `tokenizer_name_or_path`, default the model's own folder), repeated or cut to length.
How the prompts reach the model (masks, positions, labels, generation, routing): virtual_tokens.py.
Merging is refused: no weight can hold a prompt. YAML: `finetuning_type: prompt` with
`num_virtual_tokens`, `prompt_tuning_init`, `prompt_tuning_init_text`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, name_or_path, warn_unknown_fields
from .virtual_tokens import PROMPT_FIELDS, attach, check_common, detach, model_dims

INITS = ("random", "text", "sample_vocab")
FIELDS = (*PROMPT_FIELDS, "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
          "tokenizer_kwargs")  # fmt: skip
WHY = "prompt tuning adds virtual tokens before the input, which no weight can hold"


@dataclass
class PromptTuningConfig:
    """Settings of one prompt-tuning adapter; names and meanings follow peft's `PromptTuningConfig`."""

    num_virtual_tokens: int = 20
    """Virtual tokens put before every input."""
    prompt_tuning_init: str = "random"
    """random (N(0, 1)), sample_vocab (embeddings of random tokens) or text (prompt_tuning_init_text)."""
    prompt_tuning_init_text: str | None = None
    """The text whose token embeddings start the prompt (prompt_tuning_init: text)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer for prompt_tuning_init: text; empty: the model's own folder."""
    tokenizer_kwargs: dict | None = None
    """Extra arguments of AutoTokenizer.from_pretrained (prompt_tuning_init: text)."""
    token_dim: int | None = None
    """The model's hidden size (filled in from the model)."""
    num_transformer_submodules: int | None = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        check_common(self)
        init = str(self.prompt_tuning_init).lower()
        if init not in INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {', '.join(INITS)}, got {self.prompt_tuning_init!r}")
        self.prompt_tuning_init = init
        if init == "text" and not (isinstance(self.prompt_tuning_init_text, str) and self.prompt_tuning_init_text):
            raise ConfigError("prompt_tuning_init: text needs prompt_tuning_init_text (the text to start from)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PromptEmbedding(nn.Module):
    """The prompt: `embedding.weight` (num_virtual_tokens, token_dim)."""

    kind = "input"

    def __init__(self, num_virtual_tokens: int, token_dim: int, init: torch.Tensor | None = None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if init is not None:
            self.embedding.weight = nn.Parameter(init.detach().clone().float())

    def prompt(self) -> torch.Tensor:
        """(num_virtual_tokens, token_dim)."""
        return self.embedding.weight

    def saved(self) -> torch.Tensor:
        return self.embedding.weight


def _init_ids(model: nn.Module, cfg: PromptTuningConfig, n: int, vocab: int) -> torch.Tensor | None:
    if cfg.prompt_tuning_init == "sample_vocab":
        return torch.randint(0, vocab, (n,))
    if cfg.prompt_tuning_init != "text":
        return None
    from transformers import AutoTokenizer

    path = cfg.tokenizer_name_or_path or name_or_path(model)
    if not path:
        raise ConfigError("prompt_tuning_init: text needs tokenizer_name_or_path (the model has no folder to read it from)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **(cfg.tokenizer_kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - any failure: one line naming the path
        raise ConfigError(f"prompt_tuning_init: text could not load the tokenizer '{path}': "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    cfg.tokenizer_name_or_path = str(path)
    ids = tokenizer(cfg.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenises to no tokens; give a non-empty text")
    ids = (ids * math.ceil(n / len(ids)))[:n]  # peft: cut, or repeated then cut
    return torch.tensor(ids, dtype=torch.long)


def _inject(model: nn.Module, cfg: PromptTuningConfig, name: str) -> None:
    dims = model_dims(model, kv=False)
    for key, value in dims.items():
        setattr(cfg, key, value)
    cfg.num_transformer_submodules = 1
    emb = model.get_input_embeddings()
    ids = _init_ids(model, cfg, cfg.num_virtual_tokens, emb.num_embeddings)
    init = None
    if ids is not None:
        with torch.no_grad():
            init = emb(ids.to(emb.weight.device)).float()
    attach(model, name, PromptEmbedding(cfg.num_virtual_tokens, cfg.token_dim, init), WHY)


def _to_peft(model: nn.Module, name: str, cfg: PromptTuningConfig, layers: list) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in PROMPT_FIELDS}
    out.update(prompt_tuning_init=cfg.prompt_tuning_init.upper(), prompt_tuning_init_text=cfg.prompt_tuning_init_text,
               tokenizer_name_or_path=cfg.tokenizer_name_or_path, tokenizer_kwargs=cfg.tokenizer_kwargs)
    return out


def _from_peft(raw: dict[str, Any], source: str) -> PromptTuningConfig:
    warn_unknown_fields(raw, FIELDS, source)
    # a saved prompt is loaded over whatever init: no tokenizer needed
    return config_from_raw(PromptTuningConfig, raw, PROMPT_FIELDS, source, prompt_tuning_init="random")


def _from_finetune_args(finetune) -> PromptTuningConfig:
    return PromptTuningConfig(num_virtual_tokens=finetune.num_virtual_tokens, prompt_tuning_init=finetune.prompt_tuning_init,
                              prompt_tuning_init_text=finetune.prompt_tuning_init_text)


register_method(AdapterMethod(
    cannot_merge=lambda cfg: WHY,
    name="prompt", peft_type="PROMPT_TUNING", label="prompt tuning", config_class=PromptTuningConfig,
    inject=_inject, remove=detach, config_to_peft=_to_peft, config_from_peft=_from_peft,
    from_finetune_args=_from_finetune_args,
    keys=("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text"),
))  # fmt: skip
