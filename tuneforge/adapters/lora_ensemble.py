"""Ensemble LoRA: several LoRAs of different ranks on the same layers, trained jointly.

    W = W0 + sum_i w_i * s_i * B_i A_i        s_i = lora_alpha_i / r_i   (/ sqrt(r_i) with use_rslora)

Member i is a plain LoRA of rank r_i (A_i: (r_i, in), B_i: (out, r_i)); w_i is its weight, fixed
or learned. With the default weights (1 each) the ensemble is exactly the sum of its members, each
a plain LoRA with its own r and lora_alpha; `ensemble_weights: [0.5, 0.5]` averages two of them;
`ensemble_weights: learn` trains one weight per member in every adapted layer, starting at 1.

    from tuneforge import LoraEnsembleConfig, add_adapter
    add_adapter(model, LoraEnsembleConfig(ensemble=[{"r": 4}, {"r": 16}], ensemble_weights="learn",
                                          target_modules="all-linear"))

Storage: the members are stacked into one LoRA of rank R = sum r_i (`lora_A`: (R, in), A_i its rows
o_i .. o_i + r_i; `lora_B`: (out, R)), so the adapter is one LoRA layer whose forward is
`B diag(v) A x` with v = each member's `w_i s_i` repeated r_i times (the `Ensemble` LoRA variant
below); learned weights are `<module>.lora_ensemble_weight.<adapter>`, shape (n_members,). Each
member starts with peft's init for its own rank (A_i kaiming-uniform or N(0, 1/r_i), B_i zero).
One dropout mask on the input serves all members (a member trained alone draws its own).

File: sum_i w_i s_i B_i A_i = (B diag(v)) A exactly, so `save_adapter` writes a plain peft LoRA
(peft_type LORA, r = lora_alpha = R, so peft's scaling is 1) with `lora_B` = B diag(v) and
`lora_A` = A. peft, transformers and tuneforge load it as that LoRA (tuneforge's own loader
included: it comes back as a plain LoRA of rank R, not as an ensemble); it merges, combines
(`combine_adapters`, the after-training route for separately trained LoRAs) and serves as any
LoRA. Training checkpoints keep the members and weights apart (the trainable state), so a resumed
run goes on as an ensemble. Merging adds `B diag(v) A` to the weight (exact; unmerge subtracts it).

Layers: nn.Linear, transformers' Conv1D and a quantized base (QuantLinear; merging refused there).
Embedding / Conv2d targets are refused. The maths of the sum is the ensemble's definition (issue 16);
peft has no such method (its weighted `add_weighted_adapter` combines finished adapters, as
`combine_adapters` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError

from .config import LoraConfig
from .inits import is_weight_init
from .lora import LoraLayer, init_lora
from .lora_method import config_to_peft as lora_config_to_peft
from .methods import AdapterMethod, method_named, register_method
from .peft_config import yaml_targets
from .sizes import check_adapter_size
from .variants import LoraVariant, register_variant

MEMBER_KEYS = ("r", "lora_alpha")
LEARN = "learn"


def _member(i: int, member: Any, default_alpha: float) -> dict[str, Any]:
    """Member `i` of `ensemble` checked and completed ({'r': int, 'lora_alpha': float})."""
    if isinstance(member, int) and not isinstance(member, bool):
        member = {"r": member}  # `ensemble: [4, 16]` is short for [{r: 4}, {r: 16}]
    if not isinstance(member, dict):
        raise ConfigError(f"ensemble[{i}] must be a mapping such as {{r: 4}} or {{r: 16, lora_alpha: 32}}, "
                          f"got {member!r}")
    for key in member:
        if key not in MEMBER_KEYS:
            raise ConfigError(f"ensemble[{i}] sets '{key}', which a member cannot set (a member sets r and "
                              "lora_alpha; lora_dropout, lora_target and use_rslora hold for the whole ensemble)")
    r = member.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"ensemble[{i}].r must be a positive integer (the member's rank), got {r!r}")
    alpha = member.get("lora_alpha", default_alpha)
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0
    if not ok:
        raise ConfigError(f"ensemble[{i}].lora_alpha must be a positive number, got {alpha!r}")
    return {"r": r, "lora_alpha": float(alpha)}


@dataclass
class LoraEnsembleConfig(LoraConfig):
    """A LoRA ensemble: LoraConfig's fields (peft's names) for what the members share, plus the members.

    `r` is set to the members' total rank; `lora_alpha` is the default alpha of a member that gives
    none. Raises ConfigError (one line naming the field) for a member key other than r / lora_alpha,
    a weight list of the wrong length, and for DoRA, PiSSA / OLoRA, rank_pattern / alpha_pattern
    (a member's rank is its own).
    """

    ensemble: list[dict[str, Any]] = field(default_factory=lambda: [{"r": 4}, {"r": 16}])
    """The members, e.g. [{'r': 4}, {'r': 16, 'lora_alpha': 32}] (r: rank; lora_alpha: default the
    config's lora_alpha)."""
    ensemble_weights: str | list[float] | None = None
    """Member weights w_i: None (1 each: the ensemble is the sum of its members), a list of numbers
    (fixed), or 'learn' (one trained weight per member in every adapted layer, starting at 1)."""

    def __post_init__(self) -> None:
        if not isinstance(self.ensemble, (list, tuple)) or not self.ensemble:
            raise ConfigError(f"ensemble must be a non-empty list of members such as [{{r: 4}}, {{r: 16}}], "
                              f"got {self.ensemble!r}")
        alpha = self.lora_alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {alpha!r}")
        self.ensemble = [_member(i, m, float(alpha)) for i, m in enumerate(self.ensemble)]
        self.ensemble_weights = _weights(self.ensemble_weights, len(self.ensemble))
        self.r = sum(m["r"] for m in self.ensemble)
        for name in ("rank_pattern", "alpha_pattern", "loftq_config"):
            if getattr(self, name):
                raise ConfigError(f"{name} is not supported for a LoRA ensemble (each member has its own rank "
                                  f"and lora_alpha in 'ensemble'); drop {name}")
        if self.use_dora:
            raise ConfigError("use_dora is not supported for a LoRA ensemble; set use_dora=False")
        if is_weight_init(self.init_lora_weights):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} (taken from the base weight) is not "
                              "supported for a LoRA ensemble; use true or 'gaussian'")
        super().__post_init__()

    @property
    def learns_weights(self) -> bool:
        return self.ensemble_weights == LEARN


