"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual token embeddings put before the
input, produced by a prompt encoder (an MLP, or a bidirectional LSTM and an MLP) from learned
inputs. peft's `PromptEncoderConfig` field names, peft_type "P_TUNING".

    from tuneforge import PromptEncoderConfig, add_adapter
    add_adapter(model, PromptEncoderConfig(num_virtual_tokens=20, encoder_reparameterization_type="MLP"))

Encoder (peft's layout, all fp32), from `embedding` (num_virtual_tokens, token_dim):
- MLP: Linear(token_dim, h), ReLU, Linear(h, h), ReLU, Linear(h, token_dim) (`mlp_head`);
- LSTM: LSTM(token_dim, h, encoder_num_layers, bidirectional, encoder_dropout) (`lstm_head`),
  then Linear(2h, 2h), ReLU, Linear(2h, token_dim) (`mlp_head`);
with h = encoder_hidden_size (default token_dim). Files hold the encoder's output, (N, token_dim)
`prompt_embeddings`, as peft saves it; a loaded adapter holds that tensor directly. The prompt
reaches the model as prompt tuning's does (virtual_tokens.py). Merging is refused.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, warn_unknown_fields
from .virtual_tokens import PROMPT_FIELDS, attach, check_common, detach, model_dims

FIELDS = (*PROMPT_FIELDS, "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
          "encoder_dropout")  # fmt: skip
TYPES = ("MLP", "LSTM")
WHY = "P-tuning adds virtual tokens before the input, which no weight can hold"


@dataclass
class PromptEncoderConfig:
    """Settings of one P-tuning adapter; names and meanings follow peft's `PromptEncoderConfig`."""

    num_virtual_tokens: int = 20
    """Virtual tokens put before every input."""
    encoder_reparameterization_type: str = "MLP"
    """The prompt encoder: MLP or LSTM."""
    encoder_hidden_size: int | None = None
    """Hidden size of the prompt encoder; empty: token_dim."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP always has peft's 3 linear layers)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers."""
    inference_mode: bool = False
    """True: the prompt is the plain (N, token_dim) tensor (loaded adapters)."""
    token_dim: int | None = None
    num_transformer_submodules: int | None = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        check_common(self)
        kind = str(self.encoder_reparameterization_type).upper()
        if kind not in TYPES:
            raise ConfigError(f"encoder_reparameterization_type must be MLP or LSTM, got "
                              f"{self.encoder_reparameterization_type!r}")
        self.encoder_reparameterization_type = kind
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ConfigError(f"encoder_hidden_size must be a positive integer or empty, got {h!r}")
        n = self.encoder_num_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"encoder_num_layers must be a positive integer, got {n!r}")
        d = self.encoder_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {d!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PromptEncoder(nn.Module):
    """`embedding` through `mlp_head` (MLP) or `lstm_head` then `mlp_head` (LSTM); only
    `embedding` in inference mode (then the prompt itself)."""

    kind = "input"

    def __init__(self, cfg: PromptEncoderConfig):
        super().__init__()
        self.num_virtual_tokens = cfg.num_virtual_tokens
        dim, h = cfg.token_dim, cfg.encoder_hidden_size
        self.encoder_type = None if cfg.inference_mode else cfg.encoder_reparameterization_type
        self.embedding = nn.Embedding(cfg.num_virtual_tokens, dim)
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(dim, h, num_layers=cfg.encoder_num_layers, dropout=cfg.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, dim))
        elif self.encoder_type == "MLP":
            if cfg.encoder_num_layers != 2:
                warnings.warn("encoder_num_layers is ignored for encoder_reparameterization_type MLP "
                              "(it always has 3 linear layers, as in peft)", stacklevel=4)
            self.mlp_head = nn.Sequential(nn.Linear(dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, dim))

    def prompt(self) -> torch.Tensor:
        """(num_virtual_tokens, token_dim)."""
        x = self.embedding.weight
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(x.unsqueeze(0))[0])[0]
        if self.encoder_type == "MLP":
            return self.mlp_head(x)
        return x

    def saved(self) -> torch.Tensor:
        return self.embedding.weight if self.encoder_type is None else self.prompt().detach()


def _inject(model: nn.Module, cfg: PromptEncoderConfig, name: str) -> None:
    for key, value in model_dims(model, kv=False).items():
        setattr(cfg, key, value)
    cfg.num_transformer_submodules = 1
    if cfg.encoder_hidden_size is None:
        cfg.encoder_hidden_size = cfg.token_dim
    attach(model, name, PromptEncoder(cfg), WHY)


def _to_peft(model: nn.Module, name: str, cfg: PromptEncoderConfig, layers: list) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in PROMPT_FIELDS}
    out.update({k: getattr(cfg, k) for k in FIELDS if k not in PROMPT_FIELDS})
    return out


def _from_peft(raw: dict[str, Any], source: str) -> PromptEncoderConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(PromptEncoderConfig, raw, FIELDS, source, inference_mode=True)


def _from_finetune_args(finetune) -> PromptEncoderConfig:
    return PromptEncoderConfig(num_virtual_tokens=finetune.num_virtual_tokens,
                               encoder_reparameterization_type=finetune.encoder_reparameterization_type,
                               encoder_hidden_size=finetune.encoder_hidden_size)


register_method(AdapterMethod(
    cannot_merge=lambda cfg: WHY,
    name="ptuning", peft_type="P_TUNING", label="P-tuning", config_class=PromptEncoderConfig,
    inject=_inject, remove=detach, config_to_peft=_to_peft, config_from_peft=_from_peft,
    from_finetune_args=_from_finetune_args,
    keys=("num_virtual_tokens", "encoder_hidden_size", "encoder_reparameterization_type"),
))  # fmt: skip
