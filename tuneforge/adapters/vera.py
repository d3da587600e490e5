"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation"): one pair of frozen
random matrices A (r, in) and B (out, r) shared by every adapted layer, and per layer two trained
scaling vectors, lambda_d (r,) and lambda_b (out,). peft's `VeraConfig` ("VERA") fields and maths:

    h = W x + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))

    from tuneforge import VeraConfig, add_adapter
    add_adapter(model, VeraConfig(r=256, target_modules=["q_proj", "v_proj"]))

A and B are drawn once per adapter from `projection_prng_key` (a CPU torch.Generator; Kaiming
uniform, A first, as peft draws them) with the largest in / out features over the adapted layers,
and each layer uses its leading slice. They are shared state of the adapter (AdapterMethod.shared):
one `VeraProjections` module (non-persistent buffers `vera_A`, `vera_B`) that every layer holds
as `<module>.vera_projections.<adapter>`. lambda_b starts at zeros and lambda_d at `d_initial`
(the model starts unchanged); `init_weights=False` draws lambda_d ~ N(0, 1) and sets lambda_b to
ones (tests). Merging adds `(lambda_b B)(lambda_d A)` (transposed for Conv1D) to the weight;
unmerging subtracts it. On a quantized base (QuantLinear) VeRA trains as on a Linear and merging
is refused (dequantize first).

Files (peft's layout): `base_model.model.<module>.vera_lambda_b` / `.vera_lambda_d` per layer, and
with `save_projection` (the default) the projections once, `base_model.vera_A` / `base_model.vera_B`;
without them, loading redraws them from `projection_prng_key`. A file whose projections do not fit
the adapted layers (shape) is refused with one line.

YAML: `finetuning_type: vera`, `vera_rank` (r, default 256 as in peft), `vera_d_initial`,
`vera_dropout`, `vera_projection_prng_key`; `lora_target` gives target_modules ('all': every linear
layer but the output head) and `additional_target` modules_to_save.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError, ModelError
from tuneforge.quant.linear import QuantLinear

from .config import ALL_LINEAR, _is_number, _layer_indices, _names_or_regex
from .layer import AdapterLayer, Conv1D
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, warn_unknown_fields, yaml_targets
from .targets import candidate_modules, minimal_suffixes, resolve_targets

# peft's defaults (its LoRA table, which VeRA shares) for the model types tuneforge is used with
DEFAULTS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
    "roberta": ["query", "value"],
}  # fmt: skip
BIAS_MODES = ("none", "all", "vera_only")
FIELDS = ("r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
          "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern")  # fmt: skip


