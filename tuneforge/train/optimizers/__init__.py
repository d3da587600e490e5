"""LLaMA-Factory's optimizer choices beyond `optim`: GaLore, APOLLO, BAdam, Adam-mini and Muon,
each built from its well-kept package (galore-torch, apollo-torch, badam, adam-mini,
torch.optim.Muon) the way LLaMA-Factory builds it, and stepped by tuneforge's one loop.

keys.py: the YAML keys and their checks (light: read when a config is validated).
build.py: `build(model, args, finetune)`, the optimizer a config chooses or None (then
train/optim.py builds AdamW / the `optim` one). One small file per family: lowrank.py (GaLore,
APOLLO), mini.py (Adam-mini, Muon), blockwise.py (BAdam)."""

from .keys import OPTIMIZER_KEYS, check, chosen

__all__ = ["OPTIMIZER_KEYS", "check", "chosen"]
