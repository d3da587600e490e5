"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): only the bias terms train.

    from tuneforge import BitFitConfig, add_adapter
    add_adapter(model, BitFitConfig(target_modules="attention"))

Each adapted layer keeps its own (frozen) bias; every adapter adds a trained delta beside it,
`<module>.bitfit_bias.<adapter>` (fp32, the shape of the layer's bias: (out,) for Linear /
Conv1D, normalized_shape for LayerNorm), zeros at the start, so adapters switch and disabling them
gives the base model back:

    y = base(x) + delta          (delta broadcast over the last dimensions)

Where a targeted layer has no bias (Llama's projections), a frozen zero bias is added to it (one
log line per adapter says how many); it is removed again when the layer loses its last adapter
unmerged. Merging is exact: bias += delta. A merged model keeps the added biases, so its
state_dict has keys the base did not have; a config that declares no biases (Llama's
attention_bias / mlp_bias false) would drop them on reload, so `tuneforge export` refuses such a
merge (export/merge.py), and the adapter is served unmerged (chat / api) instead.

`target_modules` takes "all" (every Linear / Conv1D but the output head, and every LayerNorm: the
paper's "all bias terms"), "attention" / "mlp" (the linear layers inside a numbered block whose
path has, or has not, a component naming attention: 'attn' / 'attention'), a list of module
names (suffix match), or a regex (full match). peft has no BitFit: files use peft's layout with
`peft_type` "BITFIT" (`base_model.model.<module>.bitfit_bias`) and load back in tuneforge only.
YAML: `finetuning_type: bitfit`, `bitfit_target` (all / attention / mlp / comma list of module
names); `additional_target` gives modules_to_save.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError
from tuneforge.quant.linear import QuantLinear

from .config import ALL_LINEAR, _names_or_regex
from .layer import AdapterLayer, Conv1D
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, split_names, warn_unknown_fields
from .targets import candidate_modules, linear_types, output_head_name, resolve_targets

KEYWORDS = ("all", "attention", "mlp")
FIELDS = ("target_modules", "exclude_modules", "modules_to_save")
_BLOCK = re.compile(r"\.\d+\.")
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
log = logging.getLogger("tuneforge")