def _weights(value: Any, n: int) -> str | list[float]:
    if value is None:
        return [1.0] * n
    if value == LEARN:
        return LEARN
    if isinstance(value, (list, tuple)) and len(value) == n and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in value):
        return [float(w) for w in value]
    raise ConfigError(f"ensemble_weights must be 'learn' or a list of {n} numbers (one per ensemble member), "
                      f"got {value!r}")


class Ensemble(LoraVariant):
    """The LoRA variant that makes one rank-R LoRA adapter a weighted sum of member LoRAs."""

    key, kind, describe = "ensemble", "maths", "ensemble"
    owns_forward = True
    param_dicts = ("lora_ensemble_weight",)  # learned member weights (n_members,), fp32

    def __init__(self, ranks: list[int], scales: list[float], weights: str | list[float], init: Any) -> None:
        self.ranks, self.scales, self.weights, self.init_value = ranks, scales, weights, init
        self._tensors: dict[str, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def select(cls, cfg):
        members = getattr(cfg, "ensemble", None)
        if not members:
            return None
        ranks = [m["r"] for m in members]
        root = math.sqrt if getattr(cfg, "use_rslora", False) else (lambda r: r)
        scales = [m["lora_alpha"] / root(m["r"]) for m in members]
        return cls(ranks, scales, cfg.ensemble_weights, cfg.init_lora_weights)

    def check(self, layer_cls: type, module, path: str) -> None:
        if isinstance(module, (nn.Embedding, nn.Conv2d)):
            raise ConfigError(f"a LoRA ensemble adapts linear layers only; target {path} "
                              f"({type(module).__name__}) cannot take one: narrow lora_target / target_modules")

    def scaling(self, r: int, alpha: float) -> float:
        return 1.0  # each member's own scale is in `vector`

    def init(self, layer, name: str) -> bool:
        A, B, start = layer.lora_A[name].data, layer.lora_B[name].data, 0
        for r in self.ranks:  # peft's start for a LoRA of rank r, member by member
            init_lora(A[start:start + r], B[:, start:start + r], r, self.init_value)
            start += r
        return True

    def after_init(self, layer, name: str) -> None:
        layer.lora_scaling[name] = 1.0  # the members' scales are in `vector` (also with RsLora selected)
        if self.weights == LEARN:
            ones = torch.ones(len(self.ranks), dtype=torch.float32, device=layer.lora_A[name].device)
            layer.lora_ensemble_weight[name] = nn.Parameter(ones)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scales s_i, ranks r_i, fixed weights w_i) as tensors on `device`, made once per device."""
        key = str(device)
        if key not in self._tensors:
            fixed = [1.0] * len(self.ranks) if self.weights == LEARN else self.weights
            self._tensors[key] = (torch.tensor(self.scales, dtype=torch.float32, device=device),
                                  torch.tensor(self.ranks, device=device),
                                  torch.tensor(fixed, dtype=torch.float32, device=device))
        return self._tensors[key]

    def member_weights(self, layer, name: str) -> torch.Tensor:
        """(n_members,) w_i: the layer's learned weights, or the fixed ones."""
        if self.weights == LEARN:
            return layer.lora_ensemble_weight[name]
        return self._constants(layer.lora_A[name].device)[2]

    def vector(self, layer, name: str) -> torch.Tensor:
        """(R,) v: member i's `w_i * s_i` repeated r_i times (differentiable in learned w)."""
        w = self.member_weights(layer, name)
        scales, ranks, _ = self._constants(w.device)
        return torch.repeat_interleave(w * scales.to(w.dtype), ranks, output_size=sum(self.ranks))

    def add_adapters(self, layer, x, out, names):
        for name in names:
            A, B = layer.lora_A[name], layer.lora_B[name]
            variant = next(v for v in layer.lora_variants[name] if isinstance(v, Ensemble))
            h = x if x.dtype == A.dtype or torch.is_autocast_enabled(x.device.type) else x.to(A.dtype)
            p = layer.lora_dropout[name]
            if p > 0.0:
                h = F.dropout(h, p=p, training=layer.training)
            t = (h @ A.t()) * variant.vector(layer, name).to(A.dtype)
            out = out + (t @ B.t()).to(out.dtype)
        return out

    def folded_b(self, layer, name: str) -> torch.Tensor:
        """B diag(v), fp32 (out, R): the B of the equivalent plain LoRA with scaling 1."""
        return layer.lora_B[name].detach().float() * self.vector(layer, name).detach().float()

    def delta(self, layer, name: str, delta: torch.Tensor) -> torch.Tensor:
        d = self.folded_b(layer, name) @ layer.lora_A[name].detach().float()
        return d.T if layer.fan_in_fan_out else d

    def file_tensors(self, layer, name: str, tensors: dict) -> dict:
        return {**tensors, "lora_B.weight": self.folded_b(layer, name)}

    def __repr__(self) -> str:
        return f"Ensemble(ranks={self.ranks}, scales={self.scales}, weights={self.weights!r})"

    def combine_refusal(self, names):
        return (f"adapters {names} are LoRA ensembles; save them (the file is a plain LoRA), load the files "
                "and combine those")


