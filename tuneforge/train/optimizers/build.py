"""`build(model, args, finetune)`: the optimizer that the keys of keys.py choose, or None when
none is set (train/optim.py then builds AdamW or the `optim` one). keys.check has accepted the
combination when the config was made."""

from __future__ import annotations

import torch

from .keys import chosen


def build(model, args, finetune, base: tuple[type, dict]) -> torch.optim.Optimizer | None:
    """`base`: (class, keyword arguments) of the `optim` optimizer, which GaLore, APOLLO and BAdam
    build on (their settings: learning rate, betas, eps, ...)."""
    key = chosen(finetune) if finetune is not None else None
    if key is None:
        return None
    cls, kwargs = base
    if key == "use_galore":
        from .lowrank import build_galore
        return build_galore(model, args, finetune, kwargs)
    if key == "use_apollo":
        from .lowrank import build_apollo
        return build_apollo(model, args, finetune, kwargs)
    if key == "use_badam":
        from .blockwise import build_badam
        return build_badam(model, args, finetune, cls, kwargs)
    from .mini import build_adam_mini, build_muon
    return build_adam_mini(model, args) if key == "use_adam_mini" else build_muon(model, args)
