"""OFT, orthogonal finetuning (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning"), in peft's OFT v2 layout (peft >= 0.18): peft's `OFTConfig` field names and maths.

    from tuneforge import OFTConfig, add_adapter
    add_adapter(model, OFTConfig(oft_block_size=32, target_modules="all-linear"))

Each adapted Linear (in_features = r * oft_block_size) keeps its weight W (out, in) and rotates its
input: y = W (x R)^T + b, with R = block_diag(R_1, ..., R_r) and every block R_i (n, n), n =
oft_block_size, the Cayley transform of a skew-symmetric Q_i. The trained tensor is
`<module>.oft_R.<adapter>` (fp32), shape (r, n(n-1)/2): the strict upper triangle of each Q_i, row
by row ((1, n(n-1)/2) with block_share: one block used r times). It starts at zero (R = I, the
model is unchanged), or normal(0, 0.1) with init_weights=False. With use_cayley_neumann (peft's
default) R_i is peft's truncated Neumann series I + 2Q + 2Q^2 + ... (orthogonal.cayley_neumann),
else the exact (I - Q)(I + Q)^-1. coft (constrained OFT) clips each block's ||Q_i||_F to
eps / sqrt(rows) in place before every use, as peft does.

Several active adapters rotate the input one after another (in activation order). Merging writes
W R^T into the weight (for several adapters, so that merged == unmerged); unmerging solves the
rotation back out (exact up to rounding also for the approximate Neumann rotation).
module_dropout: while training, int(p * r) random blocks act as identity (peft 0.21.2 builds this
layer but its forward never calls it; tuneforge applies it as the field is documented).

Layers: nn.Linear, nn.Embedding (its output vectors are rotated; file key oft_embedding_R.weight)
and a quantized base (tuneforge.quant.QuantLinear, merge refused). peft's OFT has no layer for
transformers' Conv1D (GPT-2), so neither has tuneforge: such targets are refused in one line; OFT
on Conv2d is not implemented yet (refused the same way).

An `oft_block_size` that does not divide a layer's in_features (or an r that does not) is moved
to the nearest divisor for that layer with a warning, peft's rule, so peft's files load.
Files hold `base_model.model.<module>.oft_R.weight` (`.oft_embedding_R.weight` for an embedding),
peft_type "OFT".

YAML (LLaMA-Factory's keys): `finetuning_type: oft`, `oft_rank` (r) or `oft_block_size` (one of
them non-zero; oft_rank > 0 with oft_block_size left at its default 32 means oft_block_size 0),
`module_dropout`, `oft_target` (LLaMA-Factory's target list; empty: lora_target, 'all' = every
linear layer but the output head) and `additional_target` (modules_to_save).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError
from tuneforge.quant.linear import QuantLinear

from .config import ALL_LINEAR
from .layer import AdapterLayer
from .methods import AdapterMethod, register_method
from .orthogonal import (
    base_device,
    cayley,
    cayley_neumann,
    check_selection,
    drop_blocks,
    int_field,
    probability,
    rotate_blocks,
    skew_from_upper,
    upper_of,
)
from .peft_config import config_from_raw, split_names, warn_unknown_fields, yaml_targets
from .targets import candidate_modules, minimal_suffixes

FIELDS = (
    "r", "oft_block_size", "module_dropout", "target_modules", "fan_in_fan_out", "bias", "exclude_modules",
    "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save", "coft", "eps", "block_share",
    "use_cayley_neumann", "num_cayley_neumann_terms",
)  # fmt: skip
BIAS_MODES = ("none", "all", "oft_only")
# the peft version whose OFT maths (Cayley-Neumann series) tuneforge computes; written into files so
# that peft does not warn that they predate its 0.18 change of the series
PEFT_VERSION = "0.21.2"


@dataclass
class OFTConfig:
    """Settings of one OFT adapter; names, meanings and defaults follow peft's `OFTConfig`."""

    r: int = 0
    """Number of blocks per adapted layer (in_features = r * oft_block_size); 0: set by oft_block_size."""
    oft_block_size: int = 32
    """Size n of each orthogonal block; 0: set by r. Exactly one of r and oft_block_size is non-zero."""
    module_dropout: float = 0.0
    """While training, this fraction of each layer's blocks acts as identity (multiplicative dropout)."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex (full match), or 'all-linear' (every Linear but the output head)."""
    fan_in_fan_out: bool = False
    """peft's field; OFT adapts nn.Linear only, whose weight is (out, in), so it is always False."""
    bias: str = "none"
    """'none', 'all' (every bias trains) or 'oft_only' (the biases of the adapted layers train)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    init_weights: bool = True
    """True: the rotation starts at identity (zeros); False: normal(0, 0.1) (for tests)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt these layer indices (with layers_pattern naming the layer list, e.g. 'layers')."""
    layers_pattern: list[str] | str | None = None
    """Name of the model's layer list that layers_to_transform indexes."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter."""
    coft: bool = False
    """Constrained OFT: keep each block's skew matrix within eps of zero (projected before every use)."""
    eps: float = 6e-5
    """coft's radius (divided by sqrt(number of blocks)); no effect without coft."""
    block_share: bool = False
    """One block shared by all blocks of a layer (1 row instead of r)."""
    use_cayley_neumann: bool = True
    """True: the truncated Neumann series (fast, approximately orthogonal); False: the exact Cayley transform."""
    num_cayley_neumann_terms: int = 5
    """Terms of the Neumann series (peft's count)."""

    def __post_init__(self) -> None:
        self.r = int_field("r", self.r)
        self.oft_block_size = int_field("oft_block_size", self.oft_block_size)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"set exactly one of r and oft_block_size (the other 0; r x oft_block_size = in_features), "
                f"got r={self.r}, oft_block_size={self.oft_block_size}"
            )
        self.module_dropout = probability("module_dropout", self.module_dropout)
        check_selection(self, BIAS_MODES)
        for key in ("coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps <= 0:
            raise ConfigError(f"eps must be a positive number, got {self.eps!r}")
        self.num_cayley_neumann_terms = int_field("num_cayley_neumann_terms", self.num_cayley_neumann_terms, 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Spec:
    """One adapter's settings on one layer (block counts already fitted to the layer)."""

    r: int
    block_size: int
    block_share: bool
    coft: bool
    eps: float
    neumann: bool
    terms: int
    dropout: float


def nearest_divisor(n: int, p: int) -> int:
    """peft's fit of an OFT block size or count `p` to a layer width `n`: the nearest divisor of
    n (the smaller one on a tie), n itself for p >= n."""
    if p >= n:
        return n
    up = p
    while n % up:
        up += 1
    down = p
    while down > 1 and n % down:
        down -= 1
    return down if p - down <= up - p else up


def fit_blocks(in_features: int, r: int, block_size: int) -> tuple[int, int, str | None]:
    """(r, block_size, warning or None) for a layer of width in_features, as peft fits them."""
    if r == 0:
        if in_features % block_size == 0:
            return in_features // block_size, block_size, None
        fitted = nearest_divisor(in_features, block_size)
        note = f"OFT: oft_block_size={block_size} does not divide in_features={in_features}; using {fitted} there"
        return in_features // fitted, fitted, note + " (as peft does)"
    if in_features % r == 0 and r <= in_features:
        return r, in_features // r, None
    fitted = nearest_divisor(in_features, r)
    return fitted, in_features // fitted, f"OFT: r={r} does not divide in_features={in_features}; using r={fitted} there"


class OFTLayer(AdapterLayer):
    """Mixin placed before the base class (`class OFTLinear(OFTLayer, nn.Linear)`)."""

    method_name = "oft"
    param_dicts = ("oft_R",)
    state_attrs = ("oft_spec", "oft_active", "oft_merged", "oft_disabled", "_oft_run", "_oft_route")
    base_class_attr = "_oft_base_class"
    route_attr = "_oft_route"
    fan_in_fan_out = False
    _oft_route = None

    oft_R: nn.ParameterDict

    def setup(self, base_class: type) -> None:
        self._oft_base_class = base_class
        self.oft_R = nn.ParameterDict()
        self.oft_spec: dict[str, _Spec] = {}
        self.oft_active: tuple[str, ...] = ()
        self.oft_merged: list[str] = []
        self.oft_disabled = False
        self._oft_run: tuple[str, ...] = ()

    def add_from_config(self, name: str, cfg: OFTConfig, path: str) -> None:
        device = base_device(self)
        if device.type == "meta":
            raise ConfigError(f"cannot add OFT to a module whose weight is on the meta device ({path})")
        r, n, note = fit_blocks(self.in_features, cfg.r, cfg.oft_block_size)
        if note:
            warnings.warn(note, stacklevel=3)
        rows = 1 if cfg.block_share else r
        vec = torch.zeros(rows, n * (n - 1) // 2)
        if not cfg.init_weights:
            nn.init.normal_(vec, mean=0.0, std=0.1)
        self.oft_R[name] = nn.Parameter(vec.to(device))
        self.oft_spec[name] = _Spec(r, n, cfg.block_share, cfg.coft, float(cfg.eps), cfg.use_cayley_neumann,
                                    cfg.num_cayley_neumann_terms, cfg.module_dropout)
        self._refresh()

    def shape_hint(self, name: str) -> str:
        s = self.oft_spec[name]
        return f"r={s.r} blocks of oft_block_size={s.block_size}" + (", block_share" if s.block_share else "")

    @property
    def adapters_disabled(self) -> bool:
        return self.oft_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.oft_disabled = flag

    def set_active(self, names) -> None:
        self.oft_active = tuple(n for n in names if n in self.oft_R)
        self._refresh()

    def _refresh(self) -> None:
        self._oft_run = tuple(n for n in self.oft_active if n not in self.oft_merged)

    def delete_adapter(self, name: str) -> None:
        if name in self.oft_merged:
            self.unmerge([name])
        del self.oft_R[name]
        self.oft_spec.pop(name, None)
        self.oft_active = tuple(n for n in self.oft_active if n != name)
        self._refresh()

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"oft_R.weight": self.oft_R[name]}

    # ---- the rotation ----------------------------------------------------------------------------
    def rotation(self, name: str, dropout: bool = False) -> torch.Tensor:
        """Adapter `name`'s blocks R_i: (r, n, n), or (1, n, n) with block_share; fp32, with autograd.
        dropout: apply module_dropout (the training forward)."""
        s, vec = self.oft_spec[name], self.oft_R[name]
        if s.coft:
            with torch.no_grad():
                vec.copy_(_project(vec, s.block_size, s.eps))
        q = skew_from_upper(vec, s.block_size)
        blocks = cayley_neumann(q, s.terms) if s.neumann else cayley(q)
        if dropout and s.dropout > 0:
            blocks = drop_blocks(blocks, s.dropout)
        return blocks

    # ---- merge -----------------------------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        return list(self.oft_merged)

    def _rotated_weight(self, names: list[str], undo: bool = False) -> torch.Tensor:
        """W R_a^T R_b^T ... for names [.., b, a] (merge: the last adapter of the forward order first),
        or its inverse for undo; computed in fp32."""
        w = self.weight.detach()
        out = w.to(torch.float32).reshape(w.shape[0], -1, 1)
        for n in names:
            blocks = self.rotation(n).detach().to(out.device)
            k = self.oft_spec[n].block_size
            out = out.reshape(w.shape[0], -1, k)
            if blocks.shape[0] == 1:
                blocks = blocks.expand(out.shape[1], k, k)
            if undo:  # W_old^T = R^-1 W^T, block by block
                out = torch.linalg.solve(blocks, out.permute(1, 2, 0)).permute(2, 0, 1)
            else:
                out = torch.einsum("obk,bck->obc", out, blocks)
        return out.reshape(w.shape).to(w.dtype)

    def _to_merge(self, names: list[str]) -> list[str]:
        todo = [n for n in self.oft_active if n in names and n not in self.oft_merged]
        return list(reversed(todo))  # x R_a R_b W^T = x (W R_b^T R_a^T)^T

    @torch.no_grad()
    def merge_is_finite(self, names: list[str]) -> bool:
        return bool(torch.isfinite(self._rotated_weight(self._to_merge(names))).all())

    @torch.no_grad()
    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        todo = self._to_merge(names)
        if not todo:
            return []
        w = self._rotated_weight(todo)
        if safe_merge and not torch.isfinite(w).all():
            raise ModelError(f"merging adapters {todo} would put NaN/inf into {self._get_name()}.weight")
        self.weight.copy_(w)
        self.oft_merged.extend(todo)
        self._refresh()
        return todo

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> list[str]:
        todo = [n for n in reversed(self.oft_merged) if names is None or n in names]
        if not todo:
            return []
        self.weight.copy_(self._rotated_weight(todo, undo=True))
        self.oft_merged = [n for n in self.oft_merged if n not in todo]
        self._refresh()
        return todo

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._oft_route is not None and not self.oft_disabled:
            # rows of other adapters run the base again on their own rotated input
            return self._oft_route.add_lora(self, x, super().forward(x, *args, **kwargs))
        if self.oft_disabled or not self._oft_run:
            return super().forward(x, *args, **kwargs)
        return self._run(x, self._oft_run, args, kwargs)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """The output with adapters `names` applied: the base run again on the rotated input (`out`,
        the base output for `x`, is not needed)."""
        return self._run(x, names, (), {})

    def _run(self, x: torch.Tensor, names, args, kwargs) -> torch.Tensor:
        """peft's order: the input rotated in the adapter's dtype (fp32), cast back, then the base."""
        dtype = x.dtype
        for n in names:
            blocks = self.rotation(n, dropout=self.training)
            x = rotate_blocks(x.to(blocks.dtype), blocks)
        return super().forward(x.to(dtype), *args, **kwargs).to(dtype)

    def extra_repr(self) -> str:
        parts = [f"{n}: {self.shape_hint(n)}" for n in self.oft_R]
        return f"{super().extra_repr()}, oft=[{'; '.join(parts)}]"


def _project(vec: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """COFT's projection (peft's `_project_batch`): each block's skew matrix Q_i scaled down to
    Frobenius norm eps / sqrt(rows) when it is larger."""
    q = skew_from_upper(vec, n)
    radius = eps / math.sqrt(vec.shape[0])
    norm = torch.linalg.matrix_norm(q).view(-1, 1, 1)
    return upper_of(torch.where(norm <= radius, q, radius * q / norm))


class OFTLinear(OFTLayer, nn.Linear):
    """`nn.Linear` with OFT adapters."""


class OFTEmbedding(OFTLayer, nn.Embedding):
    """`nn.Embedding` with OFT adapters (peft's `oft_embedding_R`): each looked-up vector e (the
    embedding_dim = r * oft_block_size wide output) becomes e R; merging writes W R."""

    @property
    def in_features(self) -> int:  # the rotated width
        return self.embedding_dim

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"oft_embedding_R.weight": self.oft_R[name]}

    def _to_merge(self, names: list[str]) -> list[str]:
        return [n for n in self.oft_active if n in names and n not in self.oft_merged]  # e R_a R_b = e (W R_a R_b)

    def _rotated_weight(self, names: list[str], undo: bool = False) -> torch.Tensor:
        w = self.weight.detach()
        out = w.to(torch.float32)
        for n in names:
            blocks = self.rotation(n).detach().to(out.device)
            k = self.oft_spec[n].block_size
            if blocks.shape[0] == 1:
                blocks = blocks.expand(w.shape[1] // k, k, k)
            if undo:  # W_old R = W, block by block
                parts = out.reshape(w.shape[0], -1, k).transpose(0, 1)
                out = torch.linalg.solve(blocks, parts, left=False).transpose(0, 1).reshape(w.shape)
            else:
                out = rotate_blocks(out, blocks)
        return out.to(w.dtype)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        return self._rotate_output(out, names)

    def _run(self, x: torch.Tensor, names, args, kwargs) -> torch.Tensor:
        return self._rotate_output(nn.Embedding.forward(self, x, *args, **kwargs), names)

    def _rotate_output(self, out: torch.Tensor, names) -> torch.Tensor:
        dtype = out.dtype
        for n in names:
            blocks = self.rotation(n, dropout=self.training)
            out = rotate_blocks(out.to(blocks.dtype), blocks)
        return out.to(dtype)


class OFTQuantLinear(OFTLayer, QuantLinear):
    """A quantized base (QLoRA-style): the input is rotated, the codes stay frozen; no merge."""

    def cannot_merge(self) -> str | None:
        return self.merge_refusal()


def _to_peft(model: nn.Module, name: str, cfg: OFTConfig, layers: list) -> dict[str, Any]:
    targets = cfg.target_modules
    if targets == ALL_LINEAR:  # write the resolved names, as peft does
        targets = minimal_suffixes([p for p, _ in layers], [n for n, _ in candidate_modules(model)])
    out = {k: getattr(cfg, k) for k in FIELDS}
    out.update(target_modules=targets, fan_in_fan_out=False, peft_version=PEFT_VERSION)
    return out


def _from_peft(raw: dict[str, Any], source: str) -> OFTConfig:
    if "oft_block_size" not in raw:
        raise ModelError(
            f"{source}: an OFT adapter without oft_block_size was written by peft < 0.14 (the old OFT layout), "
            "which neither peft >= 0.14 nor tuneforge loads; train it again"
        )
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(OFTConfig, raw, FIELDS, source)


def _from_finetune_args(finetune) -> OFTConfig:
    """LLaMA-Factory's OFT keys: oft_rank, oft_block_size, module_dropout, oft_target, additional_target."""
    targets, extra = yaml_targets(finetune)
    if finetune.oft_target:
        names = split_names(finetune.oft_target)
        targets = "all-linear" if names in (["all"], ["all-linear"]) else names
    rank, size = finetune.oft_rank, finetune.oft_block_size
    if rank and size == 32:  # LLaMA-Factory's default block size: oft_rank alone decides
        size = 0
    if bool(rank) == bool(size):
        raise ConfigError(
            f"finetuning_type: oft needs exactly one of oft_rank and oft_block_size non-zero "
            f"(got oft_rank: {rank}, oft_block_size: {size})"
        )
    return OFTConfig(r=rank, oft_block_size=size, module_dropout=finetune.module_dropout,
                     target_modules=targets, modules_to_save=extra)


register_method(AdapterMethod(
    name="oft", peft_type="OFT", label="OFT", prefix="OFT", config_class=OFTConfig, layer_class=OFTLayer,
    layers={nn.Linear: OFTLinear, nn.Embedding: OFTEmbedding, QuantLinear: OFTQuantLinear},
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    keys=("lora_target", "additional_target", "oft_rank", "oft_block_size", "module_dropout", "oft_target"),
))  # fmt: skip
