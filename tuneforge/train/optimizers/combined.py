"""`Combined`: several optimizers seen by the loop, the schedule and checkpoints as one (Muon
with AdamW for the rest; layer-wise GaLore / APOLLO, one optimizer per weight)."""

from __future__ import annotations

from collections import ChainMap

import torch


class Combined(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, seen as one: their groups (the same dicts,
    so a scheduler's learning rate reaches each) in order, one step, one state dict in torch's
    layout (parameter indices numbered across the parts; the parts' other keys, e.g.
    STATE_LAYOUT, kept), loaded back part by part. `stepped_in_backward`: the parts step
    themselves in gradient hooks (layer-wise GaLore / APOLLO), so `step` does nothing."""

    def __init__(self, parts: list[torch.optim.Optimizer], stepped_in_backward: bool = False):
        self.parts = parts
        self.stepped_in_backward = stepped_in_backward
        # tuneforge's resume check: low-rank parts keep moments not shaped like their weights
        self.states_shaped_like_params = all(getattr(p, "states_shaped_like_params", True) for p in parts)
        super().__init__([{"params": list(g["params"])} for p in parts for g in p.param_groups], {})
        self._share()

    def _share(self) -> None:
        self.param_groups = [g for part in self.parts for g in part.param_groups]
        self.state = ChainMap(*(part.state for part in self.parts))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if not self.stepped_in_backward:
            for part in self.parts:
                part.step()
        return loss

    def state_dict(self):
        state, groups, offset, extra = {}, [], 0, {}
        for part in self.parts:
            saved = part.state_dict()
            extra.update({k: v for k, v in saved.items() if k not in ("state", "param_groups")})
            state.update({index + offset: entry for index, entry in saved["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in saved["param_groups"]]
            offset += sum(len(g["params"]) for g in saved["param_groups"])
        return {**extra, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        offset, start = 0, 0
        for part in self.parts:
            groups = state_dict["param_groups"][start:start + len(part.param_groups)]
            count = sum(len(g["params"]) for g in groups)
            extra = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
            part.load_state_dict({
                **extra, "state": {i - offset: e for i, e in state_dict["state"].items() if offset <= i < offset + count},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in groups]})
            offset, start = offset + count, start + len(part.param_groups)
        self._share()