@dataclass
class VeraConfig:
    """Settings of one VeRA adapter; names, meanings and defaults follow peft's `VeraConfig`."""

    r: int = 256
    """Rank of the shared random projections (VeRA uses far higher ranks than LoRA: few parameters train)."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex (full match), or 'all-linear'; empty: peft's default for the model type."""
    projection_prng_key: int = 0
    """Seed of the CPU generator that draws the shared projections A and B."""
    save_projection: bool = True
    """Write A and B into the adapter file (else they are redrawn from projection_prng_key on load)."""
    vera_dropout: float = 0.0
    """Dropout probability on the adapter's input while training."""
    d_initial: float = 0.1
    """Start value of every entry of lambda_d (lambda_b starts at zeros)."""
    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out) (Conv1D); decided per layer from its type."""
    bias: str = "none"
    """Which biases train with the adapter: 'none', 'all', or 'vera_only' (biases of adapted layers)."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter."""
    init_weights: bool = True
    """True: lambda_b zeros, lambda_d = d_initial (a no-op start); False: random lambda_d, lambda_b ones."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules inside these layer indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (e.g. 'layers', 'h'); needs `layers_to_transform`."""
    exclude_modules = None  # peft's VeraConfig has no exclude_modules; target matching reads it

    def __post_init__(self) -> None:
        if isinstance(self.r, float) and self.r.is_integer():
            self.r = int(self.r)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer (the VeRA rank), got {self.r!r}")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if not _is_number(self.vera_dropout) or not 0.0 <= self.vera_dropout < 1.0:
            raise ConfigError(f"vera_dropout must be a number in [0, 1), got {self.vera_dropout!r}")
        if not _is_number(self.d_initial):
            raise ConfigError(f"d_initial must be a number, got {self.d_initial!r}")
        for key in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {list(BIAS_MODES)}, got {self.bias!r}")
        if isinstance(self.target_modules, (set, frozenset)):
            self.target_modules = sorted(self.target_modules)
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = _names_or_regex("modules_to_save", self.modules_to_save) or None
        self.layers_to_transform = _layer_indices(self.layers_to_transform)
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = self.layers_pattern or None
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both or neither")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class VeraProjections(nn.Module):
    """The frozen random matrices of one VeRA adapter, shared by all its layers: `vera_A` (r, in_max)
    and `vera_B` (out_max, r), non-persistent buffers (saved once by save_adapter, not per layer)."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, device: torch.device | None = None):
        super().__init__()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", _kaiming_uniform((r, in_max), gen).to(device), persistent=False)
        self.register_buffer("vera_B", _kaiming_uniform((out_max, r), gen).to(device), persistent=False)

    def extra_repr(self) -> str:
        return f"vera_A={tuple(self.vera_A.shape)}, vera_B={tuple(self.vera_B.shape)}"


def _kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1] (torch's kaiming_uniform_
    with a=0, drawn from `gen`)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


class VeraLayer(AdapterLayer):
    """Mixin placed before the base class (`class VeraLinear(VeraLayer, nn.Linear)`)."""

    method_name = "vera"
    param_dicts = ("vera_lambda_b", "vera_lambda_d")
    extra_children = ("vera_projections", "vera_dropout")
    state_attrs = ("vera_r", "vera_active", "vera_merged", "vera_disabled", "_vera_run", "_vera_route")
    base_class_attr = "_vera_base_class"
    route_attr = "_vera_route"
    fan_in_fan_out = False
    _vera_route = None

    vera_lambda_b: nn.ParameterDict
    vera_lambda_d: nn.ParameterDict

    def setup(self, base_class: type) -> None:
        self._vera_base_class = base_class
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_projections = nn.ModuleDict()
        self.vera_dropout = nn.ModuleDict()
        self.vera_r: dict[str, int] = {}
        self.vera_active: tuple[str, ...] = ()
        self.vera_merged: list[str] = []
        self.vera_disabled = False
        self._vera_run: tuple[str, ...] = ()

    def in_out_features(self) -> tuple[int, int]:
        w = self.weight
        return (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])

    def add_from_config(self, name: str, cfg: VeraConfig, path: str, shared: VeraProjections | None = None) -> None:
        if shared is None:
            raise ConfigError("VeRA layers are added by add_adapter (they need the adapter's shared projections)")
        in_f, out_f = self.in_out_features()
        if shared.vera_A.shape[1] < in_f or shared.vera_B.shape[0] < out_f:
            raise ConfigError(
                f"{path} ({in_f} -> {out_f}) does not fit the shared VeRA projections (A {tuple(shared.vera_A.shape)}, "
                f"B {tuple(shared.vera_B.shape)})"
            )
        device = shared.vera_A.device
        lambda_d = torch.randn(cfg.r)
        lambda_b = torch.ones(out_f)
        if cfg.init_weights:
            lambda_d.fill_(cfg.d_initial)
            lambda_b.zero_()
        self.vera_lambda_b[name] = nn.Parameter(lambda_b.to(device))
        self.vera_lambda_d[name] = nn.Parameter(lambda_d.to(device))
        self.vera_projections[name] = shared
        self.vera_dropout[name] = nn.Dropout(cfg.vera_dropout) if cfg.vera_dropout > 0 else nn.Identity()
        self.vera_r[name] = cfg.r
        self._refresh()

    def shape_hint(self, name: str) -> str:
        return f"r={self.vera_r[name]}"

    def fp32_parameters(self) -> list[nn.Parameter]:
        return [*self.vera_lambda_b.values(), *self.vera_lambda_d.values()]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b[name], "vera_lambda_d": self.vera_lambda_d[name]}

    @property
    def adapters_disabled(self) -> bool:
        return self.vera_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.vera_disabled = flag

    def set_active(self, names) -> None:
        self.vera_active = tuple(n for n in names if n in self.vera_lambda_b)
        self._refresh()

    def _refresh(self) -> None:
        self._vera_run = tuple(n for n in self.vera_active if n not in self.vera_merged)

    def delete_adapter(self, name: str) -> None:
        if name in self.vera_merged:
            self.unmerge([name])
        for attr in (*self.param_dicts, *self.extra_children):
            if name in getattr(self, attr):
                del getattr(self, attr)[name]
        self.vera_r.pop(name, None)
        self.vera_active = tuple(n for n in self.vera_active if n != name)
        self._refresh()

    # ---- maths -----------------------------------------------------------------------------------
    def _factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The leading slices of the shared projections: A (r, in), B (out, r), in `dtype`."""
        in_f, out_f = self.in_out_features()
        proj = self.vera_projections[name]
        return proj.vera_A[:, :in_f].to(dtype), proj.vera_B[:out_f, :].to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """(lambda_b B)(lambda_d A), shape (out, in); transposed to (in, out) for Conv1D."""
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        a, b = self._factors(name, lambda_d.dtype)
        delta = (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
        return delta.T if self.fan_in_fan_out else delta

    # ---- merge -----------------------------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        return list(self.vera_merged)

    @torch.no_grad()
    def merge_is_finite(self, names: list[str]) -> bool:
        todo = [n for n in names if n in self.vera_lambda_b and n not in self.vera_merged]
        w = self.weight.detach().float()
        for n in todo:
            w = w + self.delta_weight(n).float().to(w.device)
        return bool(torch.isfinite(w).all())

    @torch.no_grad()
    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        todo = [n for n in names if n in self.vera_lambda_b and n not in self.vera_merged]
        if not todo:
            return []
        if safe_merge and not self.merge_is_finite(todo):
            raise ModelError(f"merging adapters {todo} would put NaN/inf into {self._get_name()}.weight")
        for n in todo:
            self.weight.add_(self.delta_weight(n).to(self.weight.dtype))
        self.vera_merged.extend(todo)
        self._refresh()
        return todo

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> list[str]:
        todo = [n for n in reversed(self.vera_merged) if names is None or n in names]
        for n in todo:
            self.weight.sub_(self.delta_weight(n).to(self.weight.dtype))
        self.vera_merged = [n for n in self.vera_merged if n not in todo]
        self._refresh()
        return todo

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        if self._vera_route is not None and not self.vera_disabled:
            return self._vera_route.add_lora(self, x, out)
        if self.vera_disabled or not self._vera_run:
            return out
        return self.add_adapters(x, out, self._vera_run)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` + lambda_b * (B (lambda_d * (A dropout(x)))) for each adapter in `names`, computed in
        the vectors' dtype (fp32) and cast back to `out`'s dtype."""
        result = out
        for n in names:
            lambda_b, lambda_d = self.vera_lambda_b[n], self.vera_lambda_d[n]
            a, b = self._factors(n, lambda_d.dtype)
            h = F.linear(self.vera_dropout[n](x.to(lambda_d.dtype)), a)
            result = result + lambda_b * F.linear(lambda_d * h, b)
        return result.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vera=[{', '.join(f'{n}: r={r}' for n, r in self.vera_r.items())}]"


class VeraLinear(VeraLayer, nn.Linear):
    """`nn.Linear` with VeRA adapters."""


if Conv1D is not None:

    class VeraConv1D(VeraLayer, Conv1D):
        """transformers' `Conv1D` (GPT-2): weight stored as (in, out), hence fan_in_fan_out."""

        fan_in_fan_out = True

else:  # pragma: no cover - transformers is a hard dependency of tuneforge
    VeraConv1D = None  # type: ignore[assignment,misc]


class VeraQuantLinear(VeraLayer, QuantLinear):
    """A quantized base (QuantLinear): VeRA trains as on a Linear; merging is refused."""

    def in_out_features(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def cannot_merge(self) -> str | None:
        return self.merge_refusal()


# ---- the method record's hooks ---------------------------------------------------------------------
def _resolve_targets(model: nn.Module, cfg: VeraConfig) -> list[tuple[str, nn.Module]]:
    if cfg.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULTS:
            raise ConfigError(
                f"VeRA has no default target_modules for model type {model_type!r}; set target_modules "
                "(e.g. ['q_proj', 'v_proj'])"
            )
        cfg.target_modules = list(DEFAULTS[model_type])
    return resolve_targets(model, cfg)


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, VeraLayer):
        return module.in_out_features()
    if isinstance(module, QuantLinear):
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[0], w.shape[1]) if Conv1D is not None and isinstance(module, Conv1D) else (w.shape[1], w.shape[0])


def _shared(model: nn.Module, cfg: VeraConfig, name: str, targets: list) -> VeraProjections:
    """The adapter's projections, sized by the largest in / out features among its targets (as peft)."""
    dims = [_in_out(m) for _, m in targets]
    first = targets[0][1]
    device = first.weight.device if not isinstance(first, QuantLinear) else next(first.buffers()).device
    return VeraProjections(cfg.r, max(i for i, _ in dims), max(o for _, o in dims), cfg.projection_prng_key, device)


def _extra_tensors(model: nn.Module, name: str, cfg: VeraConfig, layers: list) -> dict[str, torch.Tensor]:
    if not cfg.save_projection or not layers:
        return {}
    proj = layers[0][1].vera_projections[name]
    return {"base_model.vera_A": proj.vera_A, "base_model.vera_B": proj.vera_B}


def _to_peft(model: nn.Module, name: str, cfg: VeraConfig, layers: list) -> dict[str, Any]:
    targets = cfg.target_modules
    if targets == ALL_LINEAR:  # write the resolved names, as peft does
        targets = minimal_suffixes([p for p, _ in layers], [n for n, _ in candidate_modules(model)])
    out = {k: getattr(cfg, k) for k in FIELDS}
    out.update(target_modules=targets, fan_in_fan_out=any(m.fan_in_fan_out for _, m in layers))
    return out


def _from_peft(raw: dict[str, Any], source: str) -> VeraConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(VeraConfig, raw, FIELDS, source)


def _from_finetune_args(finetune) -> VeraConfig:
    targets, extra = yaml_targets(finetune)
    return VeraConfig(
        r=finetune.vera_rank, target_modules=targets, modules_to_save=extra, vera_dropout=finetune.vera_dropout,
        d_initial=finetune.vera_d_initial, projection_prng_key=finetune.vera_projection_prng_key,
    )


register_method(AdapterMethod(
    name="vera", peft_type="VERA", label="VeRA", prefix="Vera", config_class=VeraConfig, layer_class=VeraLayer,
    layers={nn.Linear: VeraLinear, Conv1D: VeraConv1D, QuantLinear: VeraQuantLinear},
    resolve_targets=_resolve_targets, shared=_shared, extra_tensors=_extra_tensors,
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    keys=("lora_target", "additional_target", "vera_rank", "vera_dropout", "vera_d_initial",
          "vera_projection_prng_key"),
))  # fmt: skip
