"""Virtual tokens: what prompt tuning, P-tuning and prefix tuning share (peft's "prompt learning").

These methods change the model, not its layers. Each adapter is an *encoder* (an `nn.Module`
whose `prompt()` gives the virtual tokens of one sample):
- kind "input" (prompt tuning, P-tuning): (N, token_dim) embeddings put before the input
  embeddings;
- kind "kv" (prefix tuning, P-tuning v2): (N, num_layers * 2 * token_dim) keys and values put
  in front of every attention layer's cache (a transformers `Cache`).

The encoders of all such adapters live in one module, `model.tuneforge_virtual_tokens`
(`VirtualTokens`, an AdapterLayer, so activation, trainability, disabling, routing, deletion,
saving and loading go through the generic life cycle). It runs the model's forward through a
forward pre-hook and a forward hook (installed on the first such adapter, removed with the
last) that rewrite the call; the rewriting is in `virtual_forward.py`.

Outside the model, virtual tokens do not exist: callers pass and get back tensors for their
real tokens only (logits, hidden states, labels, attention mask, position ids of real tokens).
Only the cache holds the virtual positions. A caller that keeps its own attention mask over the
cache (the continuous batcher) asks `virtual_mask(model, names)` for the columns to put in
front of it and passes that longer mask; see virtual_forward.py.

Files are peft's: one tensor `prompt_embeddings` (no `base_model.model.` prefix), the encoder's
output for one sample; reparametrised encoders (prefix_projection, P-tuning's MLP / LSTM) are
folded into it, so a loaded adapter holds the plain embedding (peft's `inference_mode`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .layer import AdapterLayer
from .peft_config import task_type
from .virtual_forward import HOLDER, install, layout
# peft's fields of every prompt-learning adapter_config.json
PROMPT_FIELDS = ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                 "num_layers", "modules_to_save")  # fmt: skip


def model_dims(model: nn.Module, kv: bool) -> dict[str, int]:
    """peft's token_dim / num_attention_heads / num_layers for `model` (its config). For key/value
    prefixes of a grouped-query model, token_dim is head_dim * num_key_value_heads and
    num_attention_heads the number of key/value heads (as peft computes them).
    Raises ConfigError for a model that is not a decoder-only transformers language model."""
    if task_type(model) != "CAUSAL_LM":
        raise ConfigError(
            f"virtual-token methods (prompt / prefix tuning, P-tuning) need a decoder-only language model "
            f"(transformers' GenerationMixin), not a {type(model).__name__}"
        )
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*keys):
        for k in keys:
            v = getattr(config, k, None)
            if isinstance(v, int) and v > 0:
                return v
        raise ConfigError(
            f"{type(model).__name__} has no config naming its {keys[0]}; virtual-token methods need a "
            "transformers model"
        )

    layers = first("num_hidden_layers", "num_layers", "n_layer")
    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    if kv and getattr(config, "num_key_value_heads", None):
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        heads = config.num_key_value_heads
        hidden = head_dim * heads
    return {"token_dim": hidden, "num_attention_heads": heads, "num_layers": layers}


def check_common(cfg: Any) -> None:
    """ConfigError (one line naming the field) for a bad num_virtual_tokens / num_transformer_submodules."""
    n = cfg.num_virtual_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"num_virtual_tokens must be a positive integer (e.g. 20), got {n!r}")
    if cfg.num_transformer_submodules not in (None, 1):
        raise ConfigError(
            f"num_transformer_submodules={cfg.num_transformer_submodules!r}: only decoder-only models (1) are "
            "supported"
        )
    if cfg.modules_to_save:
        raise ConfigError("modules_to_save is not supported with virtual-token methods; leave it empty")


class VirtualTokens(AdapterLayer, nn.Module):
    """The model's virtual-token adapters: `encoders[name]` (an encoder, see module doc)."""

    method_name = "virtual_tokens"
    param_dicts = ("encoders",)
    route_attr = "_vt_route"
    _vt_route = None

    def __init__(self, model: nn.Module):
        nn.Module.__init__(self)
        self.encoders = nn.ModuleDict()
        self.reasons: dict[str, str] = {}  # adapter -> why it cannot merge
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.calls: list[int] = []  # per running forward: real tokens to keep (output trimming)
        self._model = weakref.ref(model)
        self._hooks: list[Any] = []
        self.paused: list[nn.Module] = []  # layers whose activation checkpointing this forward paused
        self.warned_checkpointing = False

    # ---- the adapter-layer protocol ---------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.encoders.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name not in self.encoders:
            return {}
        return {f"encoders.{name}.{k}": p for k, p in self.encoders[name].named_parameters()}

    def fp32_parameters(self) -> list[nn.Parameter]:
        return list(self.encoders.parameters())

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """{'prompt_embeddings': (N, dim)}: the folded prompt; a parameter where nothing is folded."""
        return {"prompt_embeddings": self.encoders[name].saved()}

    peft_keys_at_root = True  # peft writes 'prompt_embeddings' without the module path

    def shape_hint(self, name: str) -> str:
        return f"num_virtual_tokens={self.encoders[name].num_virtual_tokens}"

    @property
    def adapters_disabled(self) -> bool:
        return self.disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.disabled = flag

    def set_active(self, names) -> None:
        self.active = tuple(n for n in names if n in self.encoders)

    def delete_adapter(self, name: str) -> None:
        del self.encoders[name]
        self.reasons.pop(name, None)
        self.active = tuple(n for n in self.active if n != name)

    def cannot_merge(self) -> str | None:
        return "; ".join(dict.fromkeys(self.reasons.values())) or None

    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        return []  # nothing here merges; merge_adapters refuses these adapters through cannot_merge

    def strip(self) -> None:
        """Remove the hooks and this module from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        model = self._model()
        if model is not None and model._modules.get(HOLDER) is self:
            del model._modules[HOLDER]

    # ---- for virtual_forward.py ------------------------------------------------------------
    def row_adapters(self, batch: int) -> list[str | None]:
        """The virtual-token adapter of each of `batch` rows (None: none), from routing or the active ones."""
        route = self._vt_route
        if route is not None:
            route._check(self)
            n = len(route.names)
            if batch % n or batch == 0:
                route.groups(self, batch, torch.device("cpu"))  # raises routing's own message
            k = batch // n
            return [name if name in self.encoders else None for name in route.names for _ in range(k)]
        if self.disabled or not self.active:
            return [None] * batch
        if len(self.active) > 1:
            raise ConfigError(
                f"adapters {list(self.active)} each add virtual tokens; activate one of them at a time "
                "(or route requests to them with route_adapters)"
            )
        return [self.active[0]] * batch

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {e.kind} x{e.num_virtual_tokens}" for n, e in self.encoders.items())


def holder(model: nn.Module) -> VirtualTokens | None:
    got = model._modules.get(HOLDER)
    return got if isinstance(got, VirtualTokens) else None


def attach(model: nn.Module, name: str, encoder: nn.Module, why_no_merge: str) -> None:
    """Add `encoder` as virtual-token adapter `name` (the AdapterMethod's inject step)."""
    vt = holder(model)
    if vt is None:
        if HOLDER in model._modules:
            raise ConfigError(f"{type(model).__name__} already has a module named {HOLDER!r}")
        vt = VirtualTokens(model)
        model.add_module(HOLDER, vt)
        install(model, vt)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    vt.encoders[name] = encoder.to(device) if device is not None else encoder
    vt.reasons[name] = why_no_merge


def detach(model: nn.Module, name: str) -> None:
    """The AdapterMethod's remove step: drop `name`; the last one takes the hooks with it."""
    vt = holder(model)
    if vt is None:
        return
    if name in vt.encoders:
        vt.delete_adapter(name)
    if not vt.encoders:
        vt.strip()


def virtual_mask(model: nn.Module, names: list[str]) -> torch.Tensor | None:
    """(len(names), V) ones and zeros: the attention-mask columns the model puts in front of rows
    routed to adapters `names` (routing's names, '__base__' included) when it prefills them; None
    when none of them adds virtual tokens. A caller that keeps one mask over the whole cache (the
    continuous batcher) prepends these columns and passes the longer mask."""
    vt = holder(model)
    if vt is None:
        return None
    rows = [n if n in vt.encoders else None for n in names]
    if all(r is None for r in rows):
        return None
    device = next(iter(vt.encoders.parameters())).device
    plan = layout(vt, rows, device)
    return plan.virtual
