"""Bottleneck adapters: down-project, nonlinearity, up-project, added back to the hidden state.

    h <- h + s * W_up f(W_down h + b_down) + s * b_up

after a module (sequential: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for
NLP"; Pfeiffer et al. 2020, "AdapterFusion") or beside it, reading the module's input x
(parallel: He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"):

    sequential   y = m(x);  y + s * A(y)
    parallel     y = m(x);  y + s * A(x)

`adapter_type` places them (per model type, DEFAULT_TARGETS): `houlsby` after the attention
output projection and after the feed-forward output projection (o_proj and down_proj in Llama),
`pfeiffer` after the feed-forward output projection only, `parallel` beside the feed-forward
block (Llama's `mlp`), scaled by `adapter_scaling` (s; He et al. use 4; Houlsby and Pfeiffer use
1). `target_modules` overrides the placement: any module whose first argument and output are
hidden-state tensors can carry an adapter, including a whole block (a module that holds Linear
layers: the adapter's input width is that of its first Linear, its output width that of its last).

`W_up` and `b_up` start at zero, so an adapter starts as the base model; `W_down` takes
nn.Linear's default init. The adapter's tensors are fp32 `<module>.bottleneck.<adapter>`
(`BottleneckAdapter`: `adapter_down` (r, in) + bias (r,), `adapter_up` (out, r) + bias (out,)).
Several active adapters on one module: the parallel ones add up on the input, then the sequential
ones run in order. Merging is refused: the nonlinearity between the projections cannot live in a
weight. peft has no bottleneck method: files use peft's layout with peft_type "BOTTLENECK"
(`base_model.model.<module>.adapter_down.weight`, `.adapter_down.bias`, `.adapter_up.weight`,
`.adapter_up.bias`) and load back in tuneforge.

A method that reuses the adapter (MAM: a parallel adapter beside prefix tuning; UniPELT: a gated
one) subclasses `BottleneckLayer` (its own `method_name`) or uses `BottleneckAdapter` directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError

from .config import ALL_LINEAR, _names_or_regex
from .layer import AdapterLayer, Conv1D
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, split_names, warn_unknown_fields
from .targets import candidate_modules, minimal_suffixes, resolve_targets

ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _decoder(attn_out: str, ffn_out: str, ffn: str) -> dict[str, list[str]]:
    """adapter_type -> target_modules from a model's attention output projection, feed-forward
    output projection and feed-forward block."""
    return {"houlsby": [attn_out, ffn_out], "pfeiffer": [ffn_out], "parallel": [ffn]}


# BERT's feed-forward block is split over two modules (intermediate, output): no parallel default;
# "output.dense" ends both attention.output.dense and layer.N.output.dense
_BERT = {"houlsby": ["output.dense"], "pfeiffer": r".*\.layer\.\d+\.output\.dense", "parallel": None}
DEFAULT_TARGETS: dict[str, dict[str, Any]] = {
    **{t: _decoder("o_proj", "down_proj", "mlp")
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")},
    "gpt2": _decoder("attn.c_proj", "mlp.c_proj", "mlp"),
    "phi": _decoder("dense", "fc2", "mlp"),
    "bert": _BERT,
    "roberta": _BERT,
}
FIELDS = ("adapter_type", "adapter_size", "adapter_act", "adapter_scaling", "target_modules", "exclude_modules",
          "modules_to_save", "init_bottleneck_weights")  # fmt: skip


@dataclass
class BottleneckConfig:
    """Settings of one bottleneck adapter (the field names are the YAML keys)."""

    adapter_type: str = "houlsby"
    """houlsby (after attention and after the FFN), pfeiffer (after the FFN) or parallel (beside the FFN)."""
    adapter_size: int = 64
    """Bottleneck width r."""
    adapter_act: str = "relu"
    """Nonlinearity between the projections: relu, gelu, silu or tanh."""
    adapter_scaling: float = 1.0
    """s, the factor on the adapter's output (He et al.'s parallel adapter: 4)."""
    target_modules: list[str] | str | None = None
    """Modules that carry an adapter (names/suffixes, a regex, or 'all-linear'); empty: adapter_type's
    places for the model type."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter."""
    init_bottleneck_weights: bool = True
    """True: the up-projection starts at zero (the adapter starts as a no-op); False: random (for tests)."""
    layers_to_transform = None  # no layer selection; target matching reads these
    layers_pattern = None

    def __post_init__(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(f"adapter_type must be one of {', '.join(ADAPTER_TYPES)}, got {self.adapter_type!r}")
        if self.adapter_act not in ACTIVATIONS:
            raise ConfigError(f"adapter_act must be one of {', '.join(ACTIVATIONS)}, got {self.adapter_act!r}")
        if isinstance(self.adapter_size, bool) or not isinstance(self.adapter_size, int) or self.adapter_size < 1:
            raise ConfigError(f"adapter_size must be a positive whole number, got {self.adapter_size!r}")
        scaling = self.adapter_scaling
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 0 < scaling < float("inf"):
            raise ConfigError(f"adapter_scaling must be a positive number (e.g. 1, or 4 for parallel), got {scaling!r}")
        self.adapter_scaling = float(scaling)
        for key in ("target_modules", "exclude_modules"):
            setattr(self, key, _names_or_regex(key, getattr(self, key)))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = _names_or_regex("modules_to_save", self.modules_to_save) or None
        if not isinstance(self.init_bottleneck_weights, bool):
            raise ConfigError(f"init_bottleneck_weights must be true or false, got {self.init_bottleneck_weights!r}")

    @property
    def parallel(self) -> bool:
        return self.adapter_type == "parallel"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class BottleneckAdapter(nn.Module):
    """`s * up(f(down(h)))`: (..., in_features) -> (..., out_features), computed in fp32.

    `parallel` says where its input comes from (the module's input, or its output); the
    caller adds the result to the module's output. up starts at zero unless `zero_up` is False.
    """

    def __init__(self, in_features: int, out_features: int, size: int, act: str, scaling: float,
                 parallel: bool, zero_up: bool = True, device: torch.device | None = None):
        super().__init__()
        self.adapter_down = nn.Linear(in_features, size, device=device)
        self.adapter_up = nn.Linear(size, out_features, device=device)
        if zero_up:
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
        self.act, self.scaling, self.parallel = act, scaling, parallel

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.adapter_down.weight
        z = ACTIVATIONS[self.act](self.adapter_down(h.to(w.dtype)))
        return self.adapter_up(z) * self.scaling

    def extra_repr(self) -> str:
        return f"act={self.act}, scaling={self.scaling}, {'parallel' if self.parallel else 'sequential'}"


def layer_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear-like layer (nn.Linear, QuantLinear, Conv1D), else None."""
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(i, int) and isinstance(o, int):
        return i, o
    return None


def module_features(module: nn.Module) -> tuple[int, int] | None:
    """(input width, output width) of `module`: its own for a Linear-like layer; for a block, the
    input width of its first Linear-like layer and the output width of its last (registration order)."""
    own = layer_features(module)
    if own is not None:
        return own
    inner = [f for _, m in candidate_modules(module) if (f := layer_features(m)) is not None]
    return (inner[0][0], inner[-1][1]) if inner else None


class BottleneckLayer(AdapterLayer):
    """Mixin placed before the base class (`BottleneckLinear(BottleneckLayer, nn.Linear)`, or any
    module type: `BottleneckLlamaMLP`). Adapters live in `self.bottleneck[name]`."""

    method_name = "bottleneck"
    param_dicts = ("bottleneck",)
    state_attrs = ("bottleneck_active", "bottleneck_disabled", "_bottleneck_route")
    base_class_attr = "_bottleneck_base_class"
    route_attr = "_bottleneck_route"
    _bottleneck_route = None

    bottleneck: nn.ModuleDict

    @classmethod
    def check_config(cls, module: nn.Module, path: str, cfg: BottleneckConfig) -> None:
        if module_features(module) is None:
            raise ConfigError(
                f"cannot tell the hidden size at {path} ({type(module).__name__}, no Linear layer in it); "
                "a bottleneck adapter goes after or beside a Linear layer or a block holding them: "
                "narrow target_modules"
            )

    def setup(self, base_class: type) -> None:
        self._bottleneck_base_class = base_class
        self.bottleneck = nn.ModuleDict()
        self.bottleneck_active: tuple[str, ...] = ()
        self.bottleneck_disabled = False

    def add_from_config(self, name: str, cfg: BottleneckConfig, path: str) -> None:
        in_f, out_f = module_features(self)
        device = next((t.device for t in self._base_tensors()), None)
        if device is not None and device.type == "meta":
            raise ConfigError(f"cannot add a bottleneck adapter to {path}: its weights are on the meta device")
        self.bottleneck[name] = BottleneckAdapter(
            in_f if cfg.parallel else out_f, out_f, cfg.adapter_size, cfg.adapter_act, cfg.adapter_scaling,
            cfg.parallel, zero_up=cfg.init_bottleneck_weights, device=device)

    def _base_tensors(self):
        skip = {id(p) for p in self.bottleneck.parameters()}
        return (t for t in (*self.parameters(), *self.buffers()) if id(t) not in skip)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name not in self.bottleneck:
            return {}
        return dict(self.bottleneck[name].named_parameters())

    def fp32_parameters(self) -> list[nn.Parameter]:
        return list(self.bottleneck.parameters())

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.bottleneck[name].named_parameters())

    def shape_hint(self, name: str) -> str:
        a = self.bottleneck[name]
        return f"adapter_size={a.adapter_down.out_features}, {'parallel' if a.parallel else 'sequential'}"

    @property
    def adapters_disabled(self) -> bool:
        return self.bottleneck_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.bottleneck_disabled = flag

    def set_active(self, names) -> None:
        self.bottleneck_active = tuple(n for n in names if n in self.bottleneck)

    def delete_adapter(self, name: str) -> None:
        del self.bottleneck[name]
        self.bottleneck_active = tuple(n for n in self.bottleneck_active if n != name)

    # ---- merge: refused --------------------------------------------------------------------------
    def cannot_merge(self) -> str | None:
        acts = sorted({a.act for a in self.bottleneck.values()})
        return (f"a bottleneck adapter puts a nonlinearity ({', '.join(acts)}) between its two projections, "
                "which no weight matrix can hold")

    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        mine = [n for n in names if n in self.bottleneck]
        if mine:
            raise ConfigError(f"cannot merge bottleneck adapters {mine}: {self.cannot_merge()}")
        return []

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        if self.bottleneck_disabled or (not self.bottleneck_active and self._bottleneck_route is None):
            return out
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not torch.is_tensor(out) or not torch.is_tensor(x):
            raise ConfigError(
                f"a bottleneck adapter needs a module that takes and returns one tensor; "
                f"{type(self).__name__} returns {type(out).__name__}: target its output projection instead"
            )
        if self._bottleneck_route is not None:
            return self._bottleneck_route.add_lora(self, x, out)
        return self.add_adapters(x, out, self.bottleneck_active)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` (the module's output for input `x`) with adapters `names` added: the parallel ones
        read `x` and add up, then the sequential ones run in order, each on the running output."""
        adapters = [self.bottleneck[n] for n in names]
        y = out
        for a in adapters:
            if a.parallel:
                y = y + self.delta(a, x).to(out.dtype)
        for a in adapters:
            if not a.parallel:
                y = y + self.delta(a, y).to(out.dtype)
        return y

    def delta(self, adapter: BottleneckAdapter, h: torch.Tensor) -> torch.Tensor:
        """What `adapter` adds for input `h` (a subclass may gate it)."""
        return adapter(h)

    def extra_repr(self) -> str:
        own = f"bottleneck=[{', '.join(self.bottleneck)}]"
        return f"{super().extra_repr()}, {own}" if super().extra_repr() else own


class BottleneckModule(BottleneckLayer, nn.Module):
    """Registered for nn.Module: every module type gets a derived class `Bottleneck<Type>`."""


def _resolve_targets(model: nn.Module, cfg: BottleneckConfig) -> list[tuple[str, nn.Module]]:
    """adapter_type's places for the model type when target_modules is empty (written into `cfg`)."""
    if cfg.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        default = DEFAULT_TARGETS.get(model_type, {}).get(cfg.adapter_type)
        if default is None:
            what = (f"no single feed-forward module for a parallel adapter in model type {model_type!r}"
                    if model_type in DEFAULT_TARGETS else f"no default places for model type {model_type!r}")
            raise ConfigError(f"bottleneck adapters have {what}; set target_modules (lora_target in YAML) "
                              "to the modules that carry one")
        cfg.target_modules = default if isinstance(default, str) else list(default)
    return resolve_targets(model, cfg)


def _to_peft(model: nn.Module, name: str, cfg: BottleneckConfig, layers: list) -> dict[str, Any]:
    targets = cfg.target_modules
    if targets == ALL_LINEAR:
        targets = minimal_suffixes([p for p, _ in layers], [n for n, _ in candidate_modules(model)])
    return {**{k: getattr(cfg, k) for k in FIELDS}, "target_modules": targets}


def _from_peft(raw: dict[str, Any], source: str) -> BottleneckConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(BottleneckConfig, raw, FIELDS, source)


def _from_finetune_args(finetune) -> BottleneckConfig:
    """YAML: lora_target 'all' (the default) takes adapter_type's places; a comma list names them."""
    target = finetune.lora_target.strip()
    targets = None if target in ("all", "all-linear", "") else split_names(target)
    return BottleneckConfig(
        adapter_type=finetune.adapter_type, adapter_size=finetune.adapter_size, adapter_act=finetune.adapter_act,
        target_modules=targets, **scaling_kwarg(finetune),
        modules_to_save=split_names(finetune.additional_target) or None)


def scaling_kwarg(finetune) -> dict[str, float]:
    """{'adapter_scaling': the YAML value}, or {} when it is empty (the method's config default applies)."""
    value = getattr(finetune, "adapter_scaling", None)
    return {} if value is None else {"adapter_scaling": value}


def _cannot_merge(cfg: BottleneckConfig) -> str:
    return f"a bottleneck adapter puts a nonlinearity ({cfg.adapter_act}) between its projections, which no weight can hold"


register_method(AdapterMethod(
    name="bottleneck", peft_type="BOTTLENECK", label="bottleneck", prefix="Bottleneck",
    config_class=BottleneckConfig, layer_class=BottleneckLayer, layers={nn.Module: BottleneckModule},
    resolve_targets=_resolve_targets, config_to_peft=_to_peft, config_from_peft=_from_peft,
    from_finetune_args=_from_finetune_args, cannot_merge=_cannot_merge,
    keys=("lora_target", "additional_target", "adapter_type", "adapter_size", "adapter_act", "adapter_scaling"),
))  # fmt: skip