@dataclass
class BitFitConfig:
    """Settings of one BitFit adapter (peft has no BitFit; the fields follow peft's conventions)."""

    target_modules: list[str] | str = "all"
    """'all', 'attention', 'mlp' (see the module doc), module names or suffixes, or a regex (full match)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter (e.g. a classifier head)."""
    layers_to_transform = None  # no layer selection; target matching reads these
    layers_pattern = None

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = "all"
        if isinstance(self.target_modules, str) and self.target_modules.lower() in (*KEYWORDS, ALL_LINEAR):
            self.target_modules = "all" if self.target_modules.lower() == ALL_LINEAR else self.target_modules.lower()
        else:
            self.target_modules = _names_or_regex("target_modules", self.target_modules)
            if not self.target_modules:
                raise ConfigError("target_modules must name at least one module, or be 'all', 'attention' or 'mlp'")
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = _names_or_regex("modules_to_save", self.modules_to_save) or None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class BitFitLayer(AdapterLayer):
    """Mixin placed before the base class (`class BitFitLinear(BitFitLayer, nn.Linear)`)."""

    method_name = "bitfit"
    param_dicts = ("bitfit_bias",)
    state_attrs = ("bitfit_active", "bitfit_merged", "bitfit_disabled", "bitfit_added_bias", "_bitfit_run",
                   "_bitfit_route")  # fmt: skip
    base_class_attr = "_bitfit_base_class"
    route_attr = "_bitfit_route"
    _bitfit_route = None

    bitfit_bias: nn.ParameterDict

    def setup(self, base_class: type) -> None:
        self._bitfit_base_class = base_class
        self.bitfit_bias = nn.ParameterDict()
        self.bitfit_active: tuple[str, ...] = ()
        self.bitfit_merged: list[str] = []
        self.bitfit_disabled = False
        self.bitfit_added_bias = False
        self._bitfit_run: tuple[str, ...] = ()

    def bias_shape(self) -> tuple[int, ...]:
        """The shape of the layer's bias (and of each adapter's delta)."""
        raise NotImplementedError

    def add_from_config(self, name: str, cfg: BitFitConfig, path: str) -> None:
        if self.bias is None:  # a frozen zero bias in the weight's dtype, so that merging has somewhere to go
            own = [t for t in (*self.parameters(recurse=False), *self.buffers(recurse=False))]
            device = own[0].device if own else torch.device("cpu")
            dtype = next((t.dtype for t in self.parameters(recurse=False) if t.is_floating_point()), torch.float32)
            self.bias = nn.Parameter(torch.zeros(self.bias_shape(), device=device, dtype=dtype), requires_grad=False)
            self.bitfit_added_bias = True
        self.bitfit_bias[name] = nn.Parameter(torch.zeros(self.bias_shape(), device=self.bias.device))
        self._refresh()

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"bitfit_bias": self.bitfit_bias[name]}

    @property
    def adapters_disabled(self) -> bool:
        return self.bitfit_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.bitfit_disabled = flag

    def set_active(self, names) -> None:
        self.bitfit_active = tuple(n for n in names if n in self.bitfit_bias)
        self._refresh()

    def _refresh(self) -> None:
        self._bitfit_run = tuple(n for n in self.bitfit_active if n not in self.bitfit_merged)

    def delete_adapter(self, name: str) -> None:
        if name in self.bitfit_merged:
            self.unmerge([name])
        del self.bitfit_bias[name]
        self.bitfit_active = tuple(n for n in self.bitfit_active if n != name)
        self._refresh()

    def strip(self) -> None:
        """As AdapterLayer.strip; a bias BitFit added goes again unless an adapter was merged into it."""
        if self.bitfit_added_bias and not self.bitfit_merged:
            del self.bias
            self.register_parameter("bias", None)
        super().strip()

    # ---- merge: bias += delta --------------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        return list(self.bitfit_merged)

    @torch.no_grad()
    def merge_is_finite(self, names: list[str]) -> bool:
        todo = [n for n in names if n in self.bitfit_bias and n not in self.bitfit_merged]
        b = self.bias.detach().float()
        for n in todo:
            b = b + self.bitfit_bias[n].detach().to(b.device)
        return bool(torch.isfinite(b).all())

    @torch.no_grad()
    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        todo = [n for n in names if n in self.bitfit_bias and n not in self.bitfit_merged]
        if not todo:
            return []
        if safe_merge and not self.merge_is_finite(todo):
            raise ModelError(f"merging adapters {todo} would put NaN/inf into {self._get_name()}.bias")
        for n in todo:
            self.bias.add_(self.bitfit_bias[n].to(self.bias.dtype))
        self.bitfit_merged.extend(todo)
        self._refresh()
        return todo

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> list[str]:
        todo = [n for n in reversed(self.bitfit_merged) if names is None or n in names]
        for n in todo:
            self.bias.sub_(self.bitfit_bias[n].to(self.bias.dtype))
        self.bitfit_merged = [n for n in self.bitfit_merged if n not in todo]
        self._refresh()
        return todo

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        if self._bitfit_route is not None and not self.bitfit_disabled:
            return self._bitfit_route.add_lora(self, x, out)
        if self.bitfit_disabled or not self._bitfit_run:
            return out
        return self.add_adapters(x, out, self._bitfit_run)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` + the deltas of `names` (added in fp32, cast back to `out`'s dtype)."""
        result = out
        for n in names:
            result = result + self.bitfit_bias[n]
        return result.to(out.dtype)


class BitFitLinear(BitFitLayer, nn.Linear):
    """`nn.Linear` with BitFit deltas."""

    def bias_shape(self) -> tuple[int, ...]:
        return (self.out_features,)


class BitFitLayerNorm(BitFitLayer, nn.LayerNorm):
    """`nn.LayerNorm` with BitFit deltas (shape normalized_shape)."""

    def bias_shape(self) -> tuple[int, ...]:
        return tuple(self.normalized_shape)


class BitFitQuantLinear(BitFitLayer, QuantLinear):
    """A quantized base (QuantLinear): its bias is a plain tensor, so merging stays exact."""

    def bias_shape(self) -> tuple[int, ...]:
        return (self.out_features,)


if Conv1D is not None:

    class BitFitConv1D(BitFitLayer, Conv1D):
        """transformers' `Conv1D` (GPT-2): bias of shape (nf,)."""

        def bias_shape(self) -> tuple[int, ...]:
            return (self.nf,)

else:  # pragma: no cover - transformers is a hard dependency of tuneforge
    BitFitConv1D = None  # type: ignore[assignment,misc]


# ---- the method record's hooks ---------------------------------------------------------------------
def _keyword_targets(model: nn.Module, keyword: str) -> list[str]:
    """The module names 'all' / 'attention' / 'mlp' select (see the module doc)."""
    lin, head = linear_types(), output_head_name(model)
    names = []
    for path, m in candidate_modules(model):
        if isinstance(m, nn.LayerNorm):
            if keyword == "all":
                names.append(path)
            continue
        if not isinstance(m, lin) or path == head:
            continue
        if keyword == "all":
            names.append(path)
        elif _BLOCK.search(f".{path}"):
            attention = any(_ATTENTION.search(part) for part in path.split(".")[:-1])
            if attention == (keyword == "attention"):
                names.append(path)
    if not names:
        raise ConfigError(
            f"target_modules {keyword!r} selects no layer of {type(model).__name__}; name the modules "
            "(e.g. target_modules=['q_proj', 'v_proj'])"
        )
    return names


def _resolve_targets(model: nn.Module, cfg: BitFitConfig) -> list[tuple[str, nn.Module]]:
    if cfg.target_modules in KEYWORDS:
        explicit = dataclasses.replace(cfg, target_modules=_keyword_targets(model, cfg.target_modules))
        return resolve_targets(model, explicit)
    return resolve_targets(model, cfg)


def _note_added_biases(targets: list, cfg: BitFitConfig) -> None:
    """One log line per adapter: how many targets get a zero bias added (runs before any change)."""
    bare = [p for p, m in targets if getattr(m, "bias", None) is None and not isinstance(m, BitFitLayer)]
    if bare:
        log.warning("BitFit: %d of %d targeted layers have no bias (e.g. %s); a frozen zero bias is added to "
                    "each, and the adapter's deltas are added to it", len(bare), len(targets), bare[0])


def _to_peft(model: nn.Module, name: str, cfg: BitFitConfig, layers: list) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in FIELDS}


def _from_peft(raw: dict[str, Any], source: str) -> BitFitConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(BitFitConfig, raw, FIELDS, source)


def _from_finetune_args(finetune) -> BitFitConfig:
    target = (finetune.bitfit_target or "").strip()
    targets = target.lower() if target.lower() in (*KEYWORDS, "") else split_names(target)
    return BitFitConfig(target_modules=targets or "all", modules_to_save=split_names(finetune.additional_target) or None)


register_method(AdapterMethod(
    name="bitfit", peft_type="BITFIT", label="BitFit", prefix="BitFit", config_class=BitFitConfig,
    layer_class=BitFitLayer,
    layers={nn.Linear: BitFitLinear, Conv1D: BitFitConv1D, nn.LayerNorm: BitFitLayerNorm, QuantLinear: BitFitQuantLinear},
    resolve_targets=_resolve_targets, check_targets=_note_added_biases,
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    keys=("bitfit_target", "additional_target"),
))  # fmt: skip