register_variant(Ensemble)


def config_to_peft(model: nn.Module, name: str, cfg: LoraEnsembleConfig, layers: list) -> dict[str, Any]:
    """The plain LoRA the ensemble equals: rank R = sum r_i, lora_alpha = R (scaling 1, B holds v)."""
    out = lora_config_to_peft(model, name, cfg, layers)
    out.update(r=cfg.r, lora_alpha=cfg.r, use_rslora=False, use_dora=False,
               init_lora_weights=cfg.init_lora_weights, rank_pattern={}, alpha_pattern={})
    return out


def from_finetune_args(finetune) -> LoraEnsembleConfig:
    """`finetuning_type: lora_ensemble`: members from `ensemble` (a member's lora_alpha defaults to
    the YAML lora_alpha, else 2 r as LoRA's YAML default), weights from `ensemble_weights`."""
    targets, extra = yaml_targets(finetune)
    members = finetune.ensemble if finetune.ensemble is not None else [{"r": 4}, {"r": 16}]
    if not isinstance(members, (list, tuple)) or not members:
        raise ConfigError(f"config key 'ensemble' must list the members, e.g. [{{r: 4}}, {{r: 16}}]; "
                          f"got {members!r}")
    completed = []
    for i, m in enumerate(members):
        m = {"r": m} if isinstance(m, int) and not isinstance(m, bool) else m
        if isinstance(m, dict) and "lora_alpha" not in m and isinstance(m.get("r"), int):
            alpha = finetune.lora_alpha if finetune.lora_alpha is not None else 2 * m["r"]
            m = {**m, "lora_alpha": alpha}
        completed.append(m)
    return LoraEnsembleConfig(
        ensemble=completed, ensemble_weights=finetune.ensemble_weights,
        lora_alpha=finetune.lora_alpha if finetune.lora_alpha is not None else 16,
        lora_dropout=finetune.lora_dropout, target_modules=targets, modules_to_save=extra,
        use_rslora=finetune.use_rslora,
    )


def _check_targets(targets: list, cfg: LoraEnsembleConfig) -> None:
    check_adapter_size(targets, {p: cfg.r for p, _ in targets})


register_method(AdapterMethod(
    name="lora_ensemble", peft_type="LORA", label="LoRA ensemble", prefix="Lora", config_class=LoraEnsembleConfig,
    layer_class=LoraLayer, layers=dict(method_named("lora").layers),  # LoRA's layers; the Ensemble variant's maths
    config_to_peft=config_to_peft, from_finetune_args=from_finetune_args, check_targets=_check_targets,
    keys=("lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_rslora", "ensemble",
          "ensemble_weights"),
))  # fmt: skip
