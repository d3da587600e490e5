"""The optimizer keys of LLaMA-Factory (GaLore, APOLLO, BAdam, Adam-mini, Muon) and LLaMA Pro's
`use_llama_pro`, with LLaMA-Factory's names and defaults, and the checks of their combinations.

config.py makes OPTIMIZER_KEYS keys of the finetune section (as it does the stages' keys);
config_checks calls `check` on every config. Nothing heavy is imported here: a config is
validated before torch loads."""

from __future__ import annotations

import importlib.util

from ...errors import ConfigError
from ..stages.table import stage_key as _key

# the optimizer choosers, in LLaMA-Factory's order, each with its label and the package it needs
# (module to find, what to pip install, tuneforge's extra that brings it)
CHOOSERS = {
    "use_galore": ("GaLore", "galore_torch", "galore-torch", "galore"),
    "use_apollo": ("APOLLO", "apollo_torch", "apollo-torch", "apollo"),
    "use_badam": ("BAdam", "badam", "badam", "badam"),
    "use_adam_mini": ("Adam-mini", "adam_mini", "adam-mini", "adam-mini"),
    "use_muon": ("Muon", None, None, None),  # torch.optim.Muon (torch >= 2.9), checked when built
}
# the keys each chooser reads (refused without it)
_FAMILY = {"use_galore": "galore_", "use_apollo": "apollo_", "use_badam": "badam_"}
# the `optim` values each chooser can build on (LLaMA-Factory's mapping); None: any
_OPTIM = {
    "use_galore": ("adamw_torch", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adafactor"),
    "use_apollo": ("adamw_torch",),
    "use_badam": None,
    "use_adam_mini": ("adamw_torch",),
    "use_muon": ("adamw_torch",),
}
# the key of an optimizer state dict whose state is not one weight-shaped entry per weight
# (low-rank moments, per-block moments, one block's state): its value names the optimizer, and
# checkpoint checks (train/integrity.py) then check only that its numbers are finite
STATE_LAYOUT = "state_layout"
_BADAM_LAYER = ("badam_start_block", "badam_switch_mode", "badam_switch_interval")
_BADAM_RATIO = ("badam_update_ratio", "badam_mask_mode")

_TARGET = ("Modules whose 2-D weights get the low-rank update: 'all' (every linear layer but the "
           "output head) or a comma list of module names (substrings) such as q_proj,v_proj.")
OPTIMIZER_KEYS = {
    "use_galore": _key(False, "GaLore (galore-torch): Adam on gradients projected to a low rank for "
                              "the target weights (full or freeze fine-tuning); optim: adamw_torch, "
                              "adamw_8bit / paged_adamw_8bit or adafactor picks its base."),
    "galore_target": _key("all", "GaLore: " + _TARGET),
    "galore_rank": _key(16, "GaLore: rank of the projected gradients.", bounds="(0, inf)"),
    "galore_update_interval": _key(200, "GaLore: steps between projection updates.", bounds="(0, inf)"),
    "galore_scale": _key(2.0, "GaLore: scale of the projected-back update.", bounds="(0, inf)"),
    "galore_proj_type": _key("std", "GaLore: projection side.", choices=("std", "reverse_std", "right", "left", "full")),
    "galore_layerwise": _key(False, "GaLore: one optimizer per weight, stepped inside the backward pass "
                                    "(less memory); needs gradient_accumulation_steps: 1, no max_grad_norm "
                                    "clipping, one process."),
    "use_apollo": _key(False, "APOLLO (apollo-torch): AdamW with channel- or tensor-wise scaling "
                              "estimated in a low-rank space for the target weights (full or freeze)."),
    "apollo_target": _key("all", "APOLLO: " + _TARGET),
    "apollo_rank": _key(16, "APOLLO: rank of the auxiliary space.", bounds="(0, inf)"),
    "apollo_update_interval": _key(200, "APOLLO: steps between projection updates.", bounds="(0, inf)"),
    "apollo_scale": _key(32.0, "APOLLO: scaling coefficient.", bounds="(0, inf)"),
    "apollo_proj": _key("random", "APOLLO: projection (random or svd).", choices=("svd", "random")),
    "apollo_proj_type": _key("std", "APOLLO: projection side.", choices=("std", "right", "left")),
    "apollo_scale_type": _key("channel", "APOLLO: scaling per channel or per tensor.", choices=("channel", "tensor")),
    "apollo_layerwise": _key(False, "APOLLO: one optimizer per weight, stepped inside the backward pass "
                                    "(as galore_layerwise)."),
    "apollo_scale_front": _key(False, "APOLLO: apply the norm-growth limiter before the gradient scaling."),
    "use_badam": _key(False, "BAdam (badam): block-coordinate Adam, one block of the model trains at a "
                             "time (full fine-tuning)."),
    "badam_mode": _key("layer", "BAdam: layer (one decoder layer at a time); ratio (a share of every "
                                "weight, through sparse gradients) is refused.", choices=("layer", "ratio")),
    "badam_start_block": _key(None, "BAdam layer mode: the block to start with (empty: by switch mode).",
                              type="Optional[int]", bounds="[0, inf)"),
    "badam_switch_mode": _key("ascending", "BAdam layer mode: order of the blocks.",
                              choices=("ascending", "descending", "random", "fixed")),
    "badam_switch_interval": _key(50, "BAdam layer mode: optimizer steps per block; -1 never switches."),
    "badam_update_ratio": _key(0.05, "BAdam ratio mode (refused): share of each weight updated.",
                               bounds="(0, 1]"),
    "badam_mask_mode": _key("adjacent", "BAdam ratio mode (refused): which entries are updated.",
                            choices=("adjacent", "scatter")),
    "badam_verbose": _key(0, "BAdam: 0 quiet, 1 print the block, 2 also its parameters.", choices=(0, 1, 2)),
    "use_adam_mini": _key(False, "Adam-mini (adam-mini): Adam with one second-moment value per block "
                                 "(head, neuron) instead of per weight (full or freeze: it splits whole "
                                 "weights by heads)."),
    "use_muon": _key(False, "Muon (torch.optim.Muon): orthogonalised momentum for the 2-D hidden "
                            "weights, AdamW for embeddings, output head and 1-D parameters."),
    "use_llama_pro": _key(False, "LLaMA Pro: on a model expanded by `python -m tuneforge.llama_pro`, "
                                 "train only the expanded blocks (freeze_trainable_layers = how many "
                                 "were added): in full with finetuning_type: freeze, LoRA on their "
                                 "linear layers with lora."),
}


def read_with(key: str) -> dict:
    """The settings under which `key` (of OPTIMIZER_KEYS) is read, e.g. galore_rank:
    {finetuning_type: full, use_galore: true}; {} for a key read on its own."""
    for chooser, prefix in _FAMILY.items():
        if key.startswith(prefix):
            mode = {"badam_mode": "ratio"} if key in _BADAM_RATIO else {}
            return {"finetuning_type": "full", chooser: True, **mode}
    return {}


def chosen(finetune) -> str | None:
    """The optimizer chooser key set to true (check() allows one), or None."""
    return next((key for key in CHOOSERS if getattr(finetune, key, False)), None)


def check(cfg, given) -> None:
    """The optimizer and LLaMA Pro keys of `cfg` (a config.Config), against LLaMA-Factory's rules
    and what tuneforge's loop can honour; `given`: the keys the user set. Raises ConfigError."""
    ft = cfg.finetune
    on = [key for key in CHOOSERS if getattr(ft, key)]
    if len(on) > 1:
        raise ConfigError(f"config keys '{on[0]}' and '{on[1]}' each choose the optimizer; keep one")
    key = on[0] if on else None
    for chooser, prefix in _FAMILY.items():
        stray = sorted(k for k in given if k.startswith(prefix) and k in OPTIMIZER_KEYS)
        if stray and key != chooser:
            raise ConfigError(f"config key '{stray[0]}' is read with {chooser}: true; drop it or set {chooser}")
    _check_llama_pro(ft)
    if key is None:
        return
    label, module, package, extra = CHOOSERS[key]
    if key in ("use_galore", "use_apollo", "use_badam", "use_adam_mini") and ft.finetuning_type not in ("full", "freeze"):
        raise ConfigError(f"config key '{key}' ({label}) trains the model's own weights: set "
                          f"finetuning_type: full or freeze (got {ft.finetuning_type}), or drop it")
    if key == "use_badam" and ft.finetuning_type != "full":
        raise ConfigError("config key 'use_badam' (BAdam) chooses itself which block of the model trains: "
                          "set finetuning_type: full (got freeze), or drop it")
    for layerwise in ("galore_layerwise", "apollo_layerwise"):
        if getattr(ft, layerwise):
            _check_layerwise(layerwise, cfg.train, given)
    if key == "use_badam" and ft.badam_mode == "ratio":
        raise ConfigError("config key 'badam_mode': ratio updates through sparse gradients, which tuneforge's "
                          "gradient clipping (max_grad_norm) and checkpoints (its masks) do not take; use "
                          "badam_mode: layer")
    wrong = [k for k in _BADAM_RATIO if k in given]
    if wrong and key == "use_badam":
        raise ConfigError(f"config key '{wrong[0]}' is read in badam_mode: ratio, which tuneforge does not run; "
                          "drop it")
    if key == "use_badam" and not (ft.badam_switch_interval == -1 or ft.badam_switch_interval > 0):
        raise ConfigError("config key 'badam_switch_interval' must be -1 (never switch) or a positive number "
                          f"of steps; got {ft.badam_switch_interval}")
    allowed = _OPTIM[key]
    optim = getattr(cfg.train, "optim", "adamw_torch") or "adamw_torch"
    if allowed is not None and optim not in allowed:
        raise ConfigError(f"config key 'optim' ({optim}) cannot be the base of {key}: {label} builds on "
                          f"{', '.join(allowed)}; change optim or drop {key}")
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(f"config key '{key}' needs the {package} package: pip install {package} "
                          f"(or pip install 'tuneforge[{extra}]')")


def _check_layerwise(key: str, train, given) -> None:
    """Layer-wise updates run inside the backward pass: one micro-batch per step (as
    LLaMA-Factory), unscaled gradients (no fp16), and nothing to clip."""
    if train.gradient_accumulation_steps != 1:
        raise ConfigError(f"config key '{key}' updates each weight inside the backward pass, which cannot "
                          "accumulate gradients (LLaMA-Factory refuses it too): set gradient_accumulation_steps: 1 "
                          f"(got {train.gradient_accumulation_steps}) or {key}: false")
    if train.fp16:
        raise ConfigError(f"config key '{key}' updates each weight inside the backward pass, before fp16's loss "
                          f"scaler unscales the gradients: use bf16 or fp32, or {key}: false")
    if "max_grad_norm" in given and train.max_grad_norm > 0:
        raise ConfigError(f"config key 'max_grad_norm' cannot clip with {key}: the gradients are applied and freed "
                          f"inside the backward pass; drop max_grad_norm or set {key}: false")


def _check_llama_pro(ft) -> None:
    if not ft.use_llama_pro:
        return
    if ft.finetuning_type not in ("freeze", "lora"):
        raise ConfigError(f"config key 'use_llama_pro' trains the expanded blocks of a LLaMA Pro model "
                          f"with finetuning_type: freeze or lora (got {ft.finetuning_type}); set one of "
                          "them, or drop use_llama_pro")
    if ft.freeze_trainable_layers <= 0:
        raise ConfigError("config key 'freeze_trainable_layers' must be the number of blocks added by "
                          f"the expansion (positive) with use_llama_pro; got {ft.freeze_trainable_layers}")
