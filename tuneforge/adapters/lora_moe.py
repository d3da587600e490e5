"""Adaptive LoRA, the mixture-of-experts form: a router mixes k LoRA experts per token.

    y = base(x) + sum_e w_e(x) * s * B_e A_e x          s = lora_alpha / r   (/ sqrt(r) with use_rslora)
    p(x) = softmax(W_r x)                                 W_r: (num_experts, in), the router
    w(x) = p(x) on its top_k entries, renormalised to sum to one; 0 on the others

Per adapted layer: `num_experts` LoRA experts of rank r each (A_e: (r, in), B_e: (out, r)) and a
router, a bias-free Linear in -> num_experts read from the layer's own input, one decision per token
(every position of every row). The weights of the chosen experts are the router's softmax
probabilities renormalised over the top_k chosen ones, so per token they sum to one and exactly
top_k of them are non-zero (Shazeer et al. 2017, "Outrageously Large Neural Networks"; Mixtral's
routing, Jiang et al. 2024). With one expert and top_k 1 the layer is plain LoRA (w = 1).

While training, each adapted layer adds the load-balancing auxiliary loss of the Switch
Transformer (Fedus et al. 2021, eq. 4), in the top-k form of transformers' Mixtral
(`load_balancing_loss_func`):

    aux = num_experts * sum_e f_e * P_e
    f_e = fraction of the forward's tokens that have expert e among their top_k   (no gradient)
    P_e = mean over the same tokens of p_e(x)                                   (gradient -> router)

It is top_k when the experts are used evenly and grows as tokens crowd onto few experts. The loss
the loop trains on gets `router_aux_loss_coef * (mean of aux over the adapted layers)`. Every token
the layer sees counts, padding included (a layer has no attention mask). How it reaches the loss:
each training forward (training mode, autograd on, not inside a backward pass, so activation
checkpointing's recomputation does not count twice) records its aux per layer; the training loop
asks the method's `forward_loss` hook (`aux_loss` below) after every micro-batch's forward and adds
the term / gradient_accumulation_steps to that micro-batch's backward, so each micro-batch
contributes the aux of its own routing and a step gets their mean (as transformers' Trainer does
with Mixtral's loss). A loop of your own calls `aux_loss(model)` after each forward and adds it to
its loss; a layer keeps at most MAX_PENDING unclaimed records per adapter (the oldest are dropped).

Tensors per adapter `<adapter>` (fp32): `<module>.lora_experts_A.<adapter>` (num_experts, r, in),
`<module>.lora_experts_B.<adapter>` (num_experts, out, r), `<module>.lora_router.<adapter>`
(num_experts, in). A_e starts as LoRA's A (kaiming-uniform, or N(0, 1/r) with 'gaussian'), B_e at
zero (the adapter starts as the base model), the router as nn.Linear's default init. All experts
run densely (one (num_experts * r)-rank product with per-token column weights): exact, and cheap
for LoRA ranks; an expert a token does not choose has weight 0 and gets no gradient from it.

Files: peft's layout with peft_type "LORA_MOE" (`base_model.model.<module>.lora_experts_A`, ...);
tuneforge loads them back; peft cannot load them (peft has no such method). Merging is refused:
the update depends on each token's routing, so no single weight holds it (`tuneforge export` offers
`export_format: adapter`). Layers: nn.Linear, transformers' Conv1D (GPT-2) and a quantized base
(QuantLinear; merging refused there too).

YAML: `finetuning_type: lora` with `adaptive: moe` is `finetuning_type: lora_moe` (either spelling;
config.py applies adapter_methods.METHOD_SELECTORS), with `num_experts`, `moe_top_k` (top_k: the
YAML key `top_k` is sampling's), `router_aux_loss_coef`, and LoRA's `lora_rank` (each expert's rank), `lora_alpha`, `lora_dropout`,
`lora_target`, `additional_target`, `use_rslora`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.quant.linear import QuantLinear

from .config import ALL_LINEAR, _layer_indices, _names_or_regex, _positive_int
from .core import adapter_layers, get_state
from .layer import AdapterLayer, Conv1D
from .lora import init_lora
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, warn_unknown_fields, yaml_targets
from .targets import candidate_modules, minimal_suffixes

FIELDS = ("r", "lora_alpha", "lora_dropout", "num_experts", "top_k", "router_aux_loss_coef", "target_modules",
          "exclude_modules", "modules_to_save", "use_rslora", "init_lora_weights", "layers_to_transform",
          "layers_pattern")  # fmt: skip
MAX_PENDING = 16  # unclaimed aux records a layer keeps per adapter (a loop that never asks for them)
MERGE_REFUSAL = ("an adaptive (MoE) LoRA mixes its experts per token by a learned router, so its update depends "
                 "on the input and no single weight can hold it")


def _number(key: str, v: Any, low: float, low_closed: bool) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (v >= low if low_closed else v > low):
        raise ConfigError(f"{key} must be a number {'>=' if low_closed else '>'} {low:g}, got {v!r}")
    return float(v)


@dataclass
class LoraMoeConfig:
    """Settings of one adaptive (mixture-of-experts) LoRA adapter. LoRA's fields keep peft's
    LoraConfig names; `num_experts`, `top_k`, `router_aux_loss_coef` are transformers' Mixtral names.
    Raises ConfigError (one line naming the field) for a bad value, top_k > num_experts included."""

    r: int = 8
    """Rank of each expert's update B_e A_e."""
    lora_alpha: float = 8
    """Scale numerator: each expert's update is multiplied by lora_alpha / r (/ sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the experts' input while training (the router reads the input without it)."""
    num_experts: int = 4
    """LoRA experts per adapted layer."""
    top_k: int = 2
    """Experts each token uses (their weights renormalised to sum to one)."""
    router_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss in the training loss (Switch Transformer's alpha = 0.01); 0: off."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex (full match), or 'all-linear'."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter."""
    use_rslora: bool = False
    """Rank-stabilised scaling: lora_alpha / sqrt(r)."""
    init_lora_weights: bool | str = True
    """True: A_e kaiming-uniform, B_e zero; 'gaussian': A_e ~ N(0, 1/r), B_e zero; False: both random (tests)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules inside these layer indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (e.g. 'layers'); needs layers_to_transform."""

    def __post_init__(self) -> None:
        self.r = _positive_int("r", self.r)
        self.lora_alpha = _number("lora_alpha", self.lora_alpha, 0, False)
        self.lora_dropout = _number("lora_dropout", self.lora_dropout, 0, True)
        if self.lora_dropout >= 1:
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for key in ("num_experts", "top_k"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {v!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts}): each "
                              "token chooses top_k of the experts")
        self.router_aux_loss_coef = _number("router_aux_loss_coef", self.router_aux_loss_coef, 0, True)
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = _names_or_regex("modules_to_save", self.modules_to_save) or None
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() in ("true", "false", "gaussian"):
            init = {"true": True, "false": False}.get(init.lower(), "gaussian")
        if init not in (True, False, "gaussian") or not isinstance(init, (bool, str)):
            raise ConfigError(f"init_lora_weights must be true, false or 'gaussian' for an adaptive (MoE) LoRA, "
                              f"got {self.init_lora_weights!r}")
        self.init_lora_weights = init
        self.layers_to_transform = _layer_indices(self.layers_to_transform)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both or neither")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Spec:
    """What one layer needs of an adapter's config at forward time."""

    top_k: int
    scaling: float
    dropout: float
    aux: bool  # record the load-balancing term while training


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, probs, chosen) for router logits (..., E): probs = softmax in fp32; weights (..., E)
    = probs on each token's top_k experts renormalised to sum to one, 0 elsewhere; chosen (..., top_k)
    the experts' indices."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, chosen = probs.topk(top_k, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
    return weights, probs, chosen


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The load-balancing loss num_experts * sum_e f_e P_e of one forward (0-dim, fp32) from
    probs (..., E) and chosen (..., top_k) (Switch Transformer eq. 4; transformers' Mixtral top-k
    form: f_e counts the tokens with e among their top_k)."""
    n = probs.shape[-1]
    probs = probs.reshape(-1, n)
    f = F.one_hot(chosen.reshape(probs.shape[0], -1), n).sum(1).float().mean(0)  # (E,), sums to top_k
    return n * (f * probs.mean(0)).sum()


class LoraMoeLayer(AdapterLayer):
    """Mixin placed before the base class (`class LoraMoeLinear(LoraMoeLayer, nn.Linear)`)."""

    method_name = "lora_moe"
    param_dicts = ("lora_experts_A", "lora_experts_B", "lora_router")
    state_attrs = ("moe_spec", "moe_active", "moe_disabled", "_moe_run", "_moe_pending")
    base_class_attr = "_moe_base_class"
    route_attr = "_moe_route"
    fan_in_fan_out = False
    _moe_route = None

    lora_experts_A: nn.ParameterDict
    lora_experts_B: nn.ParameterDict
    lora_router: nn.ParameterDict

    def setup(self, base_class: type) -> None:
        self._moe_base_class = base_class
        for attr in self.param_dicts:
            setattr(self, attr, nn.ParameterDict())
        self.moe_spec: dict[str, _Spec] = {}
        self.moe_active: tuple[str, ...] = ()
        self.moe_disabled = False
        self._moe_run: tuple[str, ...] = ()
        self._moe_pending: dict[str, list[torch.Tensor]] = {}

    def in_out_features(self) -> tuple[int, int]:
        if self.fan_in_fan_out:  # Conv1D: weight (in, out)
            return self.weight.shape[0], self.weight.shape[1]
        return self.in_features, self.out_features

    def _base_device(self) -> torch.device:
        for t in (*self._parameters.values(), *self._buffers.values()):
            if t is not None:
                return t.device
        return torch.device("cpu")

    def add_from_config(self, name: str, cfg: LoraMoeConfig, path: str) -> None:
        device = self._base_device()
        if device.type == "meta":
            raise ConfigError(f"cannot add an adaptive (MoE) LoRA to a module whose weight is on the meta device "
                              f"({path})")
        in_f, out_f = self.in_out_features()
        n, r = cfg.num_experts, cfg.r
        A, B, router = torch.empty(n, r, in_f), torch.empty(n, out_f, r), torch.empty(n, in_f)
        for e in range(n):
            init_lora(A[e], B[e], r, cfg.init_lora_weights)
        nn.init.kaiming_uniform_(router, a=math.sqrt(5))  # nn.Linear(in, num_experts)'s default
        self.lora_experts_A[name] = nn.Parameter(A.to(device))
        self.lora_experts_B[name] = nn.Parameter(B.to(device))
        self.lora_router[name] = nn.Parameter(router.to(device))
        self.moe_spec[name] = _Spec(cfg.top_k, cfg.scaling, cfg.lora_dropout, cfg.router_aux_loss_coef > 0)
        self._refresh()

    def shape_hint(self, name: str) -> str:
        A = self.lora_experts_A[name]
        return f"num_experts={A.shape[0]}, r={A.shape[1]}"

    @property
    def adapters_disabled(self) -> bool:
        return self.moe_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.moe_disabled = flag

    def set_active(self, names) -> None:
        self.moe_active = tuple(n for n in names if n in self.lora_router)
        self._refresh()

    def _refresh(self) -> None:
        self._moe_run = self.moe_active

    def delete_adapter(self, name: str) -> None:
        for attr in self.param_dicts:
            d = getattr(self, attr)
            if name in d:
                del d[name]
        self.moe_spec.pop(name, None)
        self._moe_pending.pop(name, None)
        self.moe_active = tuple(n for n in self.moe_active if n != name)
        self._refresh()

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_experts_A": self.lora_experts_A[name], "lora_experts_B": self.lora_experts_B[name],
                "lora_router": self.lora_router[name]}

    # ---- merge: refused ---------------------------------------------------------------------------
    def cannot_merge(self) -> str | None:
        return MERGE_REFUSAL

    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        mine = [n for n in names if n in self.lora_router]
        if mine:
            raise ConfigError(f"cannot merge adaptive (MoE) LoRA adapters {mine}: {MERGE_REFUSAL}")
        return []

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        if self._moe_route is not None and not self.moe_disabled:
            return self._moe_route.add_lora(self, x, out)
        if self.moe_disabled or not self._moe_run:
            return out
        return self.add_adapters(x, out, self._moe_run)

    def routing(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`route` of adapter `name`'s router for input x (..., in): (weights, probs, chosen)."""
        W = self.lora_router[name]
        h = x if x.dtype == W.dtype or torch.is_autocast_enabled(x.device.type) else x.to(W.dtype)
        return route(h @ W.t(), self.moe_spec[name].top_k)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` (the base output for x (..., in)) plus each adapter's routed experts (..., out)."""
        for name in names:
            out = out + self.delta(name, x).to(out.dtype)
        return out

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """sum_e w_e(x) s B_e A_e dropout(x) for x (..., in): one product of rank num_experts * r whose
        columns carry each token's expert weights."""
        spec, A, B = self.moe_spec[name], self.lora_experts_A[name], self.lora_experts_B[name]
        n, r, in_f = A.shape
        weights, probs, chosen = self.routing(name, x)
        if spec.aux and self.training and torch.is_grad_enabled() and probs.numel() > 0:
            # computed also when activation checkpointing recomputes this forward inside the backward
            # pass (the recomputation must save what the forward saved), but recorded only outside it
            term = balance_loss(probs, chosen)
            if torch._C._current_graph_task_id() == -1:
                pending = self._moe_pending.setdefault(name, [])
                pending.append(term)
                del pending[:-MAX_PENDING]
        h = x if x.dtype == A.dtype or torch.is_autocast_enabled(x.device.type) else x.to(A.dtype)
        if spec.dropout > 0.0:
            h = F.dropout(h, p=spec.dropout, training=self.training)
        t = h @ A.reshape(n * r, in_f).t()  # (..., E r)
        t = t * (weights * spec.scaling).repeat_interleave(r, dim=-1).to(t.dtype)
        return t @ B.permute(1, 0, 2).reshape(B.shape[1], n * r).t()

    def take_aux(self, name: str) -> list[torch.Tensor]:
        """The load-balancing terms recorded by adapter `name`'s training forwards since the last call."""
        return self._moe_pending.pop(name, [])

    def extra_repr(self) -> str:
        parts = [f"{n}: {self.shape_hint(n)}, top_k={self.moe_spec[n].top_k}" for n in self.lora_router]
        return f"{super().extra_repr()}, lora_moe=[{'; '.join(parts)}]"


class LoraMoeLinear(LoraMoeLayer, nn.Linear):
    """`nn.Linear` with adaptive (MoE) LoRA adapters."""


class LoraMoeQuantLinear(LoraMoeLayer, QuantLinear):
    """Over a quantized base (`tuneforge.quant.QuantLinear`): the experts and the router read the
    input and add to the base output, which runs over the frozen codes unchanged."""

    def cannot_merge(self) -> str | None:
        return MERGE_REFUSAL


if Conv1D is not None:

    class LoraMoeConv1D(LoraMoeLayer, Conv1D):
        """transformers' `Conv1D` (GPT-2): weight stored as (in, out)."""

        fan_in_fan_out = True

else:  # pragma: no cover - transformers is a hard dependency of tuneforge
    LoraMoeConv1D = None  # type: ignore[assignment,misc]


def aux_loss(model: nn.Module, name: str | None = None, cfg: LoraMoeConfig | None = None) -> torch.Tensor | None:
    """router_aux_loss_coef x the mean load-balancing loss over the adapted layers and the training
    forwards since the last call (0-dim, with autograd into the routers), or None when none was
    recorded; adapter `name` (default: every adapter of this method, each with its own coefficient).
    Claims the records. This is the method's `forward_loss` hook (methods.py)."""
    st = get_state(model)
    configs = st.configs if st is not None else {}
    names = [name] if name is not None else [n for n, c in configs.items() if isinstance(c, LoraMoeConfig)]
    terms = []
    for n in names:
        coef = (cfg if cfg is not None else configs[n]).router_aux_loss_coef
        recorded = [t for _, layer in adapter_layers(model, n) if isinstance(layer, LoraMoeLayer)
                    for t in layer.take_aux(n)]  # fmt: skip
        if recorded and coef > 0:
            terms.append(coef * torch.stack(recorded).mean())
    return torch.stack(terms).sum() if terms else None


def _to_peft(model: nn.Module, name: str, cfg: LoraMoeConfig, layers: list) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in FIELDS}
    if cfg.target_modules == ALL_LINEAR:  # the resolved names, as peft writes them
        out["target_modules"] = minimal_suffixes([p for p, _ in layers], [n for n, _ in candidate_modules(model)])
    return out


def _from_peft(raw: dict[str, Any], source: str) -> LoraMoeConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(LoraMoeConfig, raw, FIELDS, source)


def _from_finetune_args(finetune) -> LoraMoeConfig:
    """`finetuning_type: lora_moe` (or lora with adaptive: moe): lora_rank per expert, lora_alpha
    (empty: 2 x lora_rank, as for LoRA), num_experts, top_k, router_aux_loss_coef."""
    if finetune.moe_top_k > finetune.num_experts:
        raise ConfigError(f"config key 'moe_top_k' ({finetune.moe_top_k}) must not exceed num_experts "
                          f"({finetune.num_experts}): each token chooses moe_top_k of the num_experts experts")
    targets, extra = yaml_targets(finetune)
    alpha = finetune.lora_alpha if finetune.lora_alpha is not None else 2 * finetune.lora_rank
    return LoraMoeConfig(
        r=finetune.lora_rank, lora_alpha=alpha, lora_dropout=finetune.lora_dropout, num_experts=finetune.num_experts,
        top_k=finetune.moe_top_k, router_aux_loss_coef=finetune.router_aux_loss_coef, target_modules=targets,
        modules_to_save=extra, use_rslora=finetune.use_rslora)


def _cannot_merge(cfg: LoraMoeConfig) -> str:
    return MERGE_REFUSAL


register_method(AdapterMethod(
    name="lora_moe", peft_type="LORA_MOE", label="MoE LoRA", prefix="LoraMoe", config_class=LoraMoeConfig,
    layer_class=LoraMoeLayer, layers={nn.Linear: LoraMoeLinear, Conv1D: LoraMoeConv1D, QuantLinear: LoraMoeQuantLinear},
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    forward_loss=aux_loss, cannot_merge=_cannot_merge,
    keys=("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_rslora", "adaptive",
          "num_experts", "moe_top_k", "router_aux_loss_coef"),
))  # fmt: skip
