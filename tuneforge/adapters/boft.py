"""BOFT, butterfly orthogonal finetuning (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning
via Butterfly Factorization"): peft's `BOFTConfig` field names and maths.

    from tuneforge import BOFTConfig, add_adapter
    add_adapter(model, BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj"]))

Each adapted Linear keeps its weight W (out, in) and computes y = s * (W (x M)^T) + b, with the
orthogonal M = M_{m-1} ... M_1 M_0 (m = boft_n_butterfly_factor) and s a trained scale per output.
Factor i is M_i = P_i B_i P_i^T: B_i = block_diag of boft_block_num Cayley blocks
(I - S)(I + S)^-1 with S = (R - R^T) / 2 (exact, via a solve), P_i peft's block butterfly
permutation (the identity for i = 0). Tensors (fp32): `<module>.boft_R.<adapter>` of shape
(m, boft_block_num, boft_block_size, boft_block_size) and `<module>.boft_s.<adapter>` (out, 1);
they start at R = 0 (M = I) and s = 1 (the model is unchanged), or normal(0, 0.1) / normal(1, 0.1)
with init_weights=False. in_features = boft_block_num * boft_block_size (exactly one of the two is
set; the other follows per layer); with m > 1 in_features must be a multiple of
boft_block_size * 2^(m-1) and both numbers even (peft's rules; refused in one line otherwise).

tuneforge runs the permutations as index gathers and the blocks as one batched product (no dense
in x in matrix), for every m. peft computes the same maths; where its CUDA block-diagonal extension
cannot be built (on CPU) it silently trains boft_n_butterfly_factor=1 instead of what the config
says, so a peft file with m > 1 comes from a CUDA run, and peft on CPU cannot load tuneforge's.
Several active adapters: x (M_b M_a), scales multiplied (peft's order). Merging writes
s * (W M^T) into the weight; unmerging divides s out and multiplies by M (orthogonal).
boft_dropout: while training, int(p * boft_block_num) random blocks of one random factor act as
identity (peft's multiplicative dropout).

Layers: nn.Linear and a quantized base (QuantLinear; merge refused). transformers' Conv1D (GPT-2)
has no BOFT layer in peft and is refused here too. Files hold `base_model.model.<module>.boft_R`
and `.boft_s`, peft_type "BOFT". YAML: `finetuning_type: boft` with `boft_block_size`,
`boft_block_num`, `boft_n_butterfly_factor`; lora_target picks the layers, additional_target
the modules_to_save.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError
from tuneforge.quant.linear import QuantLinear

from .config import ALL_LINEAR
from .layer import AdapterLayer
from .methods import AdapterMethod, register_method
from .orthogonal import base_device, cayley, check_selection, drop_blocks, int_field, probability, rotate_blocks
from .peft_config import config_from_raw, warn_unknown_fields, yaml_targets
from .targets import candidate_modules, minimal_suffixes

FIELDS = (
    "boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "target_modules", "exclude_modules",
    "boft_dropout", "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform",
    "layers_pattern",
)  # fmt: skip
BIAS_MODES = ("none", "all", "boft_only")


@dataclass
class BOFTConfig:
    """Settings of one BOFT adapter; names, meanings and defaults follow peft's `BOFTConfig`."""

    boft_block_size: int = 4
    """Size of each orthogonal block; 0: set by boft_block_num. Exactly one of the two is non-zero."""
    boft_block_num: int = 0
    """Blocks per butterfly factor (in_features = boft_block_num * boft_block_size); 0: set by boft_block_size."""
    boft_n_butterfly_factor: int = 1
    """Butterfly factors m (1: one block-diagonal rotation, i.e. OFT with the exact Cayley transform)."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex (full match), or 'all-linear' (every Linear but the output head)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    boft_dropout: float = 0.0
    """While training, this fraction of the blocks of one random factor acts as identity."""
    fan_in_fan_out: bool = False
    """peft's field; BOFT adapts nn.Linear only, whose weight is (out, in), so it is always False."""
    bias: str = "none"
    """'none', 'all' (every bias trains) or 'boft_only' (the biases of the adapted layers train)."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter."""
    init_weights: bool = True
    """True: R = 0 and s = 1 (no change at the start); False: random (for tests)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt these layer indices (with layers_pattern naming the layer list, e.g. 'layers')."""
    layers_pattern: list[str] | str | None = None
    """Name of the model's layer list that layers_to_transform indexes."""

    def __post_init__(self) -> None:
        self.boft_block_size = int_field("boft_block_size", self.boft_block_size)
        self.boft_block_num = int_field("boft_block_num", self.boft_block_num)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                "set exactly one of boft_block_size and boft_block_num (the other 0; their product is "
                f"in_features), got boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num}"
            )
        self.boft_n_butterfly_factor = int_field("boft_n_butterfly_factor", self.boft_n_butterfly_factor, 1)
        self.boft_dropout = probability("boft_dropout", self.boft_dropout)
        check_selection(self, BIAS_MODES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fit_blocks(in_features: int, cfg: BOFTConfig) -> tuple[int, int]:
    """(boft_block_num, boft_block_size) for a layer of width in_features; ConfigError (peft's
    rules, without the layer's name) when the config cannot fit it."""
    m = cfg.boft_n_butterfly_factor - 1  # the paper's count, as peft uses it
    if cfg.boft_block_num:
        num = cfg.boft_block_num
        if in_features % num:
            raise ConfigError(f"in_features {in_features} is not divisible by boft_block_num {num}")
        if m and (m > int(math.log2(num)) or num % 2**m):
            raise ConfigError(
                f"boft_block_num {num} must be a multiple of 2^(boft_n_butterfly_factor - 1) = {2**m}"
            )
        size = in_features // num
    else:
        size = cfg.boft_block_size
        if in_features % size:
            raise ConfigError(f"in_features {in_features} is not divisible by boft_block_size {size}")
        if m and in_features % (size * 2**m):
            raise ConfigError(
                f"in_features {in_features} is not a multiple of boft_block_size x 2^(boft_n_butterfly_factor - 1)"
                f" = {size * 2**m}"
            )
        num = in_features // size
    if m and (num % 2 or size % 2):
        raise ConfigError(
            f"with boft_n_butterfly_factor > 1 the block count and size must be even (got {num} blocks of {size})"
        )
    return num, size


def butterfly_perm(n: int, blocks: int, half: int) -> torch.Tensor:
    """peft's block butterfly permutation of n indices: within each of `blocks` chunks, the groups
    of `half` indices at even positions first, then those at odd positions."""
    size = n // blocks
    groups = size // half
    order = torch.cat([torch.arange(0, groups, 2), torch.arange(1, groups, 2)])
    within = (order[:, None] * half + torch.arange(half)).flatten()
    return (torch.arange(0, n, size)[:, None] + within).flatten()


@dataclass(frozen=True)
class _Spec:
    factors: int
    block_num: int
    block_size: int
    dropout: float


class BOFTLayer(AdapterLayer):
    """Mixin placed before the base class (`class BOFTLinear(BOFTLayer, nn.Linear)`)."""

    method_name = "boft"
    param_dicts = ("boft_R", "boft_s")
    state_attrs = ("boft_spec", "boft_active", "boft_merged", "boft_disabled", "_boft_run", "_boft_route",
                   "_boft_perms")  # fmt: skip
    base_class_attr = "_boft_base_class"
    route_attr = "_boft_route"
    fan_in_fan_out = False
    _boft_route = None

    boft_R: nn.ParameterDict
    boft_s: nn.ParameterDict

    @classmethod
    def check_config(cls, module: nn.Module, path: str, cfg: BOFTConfig) -> None:
        try:
            fit_blocks(module.in_features, cfg)
        except ConfigError as e:
            raise ConfigError(f"BOFT cannot adapt {path}: {e}") from None

    def setup(self, base_class: type) -> None:
        self._boft_base_class = base_class
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_spec: dict[str, _Spec] = {}
        self.boft_active: tuple[str, ...] = ()
        self.boft_merged: list[str] = []
        self.boft_disabled = False
        self._boft_run: tuple[str, ...] = ()
        self._boft_perms: dict[tuple[str, torch.device], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add_from_config(self, name: str, cfg: BOFTConfig, path: str) -> None:
        device = base_device(self)
        if device.type == "meta":
            raise ConfigError(f"cannot add BOFT to a module whose weight is on the meta device ({path})")
        num, size = fit_blocks(self.in_features, cfg)
        m = cfg.boft_n_butterfly_factor
        r, s = torch.zeros(m, num, size, size), torch.ones(self.out_features, 1)
        if not cfg.init_weights:
            nn.init.normal_(r, mean=0.0, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[name] = nn.Parameter(r.to(device))
        self.boft_s[name] = nn.Parameter(s.to(device))
        self.boft_spec[name] = _Spec(m, num, size, cfg.boft_dropout)
        self._refresh()

    def shape_hint(self, name: str) -> str:
        s = self.boft_spec[name]
        return f"{s.factors} factor(s) of {s.block_num} blocks of boft_block_size={s.block_size}"

    @property
    def adapters_disabled(self) -> bool:
        return self.boft_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.boft_disabled = flag

    def set_active(self, names) -> None:
        self.boft_active = tuple(n for n in names if n in self.boft_R)
        self._refresh()

    def _refresh(self) -> None:
        self._boft_run = tuple(n for n in self.boft_active if n not in self.boft_merged)

    def delete_adapter(self, name: str) -> None:
        if name in self.boft_merged:
            self.unmerge([name])
        del self.boft_R[name]
        del self.boft_s[name]
        self.boft_spec.pop(name, None)
        self._boft_perms = {k: v for k, v in self._boft_perms.items() if k[0] != name}
        self.boft_active = tuple(n for n in self.boft_active if n != name)
        self._refresh()

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R[name], "boft_s": self.boft_s[name]}

    # ---- the rotation ----------------------------------------------------------------------------
    def _perms(self, name: str, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(perm, inverse) per factor: x @ P_i is x[..., inverse], z @ P_i^T is z[..., perm]."""
        key = (name, device)
        if key not in self._boft_perms:
            s, n = self.boft_spec[name], self.in_features
            out = []
            for i in range(s.factors):
                perm = torch.arange(n) if i == 0 else butterfly_perm(n, s.block_num // 2**i, s.block_size // 2)
                out.append((perm.to(device), torch.argsort(perm).to(device)))
            self._boft_perms[key] = out
        return self._boft_perms[key]

    def rotate(self, name: str, x: torch.Tensor, dropout: bool = False) -> torch.Tensor:
        """x (..., in) @ M of adapter `name` (in x's dtype, fp32 in practice); dropout: boft_dropout."""
        s, r = self.boft_spec[name], self.boft_R[name]
        blocks = cayley(0.5 * (r - r.transpose(-2, -1)).flatten(0, 1)).view_as(r)
        if dropout and s.dropout > 0:
            i = int(torch.randint(0, s.factors, (1,)))
            blocks = torch.cat([blocks[:i], drop_blocks(blocks[i], s.dropout)[None], blocks[i + 1:]])
        perms = self._perms(name, x.device)
        for i in reversed(range(s.factors)):  # x M_{m-1} ... M_0, M_i = P_i B_i P_i^T
            perm, inverse = perms[i]
            x = x if i == 0 else x[..., inverse]
            x = rotate_blocks(x, blocks[i].to(x.dtype))
            x = x if i == 0 else x[..., perm]
        return x

    # ---- merge -----------------------------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        return list(self.boft_merged)

    def _merged_weight(self, names: list[str], undo: bool = False) -> torch.Tensor:
        w = self.weight.detach()
        out = w.to(torch.float32)
        eye = torch.eye(self.in_features, device=w.device)
        for n in names:
            rot = self.rotate(n, eye).detach()  # I @ M = M
            scale = self.boft_s[n].detach().to(out)
            out = (out / scale) @ rot if undo else (out @ rot.T) * scale
        return out.to(w.dtype)

    def _to_merge(self, names: list[str]) -> list[str]:
        return [n for n in self.boft_active if n in names and n not in self.boft_merged]

    @torch.no_grad()
    def merge_is_finite(self, names: list[str]) -> bool:
        return bool(torch.isfinite(self._merged_weight(self._to_merge(names))).all())

    @torch.no_grad()
    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        todo = self._to_merge(names)
        if not todo:
            return []
        w = self._merged_weight(todo)
        if safe_merge and not torch.isfinite(w).all():
            raise ModelError(f"merging adapters {todo} would put NaN/inf into {self._get_name()}.weight")
        self.weight.copy_(w)
        self.boft_merged.extend(todo)
        self._refresh()
        return todo

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> list[str]:
        todo = [n for n in reversed(self.boft_merged) if names is None or n in names]
        if not todo:
            return []
        self.weight.copy_(self._merged_weight(todo, undo=True))
        self.boft_merged = [n for n in self.boft_merged if n not in todo]
        self._refresh()
        return todo

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._boft_route is not None and not self.boft_disabled:
            return self._boft_route.add_lora(self, x, super().forward(x, *args, **kwargs))
        if self.boft_disabled or not self._boft_run:
            return super().forward(x, *args, **kwargs)
        return self._run(x, self._boft_run, args, kwargs)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """The output with adapters `names` applied: the base run again on the rotated input, scaled."""
        return self._run(x, names, (), {})

    def _run(self, x: torch.Tensor, names, args, kwargs) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        for n in reversed(names):  # x (M_b M_a): the last adapter's rotation first (peft's order)
            h = self.rotate(n, h, dropout=self.training)
        out = super().forward(h.to(dtype), *args, **kwargs)
        scale = self.boft_s[names[0]].flatten()
        for n in names[1:]:
            scale = scale * self.boft_s[n].flatten()
        bias = self.bias
        if bias is None:
            return (out * scale).to(dtype)
        return ((out - bias) * scale + bias).to(dtype)

    def extra_repr(self) -> str:
        parts = [f"{n}: {self.shape_hint(n)}" for n in self.boft_R]
        return f"{super().extra_repr()}, boft=[{'; '.join(parts)}]"


class BOFTLinear(BOFTLayer, nn.Linear):
    """`nn.Linear` with BOFT adapters."""


class BOFTQuantLinear(BOFTLayer, QuantLinear):
    """A quantized base: the input is rotated and the output scaled, the codes stay frozen; no merge."""

    def cannot_merge(self) -> str | None:
        return self.merge_refusal()


def _to_peft(model: nn.Module, name: str, cfg: BOFTConfig, layers: list) -> dict[str, Any]:
    targets = cfg.target_modules
    if targets == ALL_LINEAR:  # write the resolved names, as peft does
        targets = minimal_suffixes([p for p, _ in layers], [n for n, _ in candidate_modules(model)])
    out = {k: getattr(cfg, k) for k in FIELDS}
    out.update(target_modules=targets, fan_in_fan_out=False)
    return out


def _from_peft(raw: dict[str, Any], source: str) -> BOFTConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(BOFTConfig, raw, FIELDS, source)


def _from_finetune_args(finetune) -> BOFTConfig:
    targets, extra = yaml_targets(finetune)
    size, num = finetune.boft_block_size, finetune.boft_block_num
    if num and size == 4:  # the default block size: boft_block_num alone decides
        size = 0
    if bool(size) == bool(num):
        raise ConfigError(
            "finetuning_type: boft needs exactly one of boft_block_size and boft_block_num non-zero "
            f"(got boft_block_size: {size}, boft_block_num: {num})"
        )
    return BOFTConfig(boft_block_size=size, boft_block_num=num, boft_n_butterfly_factor=finetune.boft_n_butterfly_factor,
                      target_modules=targets, modules_to_save=extra)


register_method(AdapterMethod(
    name="boft", peft_type="BOFT", label="BOFT", prefix="BOFT", config_class=BOFTConfig, layer_class=BOFTLayer,
    layers={nn.Linear: BOFTLinear, QuantLinear: BOFTQuantLinear},
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    keys=("lora_target", "additional_target", "boft_block_size", "boft_block_num", "boft_n_butterfly_factor"),
))  # fmt: skip
