"""BAdam (the badam package): block-coordinate Adam for full fine-tuning, built as LLaMA-Factory
builds it: layer mode wraps the `optim` optimizer in badam's BlockOptimizer (one decoder layer
trains at a time, switched every badam_switch_interval steps). Ratio mode (BlockOptimizerRatio)
is refused by keys.py: its sparse gradients break torch's clip_grad_norm_, and its masks are not
in its state dict, so a resumed run would update other entries.

The loop drives both as any optimizer (step, zero_grad, the schedule on its groups). What the
package leaves out, added here:
- BlockOptimizer switches `requires_grad` off on the blocks not training now; they still train
  over the run, so each such parameter is marked `trains_in_turns` and checkpoints save it
  (train/checkpoint.py).
- BlockOptimizer cannot load a state (its load_state_dict is broken in badam 1.4): the class here
  saves the block position with the Adam state of the active block, and on resume switches to
  that block, loads the state and re-reads the block's fp32 copies from the restored weights.
- badam_switch_interval: -1 never switches, as LLaMA-Factory documents (badam itself would
  switch on every step)."""

from __future__ import annotations

import logging
import sys
import warnings

import torch

from ...errors import ConfigError
from .keys import STATE_LAYOUT

log = logging.getLogger("tuneforge")


def _block_optimizer_class():
    from badam import BlockOptimizer

    class ResumableBlockOptimizer(BlockOptimizer):
        """badam's BlockOptimizer with a working state_dict / load_state_dict (see the module)."""

        def __init__(self, *args, **kwargs):
            self.active_block = None
            self._resync = False
            super().__init__(*args, **kwargs)
            self.state_dict = self._state_dict  # badam binds the base optimizer's state_dict here

        def switch_trainable_params(self, verbose=None):
            self.active_block = self.current_block_idx
            super().switch_trainable_params(verbose)

        def step(self, *args, **kwargs):
            if self._resync:  # the checkpoint's weights were loaded after the state: copy them
                for lp, hp in zip(self.param_idx2lp.values(), self.param_idx2hp.values()):
                    hp.data.copy_(lp.data.float())
                self._resync = False
            return super().step(*args, **kwargs)

        def _state_dict(self):
            """torch's layout for this optimizer's own groups (their hyper-parameters, all the
            parameters), the active block's Adam state as `state` (checked finite on resume), and
            under "badam" the block position and the base optimizer's groups."""
            own, base = torch.optim.Optimizer.state_dict(self), self.base_optimizer.state_dict()
            return {"state": base["state"], "param_groups": own["param_groups"], STATE_LAYOUT: "BAdam",
                    "badam": {"global_step": int(self.global_step), "active_block": self.active_block,
                              "next_block": self.current_block_idx,
                              "block_order": list(getattr(self, "block_order", [])),
                              "base_param_groups": base["param_groups"]}}

        def misfit(self, saved) -> str | None:
            """How a saved state does not fit this optimizer (tuneforge's resume check), or None."""
            position = saved.get("badam") if isinstance(saved, dict) else None
            if not isinstance(position, dict) or not isinstance(position.get("base_param_groups"), list):
                return "it is not a BAdam (layer mode) optimizer state"
            if not 0 <= int(position.get("active_block", -1)) < self.block_num:
                return f"its block {position.get('active_block')} is not among this model's {self.block_num}"
            prefixes = self.block_prefix_list[position["active_block"]] + self.active_modules
            here = sum(1 for n, _ in self.named_parameters_list if any(p in n for p in prefixes))
            there = sum(len(g.get("params", ())) for g in position["base_param_groups"])
            if here != there:
                return f"its block has {there} parameter(s) there, {here} here"
            everywhere = sum(len(g["params"]) for g in self.param_groups)
            if sum(len(g.get("params", ())) for g in saved.get("param_groups", ())) != everywhere:
                return f"it trained another number of parameters than the {everywhere} here"
            return None

        def load_state_dict(self, state_dict):
            position = state_dict["badam"]
            self.global_step = position["global_step"]
            self.current_block_idx = position["active_block"]
            if self.switch_mode == "random":  # the switch below pops the next block
                self.block_order = [*position["block_order"], position["next_block"]]
            self.switch_trainable_params(verbose=0)
            self.base_optimizer.load_state_dict({"state": state_dict["state"],
                                                 "param_groups": position["base_param_groups"]})
            self._resync = True

    return ResumableBlockOptimizer


def build_badam(model, args, finetune, base_cls: type, base_kwargs: dict) -> torch.optim.Optimizer:
    """BAdam (layer mode) over the model's trainable parameters; `base_cls(**base_kwargs)`: the
    `optim` optimizer it wraps. Raises ConfigError with several processes (LLaMA-Factory runs it
    distributed only under DeepSpeed ZeRO-3) and for a badam_start_block past the last block."""
    from badam import BlockOptimizer

    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ConfigError("config key 'use_badam' (BAdam) runs in one process here (LLaMA-Factory runs it "
                          "distributed only under DeepSpeed ZeRO-3); launch one process or drop use_badam")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
              {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay}]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, param in named:
        param.trains_in_turns = True
    blocks = len(BlockOptimizer.infer_param_groups(None, [n for n, _ in named], False, False))
    if not blocks:
        raise ConfigError("config key 'use_badam': BAdam finds the model's blocks by parameter names with "
                          "'layers.<n>.', which this model's names lack; drop use_badam")
    if finetune.badam_start_block is not None and finetune.badam_start_block >= blocks:
        raise ConfigError(f"config key 'badam_start_block' must be below this model's {blocks} blocks; got "
                          f"{finetune.badam_start_block}")
    with warnings.catch_warnings():  # badam warns that fp32 weights cost memory (tuneforge keeps fp32 masters)
        warnings.simplefilter("ignore", UserWarning)
        interval = finetune.badam_switch_interval
        optimizer = _block_optimizer_class()(
            base_optimizer=base_cls(groups, **base_kwargs), named_parameters_list=named,
            block_prefix_list=None, switch_block_every=sys.maxsize if interval == -1 else interval,
            start_block=finetune.badam_start_block, switch_mode=finetune.badam_switch_mode,
            verbose=finetune.badam_verbose)
    log.info("BAdam (layer mode): %d blocks, %s, switching every %s steps", optimizer.block_num,
             finetune.badam_switch_mode, "never" if interval == -1 else interval)
    return optimizer
