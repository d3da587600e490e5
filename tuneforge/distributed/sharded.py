"""An FSDP2 model's parameters gathered whole for the code that reads them outside a forward
(saving the adapter or model, checkpoints' weights): torch's FSDPModule.unshard / reshard, which
every process must call together (each all-gathers its shards)."""

from __future__ import annotations

from contextlib import contextmanager


def fsdp_modules(model) -> list:
    """The modules of `model` that FSDP2 (torch.distributed.fsdp.fully_shard) shards, outermost
    first; empty for a model that is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    return bool(fsdp_modules(model))


@contextmanager
def gathered(model):
    """Inside: every parameter of `model` whole (a plain tensor) on every process; afterwards
    sharded again. Nothing happens for a model that is not sharded. Every process enters it
    together (the gather is a collective)."""
    modules = fsdp_modules(model)
    for module in modules:
        module.unshard()
    try:
        yield model
    finally:
        for module in reversed(modules):
            module.reshard()


def plain_state_dict(model) -> dict:
    """`model.state_dict()`'s keys and tensors, read from the modules themselves: inside `gathered`
    they are whole, while state_dict() itself would hand back the shards (FSDP2 reshards in a
    state-dict hook). Parameters and persistent buffers; tied weights under each of their names."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        head = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                out[head + name] = param.detach()
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                out[head + name] = buffer
    return out


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state of a sharded `model`, whole, on the main process (others get {}):
    torch.distributed.checkpoint's get_optimizer_state_dict, keyed by parameter names. Every
    process calls it together."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
    return get_optimizer_state_dict(model, inner, options=_options(cpu_offload=True))


def load_sharded(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Put whole `weights` (name -> tensor, the trainable ones) and a whole optimizer state
    (full_optimizer_state's) into a sharded `model` and its optimizer, each process taking its
    shards (torch.distributed.checkpoint's set_model_state_dict / set_optimizer_state_dict). The
    optimizer keeps the hyper-parameters its groups have now. Every process calls it together."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    current = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
    set_model_state_dict(model, weights, options=_options(strict=False))
    set_optimizer_state_dict(model, inner, optimizer_state, options=_options())
    for group, settings in zip(inner.param_groups, current):
        group.update(settings)
