"""An FSDP2 model's parameters gathered whole for the code that reads them outside a forward
(saving the adapter or model, checkpoints' weights): torch's FSDPModule.unshard / reshard, which
every process must call together (each all-gathers its shards). Its optimizer state stays
sharded in checkpoints: every process writes and reads its own part (torch.distributed.checkpoint,
`save_optimizer_shards` / `load_optimizer_shards`)."""

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


def _options(full: bool = True, **kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, **kwargs)


def save_optimizer_shards(model, optimizer, folder) -> list[dict]:
    """Write the optimizer state of a sharded `model` into `folder`, each process its own shard:
    torch.distributed.checkpoint's get_optimizer_state_dict (full_state_dict=False: DTensors keyed
    by parameter names) saved with its HuggingFaceStorageWriter(save_distributed=True), i.e. one
    safetensors file per process (shard-0000<rank+1>-model-00001-of-00001.safetensors) whose
    header records where its pieces sit in the whole tensors; no pickle. Returns the parameter
    groups (hyper-parameters, parameter names) for the main process to save beside them.
    Every process calls it together. A process's failed write (a full disk: OSError) is raised
    as itself on every process, not inside torch's CheckpointException."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
    state = get_optimizer_state_dict(model, inner, options=_options(full=False))
    with _plain_errors():
        dcp.save(state["state"], storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))
    return state["param_groups"]


@contextmanager
def _plain_errors():
    """torch.distributed.checkpoint's CheckpointException (a BaseException holding every process's
    failure) as the first process's own exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failures = sorted(exc.failures.items())
        if not failures:
            raise RuntimeError(str(exc).splitlines()[0]) from None
        first = failures[0][1][0]
        raise (first if isinstance(first, Exception) else RuntimeError(repr(first))) from None


def load_optimizer_shards(model, optimizer, folder) -> None:
    """Read `save_optimizer_shards`' folder into `optimizer`: each process takes the pieces of its
    own shards (torch.distributed.checkpoint reads by position in the whole tensors, so the
    pieces may have been written by another number of processes, or into whole tensors for a
    model that is not sharded). The optimizer keeps the hyper-parameters its groups have now.
    Every process calls it together, with no gradients held (the state is initialised by a zero
    step first, torch's _init_optim_state). Raises the exception torch.distributed.checkpoint met
    (on the first failing process) when a piece is missing or does not fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    current = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
    template = get_optimizer_state_dict(model, inner, options=_options(full=False))
    with _plain_errors():
        dcp.load(template["state"], storage_reader=HuggingFaceStorageReader(str(folder)))
    set_optimizer_state_dict(model, inner, template, options=_options(full=False))
    for group, settings in zip(inner.param_groups, current):
        group.update(settings)


def load_sharded_weights(model, weights: dict) -> None:
    """Put whole `weights` (name -> tensor, the trainable ones) into a sharded `model`, each
    process taking its shards (torch.distributed.checkpoint's set_model_state_dict). Every
    process calls it together."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))


def load_sharded(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Put whole `weights` (name -> tensor, the trainable ones) and a whole optimizer state
    (checkpoints from before the optimizer shards: get_optimizer_state_dict(full_state_dict=True)
    gathered it) into a sharded `model` and its optimizer, each process taking its
    shards (torch.distributed.checkpoint's set_model_state_dict / set_optimizer_state_dict). The
    optimizer keeps the hyper-parameters its groups have now. Every process calls it together."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    current = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
    set_model_state_dict(model, weights, options=_options(strict=False))
    set_optimizer_state_dict(model, inner, optimizer_state, options=_options())
    for group, settings in zip(inner.param_groups, current):
        group.update(settings)
