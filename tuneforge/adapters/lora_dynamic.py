"""Dynamic LoRA (DyLoRA): one LoRA of rank r_max whose components are ordered (nested), trained so
that it runs at any rank k <= r_max (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of
Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation"), with its rank grown r_min -> r_max
over training on a schedule.

    from tuneforge import LoraDynamicConfig, add_adapter
    add_adapter(model, LoraDynamicConfig(dynamic_rank={"min": 2, "max": 16, "schedule": "linear"},
                                         lora_alpha=32, target_modules="all-linear"))

Maths. The adapter holds A (r_max, in) and B (out, r_max), fp32, as plain LoRA does. At rank k it is
the plain LoRA made of the first k components,

    y = base(x) + s(k) * (dropout(x) @ A[:k].T) @ B[:, :k].T      s(k) = lora_alpha / k
                                                                   (lora_alpha / sqrt(k): use_rslora)

which is the paper's truncated update (alpha / b) W_up[:, :b] W_dw[:b] and exactly a peft LoRA of
r = k with the same lora_alpha: "truncated to k" and "saved at k, loaded back" are the same adapter.

Training (the loop's `before_step` / `after_step` hooks, methods.py). At optimizer step t of T:
- r(t), the rank reached, grows from r_min to r_max over the first `until` x T steps: `linear` gives
  every rank r_min..r_max the same number of steps, `cosine` eases in and out (fewer steps at the
  ends of the range), `constant` is r_max from the first step (the paper's DyLoRA, no growth);
- b(t), the rank the step trains, is drawn uniformly from [r_min, r(t)] (`sample: true`, the
  paper's nested dropout; a fixed function of t, so a resumed run draws the same ranks), or is r(t)
  itself (`sample: false`);
- the forward uses the first b(t) components only: the others are cut out, so their gradients are
  exactly zero; what the optimizer would still do to them (Adam's running moments, weight decay) is
  undone after the step (their values are kept before the step and put back), so only the first b(t)
  components change.
Evaluation during training runs at r(t); after the last step the adapter is at its saved rank.

Rank in use outside training: `save` (default r_max), or `set_dynamic_rank(model, k)`. Saving writes
the adapter at that rank as a plain peft LoRA (peft_type LORA, r = k, the first k components, the
same lora_alpha), which peft, transformers and tuneforge load as the LoRA it is (tuneforge loads it
back as plain LoRA, not as a dynamic adapter: save once per rank you want to serve); training
checkpoints keep all r_max components, so a resumed run goes on as a dynamic adapter. Merging adds
s(k) B[:, :k] A[:k] for the rank in use (exact; unmerging subtracts what was merged).

After training with an eval split, the eval loss at ranks r_min, the powers of two between, the saved
rank and r_max is printed as a table and written to train_results.json (`eval_loss_by_rank`).

YAML: `finetuning_type: lora_dynamic` with `dynamic_rank: {min: 2, max: 16, schedule: linear}` (also
`sample`, `until`, `save`), `lora_alpha` (empty: 2 x max), `lora_dropout`, `lora_target`, `use_rslora`,
`additional_target`. `dynamic_rank` with another finetuning_type is refused (its key is read by
lora_dynamic only), as is `lora_rank` here (the rank is dynamic_rank.max). Layers: nn.Linear,
transformers' Conv1D, a quantized base (QuantLinear; merging refused there); Embedding / Conv2d
targets, DoRA, PiSSA / OLoRA / LoftQ starts and rank / alpha patterns are refused.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError, ModelError

from .config import LoraConfig
from .core import adapter_layers
from .inits import is_weight_init
from .lora_method import config_to_peft as lora_config_to_peft
from .methods import AdapterMethod, method_named, register_method
from .peft_config import yaml_targets
from .sizes import check_adapter_size
from .variants import LoraVariant, register_variant

SCHEDULES = ("linear", "cosine", "constant")
SPEC_KEYS = ("min", "max", "schedule", "sample", "until", "save")


def _int(spec: dict, key: str, default: int | None) -> int | None:
    value = spec.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"dynamic_rank.{key} must be an integer, got {value!r}")
    return value


def check_spec(spec: Any, r: int = 8) -> dict[str, Any]:
    """`dynamic_rank` checked and completed: {min, max, schedule, sample, until, save}; `max`
    defaults to `r`, `save` to `max`. ConfigError (one line naming the entry) for a bad value."""
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ConfigError(f"dynamic_rank must be a mapping such as {{min: 2, max: 16, schedule: linear}}, "
                          f"got {spec!r}")
    for k in spec:
        if k not in SPEC_KEYS:
            raise ConfigError(f"dynamic_rank has no entry {k!r}; its entries are {', '.join(SPEC_KEYS)}")
    hi = _int(spec, "max", r)
    lo = _int(spec, "min", 1)
    if hi < 1:
        raise ConfigError(f"dynamic_rank.max must be at least 1 (the adapter's full rank), got {hi}")
    if lo < 1 or lo > hi:
        raise ConfigError(f"dynamic_rank.min must be between 1 and dynamic_rank.max ({hi}), got {lo}")
    schedule = spec.get("schedule", "linear")
    if schedule not in SCHEDULES:
        raise ConfigError(f"dynamic_rank.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    sample = spec.get("sample", True)
    if not isinstance(sample, bool):
        raise ConfigError(f"dynamic_rank.sample must be true or false, got {sample!r}")
    until = spec.get("until", 1.0)
    if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 < until <= 1:
        raise ConfigError(f"dynamic_rank.until must be a fraction of the run in (0, 1] (when the rank reaches "
                          f"max), got {until!r}")
    save = _int(spec, "save", hi)
    if not lo <= save <= hi:
        raise ConfigError(f"dynamic_rank.save must be between dynamic_rank.min ({lo}) and max ({hi}), got {save}")
    return {"min": lo, "max": hi, "schedule": schedule, "sample": sample, "until": float(until), "save": save}


def rank_reached(spec: dict, step: int, total_steps: int) -> int:
    """r(t): the rank reached at optimizer step `step` (1-based) of `total_steps`."""
    lo, hi = spec["min"], spec["max"]
    if spec["schedule"] == "constant" or lo == hi:
        return hi
    grow = max(1, round(spec["until"] * total_steps))
    p = min(1.0, (step - 1) / grow)
    if spec["schedule"] == "cosine":
        p = (1 - math.cos(math.pi * p)) / 2
    return min(hi, lo + math.floor(p * (hi - lo + 1) + 1e-9))


def rank_trained(spec: dict, step: int, total_steps: int) -> int:
    """b(t): the rank optimizer step `step` trains: uniform in [min, r(t)] (a fixed draw per step)
    with `sample`, else r(t)."""
    reached = rank_reached(spec, step, total_steps)
    if not spec["sample"]:
        return reached
    return spec["min"] + random.Random(f"dylora-{step}").randrange(reached - spec["min"] + 1)


def eval_ranks(spec: dict) -> list[int]:
    """The ranks of the after-training table: min, the powers of two between, save and max."""
    lo, hi = spec["min"], spec["max"]
    powers = [2 ** i for i in range(hi.bit_length() + 1) if lo < 2 ** i < hi]
    return sorted({lo, *powers, spec["save"], hi})


@dataclass
class LoraDynamicConfig(LoraConfig):
    """A Dynamic LoRA (DyLoRA): LoraConfig's fields (peft's names), plus the rank schedule.

    `r` is set to dynamic_rank's max (the components held); a `r` other than the default that
    disagrees with max is refused. Raises ConfigError (one line naming the field) for a bad
    `dynamic_rank` entry, DoRA, PiSSA / OLoRA / LoftQ and rank_pattern / alpha_pattern.
    """

    dynamic_rank: dict[str, Any] = field(default_factory=dict)
    """{min: 1, max: r, schedule: linear | cosine | constant, sample: true, until: 1.0, save: max}:
    the rank grows min -> max over the first `until` of the run; each step trains a rank drawn from
    [min, rank reached] (sample) or the rank reached; `save`: the rank the adapter is used, merged
    and saved at after training."""

    def __post_init__(self) -> None:
        given = self.dynamic_rank if isinstance(self.dynamic_rank, dict) else None
        if given is not None and "max" in given and self.r not in (8, given["max"]):
            raise ConfigError(f"r ({self.r}) and dynamic_rank.max ({given['max']}) disagree; set the rank "
                              "as dynamic_rank.max only")
        self.dynamic_rank = check_spec(self.dynamic_rank, self.r)
        self.r = self.dynamic_rank["max"]
        for name in ("rank_pattern", "alpha_pattern", "loftq_config"):
            if getattr(self, name):
                raise ConfigError(f"{name} is not supported for a Dynamic LoRA (every module has the same "
                                  f"nested ranks); drop {name}")
        if self.use_dora:
            raise ConfigError("use_dora is not supported for a Dynamic LoRA; set use_dora=False")
        if is_weight_init(self.init_lora_weights):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} (taken from the base weight) is not "
                              "supported for a Dynamic LoRA; use true or 'gaussian'")
        super().__post_init__()


class Dynamic(LoraVariant):
    """The LoRA variant that runs an adapter at a rank k <= r (its first k components, scaling
    alpha / k). One object per layer and adapter: `rank` (used in eval mode and saved), `train_rank`
    (used in train mode, set per step by the training loop; None: `rank`)."""

    key, kind, describe = "dynamic", "maths", "dynamic rank"
    owns_forward = True

    def __init__(self, spec: dict, alpha: float, rslora: bool) -> None:
        self.spec, self.alpha, self.rslora = spec, float(alpha), rslora
        self.rank: int = spec["save"]
        self.train_rank: int | None = None
        self.merged_rank: int | None = None
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None  # (A[b:], B[:, b:]) before a step

    @classmethod
    def select(cls, cfg):
        spec = getattr(cfg, "dynamic_rank", None)
        return None if not spec else cls(spec, cfg.lora_alpha, cfg.use_rslora)

    def check(self, layer_cls: type, module, path: str) -> None:
        if isinstance(module, (nn.Embedding, nn.Conv2d)):
            raise ConfigError(f"a Dynamic LoRA adapts linear layers only; target {path} "
                              f"({type(module).__name__}) cannot take one: narrow lora_target / target_modules")

    def scale(self, k: int) -> float:
        """s(k) = lora_alpha / k (lora_alpha / sqrt(k) with use_rslora): peft's scaling of a rank-k LoRA."""
        return self.alpha / (math.sqrt(k) if self.rslora else k)

    def in_use(self, layer) -> int:
        return self.train_rank if layer.training and self.train_rank is not None else self.rank

    def add_adapters(self, layer, x, out, names):
        """`out` plus Dynamic LoRA adapters `names` in order (LoraLayer.add_adapters gives plain ones
        to LoRA's own maths)."""
        for name in names:
            variant = next(v for v in layer.lora_variants[name] if isinstance(v, Dynamic))
            k = variant.in_use(layer)
            A, B = layer.lora_A[name][:k], layer.lora_B[name][:, :k]
            h = x if x.dtype == A.dtype or torch.is_autocast_enabled(x.device.type) else x.to(A.dtype)
            p = layer.lora_dropout[name]
            if p > 0.0:
                h = F.dropout(h, p=p, training=layer.training)
            out = out + ((h @ A.t()) @ B.t() * variant.scale(k)).to(out.dtype)
        return out

    def delta(self, layer, name: str, delta: torch.Tensor) -> torch.Tensor:
        """s(k) B[:, :k] A[:k] for the rank merged (when merged) or in use (recorded for unmerging)."""
        if name in layer.lora_merged and self.merged_rank is not None:
            k = self.merged_rank
        else:
            k = self.merged_rank = self.rank
        d = (layer.lora_B[name].detach().float()[:, :k] @ layer.lora_A[name].detach().float()[:k]) * self.scale(k)
        return d.T if layer.fan_in_fan_out else d

    def file_tensors(self, layer, name: str, tensors: dict) -> dict:
        k = self.rank
        return {**tensors, "lora_A.weight": layer.lora_A[name].detach()[:k].contiguous(),
                "lora_B.weight": layer.lora_B[name].detach()[:, :k].contiguous()}

    def combine_refusal(self, names):
        return (f"adapters {names} are Dynamic LoRAs; save them (the file is a plain LoRA at the rank in use), "
                "load the files and combine those")

    def __repr__(self) -> str:
        return f"Dynamic(spec={self.spec}, rank={self.rank}, train_rank={self.train_rank})"


