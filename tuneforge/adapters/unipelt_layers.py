"""The layers of a UniPELT adapter (unipelt.py): each part behind a learned sigmoid gate read from
the part's own input (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient
Language Model Tuning", section 3).

- `GatedLora` (on Linear-like layers):  y = W x + g_L(x) * s * B A dropout(x),
  g_L(x) = sigmoid(w_L . x + b_L), one value per position; s = lora_alpha / r.
- `GatedBlock` carries one of two parts, by the module it sits on:
  - after a block (the feed-forward block): y = m(x);  y + g_A(y) * s_A * up(f(down(y)))
    (a sequential bottleneck adapter, `GatedBottleneck`), g_A(y) = sigmoid(w_A . y + b_A);
  - on an attention module: the prefix's share of attention is gated. With logits z_j over the keys
    (a row's prefix: its first num_virtual_tokens attended columns, see virtual_tokens.py; padding
    may come before them in a batcher's cache), prefix column j gets z_j + log g_P(x) where
    g_P(x) = sigmoid(w_P . x + b_P) reads the attention input x at the query position: the prefix's
    unnormalised attention weights exp(z_j) are multiplied by g_P. g_P = 1 is plain prefix tuning,
    g_P = 0 removes the prefix exactly (the base model's attention).

Gates are per position rather than averaged over the sequence (as the encoder-model originals
do): an average would let a causal language model's earlier positions read later tokens and would
change during generation. Every tensor is fp32; gates start at nn.Linear's default init
(g about 1/2), LoRA's B and the adapter's up-projection at zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.quant.linear import QuantLinear

from .bottleneck import BottleneckAdapter, BottleneckLayer, layer_features, module_features
from .layer import AdapterLayer, Conv1D
from .virtual_forward import layout
from .virtual_tokens import holder

WHY = ("a UniPELT adapter multiplies each part by a gate computed from the layer input, adds key/value "
       "prefixes and a bottleneck adapter with a nonlinearity, none of which a weight can hold")


class UniPeltLayer(AdapterLayer):
    """What every UniPELT layer is (add_adapter's check that a layer holds adapters of one method)."""

    method_name = "unipelt"

    def cannot_merge(self) -> str | None:
        return WHY

    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        mine = [n for n in names if n in self.adapter_names()]
        if mine:
            raise ConfigError(f"cannot merge UniPELT adapters {mine}: {WHY}")
        return []


def _gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(..., in) -> (..., 1): sigmoid(w . x + b), in the gate's dtype (or autocast's)."""
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(weight.dtype)
    return torch.sigmoid(F.linear(x, weight, bias))


def _new_gate(in_features: int, device) -> tuple[nn.Parameter, nn.Parameter]:
    g = nn.Linear(in_features, 1, device=device)  # nn.Linear's default init
    return nn.Parameter(g.weight.detach()), nn.Parameter(g.bias.detach())


# ---- LoRA behind a gate ----------------------------------------------------------------------
class GatedLora(UniPeltLayer):
    """Mixin before a Linear-like base (nn.Linear, transformers' Conv1D, QuantLinear). Adapter `n`:
    `lora_A[n]` (r, in), `lora_B[n]` (out, r), `lora_gate[n]` (1, in), `lora_gate_bias[n]` (1,)."""

    param_dicts = ("lora_A", "lora_B", "lora_gate", "lora_gate_bias")
    state_attrs = ("unipelt_active", "unipelt_disabled", "lora_scaling", "lora_dropout", "_unipelt_route")
    base_class_attr = "_unipelt_base_class"
    route_attr = "_unipelt_route"
    _unipelt_route = None

    @classmethod
    def check_config(cls, module: nn.Module, path: str, cfg: Any) -> None:
        if layer_features(module) is None:
            raise ConfigError(f"UniPELT's LoRA part needs a Linear layer; {path} is a {type(module).__name__}")

    def setup(self, base_class: type) -> None:
        self._unipelt_base_class = base_class
        for d in self.param_dicts:
            setattr(self, d, nn.ParameterDict())
        self.unipelt_active: tuple[str, ...] = ()
        self.unipelt_disabled = False
        self.lora_scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}

    def add_from_config(self, name: str, cfg: Any, path: str, shared: Any = None) -> None:
        in_f, out_f = layer_features(self)
        device = next((t.device for t in (*self.parameters(), *self.buffers())), None)
        A = torch.empty(cfg.r, in_f, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's LoRA init: A random, B zero
        B = torch.zeros(out_f, cfg.r, device=device)
        if not cfg.init_lora_weights:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.lora_A[name], self.lora_B[name] = nn.Parameter(A), nn.Parameter(B)
        self.lora_gate[name], self.lora_gate_bias[name] = _new_gate(in_f, device)
        self.lora_scaling[name] = cfg.lora_alpha / cfg.r
        self.lora_dropout[name] = cfg.lora_dropout

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name], "lora_B.weight": self.lora_B[name],
                "lora_gate.weight": self.lora_gate[name], "lora_gate.bias": self.lora_gate_bias[name]}

    def shape_hint(self, name: str) -> str:
        return f"r={self.lora_A[name].shape[0]}"

    @property
    def adapters_disabled(self) -> bool:
        return self.unipelt_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.unipelt_disabled = flag

    def set_active(self, names) -> None:
        self.unipelt_active = tuple(n for n in names if n in self.lora_A)

    def delete_adapter(self, name: str) -> None:
        for d in self.param_dicts:
            if name in getattr(self, d):
                del getattr(self, d)[name]
        self.lora_scaling.pop(name, None)
        self.lora_dropout.pop(name, None)
        self.unipelt_active = tuple(n for n in self.unipelt_active if n != name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        if self.unipelt_disabled:
            return out
        if self._unipelt_route is not None:
            return self._unipelt_route.add_lora(self, x, out)
        return self.add_adapters(x, out, self.unipelt_active) if self.unipelt_active else out

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` + sum over `names` of g_L(x) * s * B A dropout(x) (per position)."""
        for n in names:
            A, B = self.lora_A[n], self.lora_B[n]
            h = x if torch.is_autocast_enabled(x.device.type) else x.to(A.dtype)
            g = _gate(x, self.lora_gate[n], self.lora_gate_bias[n])
            p = self.lora_dropout[n]
            if p > 0.0:
                h = F.dropout(h, p=p, training=self.training)
            delta = F.linear(F.linear(h, A), B) * self.lora_scaling[n]
            out = out + (g * delta).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        own = f"unipelt_lora=[{', '.join(f'{n}: r={a.shape[0]}' for n, a in self.lora_A.items())}]"
        return f"{super().extra_repr()}, {own}" if super().extra_repr() else own


class UniPeltLinear(GatedLora, nn.Linear):
    pass


class UniPeltQuantLinear(GatedLora, QuantLinear):
    """Over a frozen quantized base (QLoRA-style): the gated LoRA only reads the base output."""


if Conv1D is not None:

    class UniPeltConv1D(GatedLora, Conv1D):
        """transformers' Conv1D (GPT-2): weight (in, out); A and B keep LoRA's (r, in) / (out, r)."""

else:  # pragma: no cover - transformers is a hard dependency of tuneforge
    UniPeltConv1D = None  # type: ignore[assignment,misc]


# ---- a gated bottleneck adapter, or the prefix gate of an attention module ----------------------
class GatedBottleneck(BottleneckAdapter):
    """`g_A(h) * s * up(f(down(h)))` with `adapter_gate` Linear(in, 1): (..., in) -> (..., out)."""

    def __init__(self, in_features: int, size: int, act: str, scaling: float, zero_up: bool, device=None):
        super().__init__(in_features, in_features, size, act, scaling, parallel=False, zero_up=zero_up, device=device)
        self.adapter_gate = nn.Linear(in_features, 1, device=device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _gate(h, self.adapter_gate.weight, self.adapter_gate.bias) * super().forward(h)


class GatedBlock(UniPeltLayer, BottleneckLayer):
    """Mixin before any module type (`UniPeltLlamaMLP`, `UniPeltLlamaAttention`). On the blocks the
    plan names as adapter places it holds `bottleneck[n]` (a GatedBottleneck after the block); on an
    attention module it holds the prefix gate `prefix_gate[n]` (1, hidden) + `prefix_gate_bias[n]` (1,)."""

    param_dicts = ("bottleneck", "prefix_gate", "prefix_gate_bias")
    state_attrs = (*BottleneckLayer.state_attrs, "gate_active", "_unipelt_root")

    @classmethod
    def check_config(cls, module: nn.Module, path: str, cfg: Any) -> None:
        pass  # unipelt.py's target plan checked the places (an adapter needs a block with Linear layers)

    def setup(self, base_class: type) -> None:
        super().setup(base_class)
        self.prefix_gate = nn.ParameterDict()
        self.prefix_gate_bias = nn.ParameterDict()
        self.gate_active: tuple[str, ...] = ()

    def add_from_config(self, name: str, cfg: Any, path: str, shared: Any = None) -> None:
        device = next((t.device for t in self._base_tensors()), None)
        if device is not None and device.type == "meta":
            raise ConfigError(f"cannot add a UniPELT adapter to {path}: its weights are on the meta device")
        if path in shared.attention:
            self.prefix_gate[name], self.prefix_gate_bias[name] = _new_gate(shared.hidden_size, device)
            self.__dict__["_unipelt_root"] = shared.model  # not a child module: only read for the prefix
        else:
            _, out_f = module_features(self)
            self.bottleneck[name] = GatedBottleneck(out_f, cfg.adapter_size, cfg.adapter_act, cfg.adapter_scaling,
                                                    zero_up=cfg.init_bottleneck_weights, device=device)

    def adapter_names(self) -> list[str]:
        return list(dict.fromkeys([*self.bottleneck, *self.prefix_gate]))

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        out = super().adapter_parameters(name)
        if name in self.prefix_gate:
            out.update({"prefix_gate": self.prefix_gate[name], "prefix_gate_bias": self.prefix_gate_bias[name]})
        return out

    def fp32_parameters(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.prefix_gate.values(), *self.prefix_gate_bias.values()]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.prefix_gate:
            return {"prefix_gate.weight": self.prefix_gate[name], "prefix_gate.bias": self.prefix_gate_bias[name]}
        return super().peft_tensors(name)

    def shape_hint(self, name: str) -> str:
        if name in self.prefix_gate:
            return f"prefix gate over {self.prefix_gate[name].shape[1]} features"
        return super().shape_hint(name)

    def set_active(self, names) -> None:
        super().set_active(names)
        self.gate_active = tuple(n for n in names if n in self.prefix_gate)

    def delete_adapter(self, name: str) -> None:
        if name in self.bottleneck:
            super().delete_adapter(name)
        if name in self.prefix_gate:
            del self.prefix_gate[name], self.prefix_gate_bias[name]
        self.gate_active = tuple(n for n in self.gate_active if n != name)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        return super().add_adapters(x, out, tuple(n for n in names if n in self.bottleneck))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(self.prefix_gate) and not self.bottleneck_disabled:
            kwargs = self._gate_prefix(args, kwargs)
        if not len(self.bottleneck):  # an attention module: its own output, whatever its type
            return super(BottleneckLayer, self).forward(*args, **kwargs)
        return super().forward(*args, **kwargs)

    # ---- the prefix gate -------------------------------------------------------------------------
    def _gate_prefix(self, args: tuple, kwargs: dict) -> dict:
        """kwargs with `attention_mask` replaced by an additive float mask (B, 1 or H, Q, K) whose
        prefix columns in the rows of gated adapters carry log g_P; unchanged when no row has a prefix."""
        root = self.__dict__.get("_unipelt_root")
        vt = holder(root) if root is not None else None
        x = kwargs.get("hidden_states", args[0] if args else None)
        if vt is None or not torch.is_tensor(x):
            return kwargs
        rows = vt.row_adapters(x.shape[0])
        routed = vt._vt_route is not None
        gated = [r if r in self.prefix_gate and (routed or r in self.gate_active) else None for r in rows]
        if all(r is None for r in gated):
            return kwargs
        plan = layout(vt, rows, x.device)
        if plan.kv_width == 0:
            return kwargs
        log_g = x.new_zeros(x.shape[:2], dtype=torch.float32)  # (B, Q)
        for name in dict.fromkeys(r for r in gated if r is not None):
            ix = torch.tensor([i for i, r in enumerate(gated) if r == name], device=x.device)
            w, b = self.prefix_gate[name], self.prefix_gate_bias[name]
            h = x[ix] if torch.is_autocast_enabled(x.device.type) else x[ix].to(w.dtype)
            log_g[ix] = F.logsigmoid(F.linear(h, w, b)).squeeze(-1).float()
        mask = _additive_mask(kwargs.get("attention_mask"), x, kwargs, getattr(self, "layer_idx", None))
        # a row's prefix is its first n_kv attended key columns: the block's unused columns are
        # masked, and a cache the continuous batcher left-padded has padding columns before it
        attended = mask > torch.finfo(mask.dtype).min / 2
        prefix = attended & (attended.cumsum(-1) <= plan.n_kv[:, None, None, None])
        gate = torch.where(prefix, log_g[:, None, :, None].to(mask.dtype), mask.new_zeros(()))
        return {**kwargs, "attention_mask": mask + gate}


class UniPeltModule(GatedBlock, nn.Module):
    """Registered for nn.Module: every module type gets a derived class `UniPelt<Type>`."""


def _additive_mask(mask: Any, x: torch.Tensor, kwargs: dict, layer_idx: int | None) -> torch.Tensor:
    """The attention mask as an additive float tensor (B, 1 or H, Q, K): transformers passes a float
    mask (eager), a boolean one (sdpa: True = attend) or None (sdpa when causal order is enough)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if torch.is_tensor(mask) and mask.is_floating_point():
        return mask if mask.shape[0] == x.shape[0] else mask.expand(x.shape[0], *mask.shape[1:])
    if torch.is_tensor(mask) and mask.dtype == torch.bool:
        allowed = mask.expand(x.shape[0], *mask.shape[1:])
    elif mask is None:
        cache = next((kwargs[k] for k in ("past_key_values", "past_key_value", "cache") if kwargs.get(k) is not None),
                     None)
        past = int(cache.get_seq_length(layer_idx or 0)) if cache is not None else 0
        q = x.shape[1]
        cols = torch.arange(past + q, device=x.device)
        allowed = (cols[None, :] <= past + torch.arange(q, device=x.device)[:, None])[None, None]
        allowed = allowed.expand(x.shape[0], 1, q, past + q)
    else:
        raise ConfigError(f"UniPELT's prefix gate needs an eager or sdpa attention mask, got {type(mask).__name__}; "
                          "set attn_implementation to 'sdpa' or 'eager'")
    # masked: the dtype's lowest value (as eager masks): a fully masked (padding) row stays finite
    return torch.zeros(allowed.shape, dtype=dtype, device=x.device).masked_fill(~allowed, torch.finfo(dtype).min)
