"""What a new adapter's rank costs, checked before any of it is allocated: a rank whose A and B
matrices cannot fit in the memory of the device they would live on is refused (one ConfigError
line), and a rank larger than a layer can use (the update B @ A of an (out, in) layer has rank at
most min(in, out)) is explained in one warning; peft allows such ranks, so they still load."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.fileio import human_size

log = logging.getLogger("tuneforge")
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def layer_dims(module: nn.Module) -> tuple[int, int, torch.device] | None:
    """(in, out, device) of a layer LoRA adapts: (rows, rest) of its weight, so Linear, Conv1D,
    Embedding and Conv2d all count; None when it has no weight to go by."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # Linear, QuantLinear
        tensor = next(iter(module.parameters()), None)
        if tensor is None:
            tensor = next(iter(module.buffers()), None)
        return (module.in_features, module.out_features, tensor.device) if tensor is not None else None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    return weight[0].numel(), weight.shape[0], weight.device


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device` (RAM, or the container's limit when lower); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for limit in _CGROUP_LIMITS:
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def check_adapter_size(targets: list[tuple[str, nn.Module]], ranks: dict[str, int]) -> None:
    """Refuse (ConfigError) ranks whose fp32 A and B matrices exceed the memory of their device;
    warn once when a rank is larger than some layer's min(in, out)."""
    need: dict[torch.device, int] = defaultdict(int)
    layers: dict[torch.device, int] = defaultdict(int)
    over = []
    for path, module in targets:
        dims = layer_dims(module)
        if dims is None:
            continue
        in_f, out_f, device = dims
        r = ranks[path]
        need[device] += 4 * r * (in_f + out_f)  # A (r, in) and B (out, r), fp32
        layers[device] += 1
        if r > min(in_f, out_f):
            over.append((path, in_f, out_f, r))
    for device, nbytes in need.items():
        total = device_memory(device)
        if total is not None and nbytes > total:
            where = "this machine's memory" if device.type == "cpu" else f"the memory of {device}"
            raise ConfigError(
                f"LoRA rank {max(ranks.values())} does not fit in memory: the adapter's A and B "
                f"matrices for {layers[device]} layers would take {human_size(nbytes)}, more than "
                f"{where}; lower lora_rank (r in adapter_config.json)"
            )
    if over:
        path, in_f, out_f, r = over[0]
        log.warning(
            "LoRA rank %d is larger than %d adapted layer(s) can use (e.g. %s: %d in, %d out): the "
            "update B @ A of a layer has rank at most min(in, out) = %d, so the extra rank only adds "
            "parameters, not capacity", r, len(over), path, in_f, out_f, min(in_f, out_f))