register_variant(Dynamic)


def of(layer, name: str) -> Dynamic:
    """The Dynamic variant object of adapter `name` on `layer`."""
    return next(v for v in layer.lora_variants[name] if isinstance(v, Dynamic))


def _dynamic_layers(model: nn.Module, name: str) -> list[tuple[nn.Module, Dynamic]]:
    return [(m, of(m, name)) for _, m in adapter_layers(model, name)
            if any(isinstance(v, Dynamic) for v in getattr(m, "lora_variants", {}).get(name, ()))]


def set_dynamic_rank(model: nn.Module, rank: int, name: str = "default") -> None:
    """Use Dynamic LoRA adapter `name` at `rank` (its first `rank` components, scaling alpha / rank)
    from now on: forward, save_adapter (a plain LoRA of r = rank) and merge_adapters.

    Raises ConfigError for a rank outside 1..r_max or an adapter that is not a Dynamic LoRA, and
    ModelError while the adapter is merged (unmerge first)."""
    layers = _dynamic_layers(model, name)
    if not layers:
        raise ConfigError(f"adapter {name!r} is not a Dynamic LoRA on this model (finetuning_type: lora_dynamic)")
    hi = layers[0][1].spec["max"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= hi:
        raise ConfigError(f"the rank of Dynamic LoRA {name!r} must be an integer in 1..{hi}, got {rank!r}")
    if any(name in m.lora_merged for m, _ in layers):
        raise ModelError(f"Dynamic LoRA {name!r} is merged at rank {layers[0][1].merged_rank}; unmerge it before "
                         "changing its rank")
    for _, v in layers:
        v.rank, v.train_rank = rank, None


def dynamic_rank(model: nn.Module, name: str = "default") -> int:
    """The rank Dynamic LoRA adapter `name` is used at outside training (ConfigError if it is none)."""
    layers = _dynamic_layers(model, name)
    if not layers:
        raise ConfigError(f"adapter {name!r} is not a Dynamic LoRA on this model (finetuning_type: lora_dynamic)")
    return layers[0][1].rank


# ---- the training loop's hooks (methods.py) ------------------------------------------------------------
def before_step(model: nn.Module, name: str, cfg: LoraDynamicConfig, step: int, total_steps: int) -> None:
    """Step `step`: evaluate at r(t), train at b(t); keep the components past b(t) for `after_step`."""
    spec = cfg.dynamic_rank
    reached, trained = rank_reached(spec, step, total_steps), rank_trained(spec, step, total_steps)
    for m, v in _dynamic_layers(model, name):
        v.rank, v.train_rank = reached, trained
        A, B = m.lora_A[name], m.lora_B[name]
        v.kept = None if trained >= spec["max"] else (A.detach()[trained:].clone(), B.detach()[:, trained:].clone())


@torch.no_grad()
def after_step(model: nn.Module, name: str, cfg: LoraDynamicConfig, step: int, total_steps: int) -> None:
    """Put back the components the step did not train (the optimizer's moments and weight decay may
    have moved them); after the last step the adapter is at its saved rank."""
    for m, v in _dynamic_layers(model, name):
        if v.kept is not None:
            b = v.train_rank
            m.lora_A[name][b:].copy_(v.kept[0])
            m.lora_B[name][:, b:].copy_(v.kept[1])
            v.kept = None
        if step >= total_steps:
            v.rank, v.train_rank = cfg.dynamic_rank["save"], None


def after_training(model: nn.Module, name: str, cfg: LoraDynamicConfig, evaluate, report) -> dict:
    """Eval loss at ranks min, powers of two, save and max: printed as a table, returned as
    {"eval_loss_by_rank": {"<rank>": loss}}; the adapter is left at the rank it was at."""
    keep = dynamic_rank(model, name)
    losses = {}
    try:
        for k in eval_ranks(cfg.dynamic_rank):
            set_dynamic_rank(model, k, name)
            losses[k] = evaluate()["loss"]
    finally:
        set_dynamic_rank(model, keep, name)
    report(f"eval loss by rank (Dynamic LoRA {name!r}, saved at rank {keep}):")
    report("  rank  eval_loss")
    for k, loss in losses.items():
        report(f"  {k:>4}  {loss:.4f}")
    return {"eval_loss_by_rank": {str(k): loss for k, loss in losses.items()}}


# ---- the registration -----------------------------------------------------------------------------------
def config_to_peft(model: nn.Module, name: str, cfg: LoraDynamicConfig, layers: list) -> dict[str, Any]:
    """The plain LoRA of the rank in use: r = k, the same lora_alpha (peft's scaling alpha / k)."""
    out = lora_config_to_peft(model, name, cfg, layers)
    ranks = {of(m, name).rank for _, m in layers}
    if len(ranks) != 1:
        raise ModelError(f"Dynamic LoRA {name!r} is at different ranks in different layers ({sorted(ranks)}); "
                         "set one rank with set_dynamic_rank before saving")
    out.update(r=ranks.pop(), use_dora=False, rank_pattern={}, alpha_pattern={})
    return out


def from_finetune_args(finetune) -> LoraDynamicConfig:
    """`finetuning_type: lora_dynamic`: the schedule from `dynamic_rank`, lora_alpha empty: 2 x max."""
    spec = check_spec(finetune.dynamic_rank)
    targets, extra = yaml_targets(finetune)
    alpha = finetune.lora_alpha if finetune.lora_alpha is not None else 2 * spec["max"]
    return LoraDynamicConfig(dynamic_rank=dict(finetune.dynamic_rank or {}), r=spec["max"], lora_alpha=alpha,
                             lora_dropout=finetune.lora_dropout, target_modules=targets, modules_to_save=extra,
                             use_rslora=finetune.use_rslora)


def _check_targets(targets: list, cfg: LoraDynamicConfig) -> None:
    check_adapter_size(targets, {p: cfg.r for p, _ in targets})


register_method(AdapterMethod(
    name="lora_dynamic", peft_type="LORA", label="Dynamic LoRA", prefix="Lora", config_class=LoraDynamicConfig,
    layer_class=method_named("lora").layer_class, layers=dict(method_named("lora").layers),
    config_to_peft=config_to_peft, from_finetune_args=from_finetune_args, check_targets=_check_targets,
    before_step=before_step, after_step=after_step, after_training=after_training,
    keys=("lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_rslora", "dynamic_rank"),
))  # fmt: skip
