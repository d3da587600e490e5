"""Outputs that a decoder layer's backward can rebuild exactly, kept as recipes instead of tensors.

In a pre-norm decoder layer (LLaMA, Qwen2, Mistral, ...) each norm's output y = norm(x) feeds
projections whose LoRA A (or trained weight) keeps y for backward, while the norm itself keeps
its input x for its own backward: every layer holds x and y for both of its norms. Likewise, on
packed rows the attention keeps each segment's output (sdpa's backward reads it) and o_proj keeps
their concatenation (train/packed_attention.segment_attention). Here, while a decoder layer runs
forward with autograd, a saved-tensor hook replaces any saved view of such an output by a recipe
(the norm and its input x, or the segments' outputs, all kept anyway), and backward rebuilds the
tensor by running the same ops again on the same tensors under no_grad: bit-equal values. The layer
keeps 2 d fewer values per token for its norms (d the hidden size; for SmolLM2-135M about 135 MB
less per 1,024 tokens) and, on packed rows, d fewer for its attention output.

A registry of this layer's rebuildable outputs (storage address -> weak reference to the output, a
rebuild function, dtype) is filled by forward hooks on the norms and by `remember` (only while a
lean layer runs forward) and emptied when the layer's forward ends; a saved tensor matches only
while the output it came from is still alive, so a freed output's reused address never matches.
Installed on modules that transformers checkpoints as a layer (GradientCheckpointingLayer), with
norm children (class names ending in RMSNorm or LayerNorm, or torch.nn.LayerNorm); not under
gradient checkpointing, whose recomputation already drops these tensors (and whose non-reentrant
form must see every saved tensor itself).
"""

from __future__ import annotations

import types
import weakref
from contextlib import contextmanager

import torch

_LIVE: dict[int, tuple] = {}  # storage address -> (weakref to the output, rebuild, dtype); one layer at a time
_ACTIVE = [0]  # open `recipes()` contexts (remember records only inside one)


class _Rebuilt:
    """A saved view of a rebuildable output: the rebuild function and the view's geometry."""

    __slots__ = ("rebuild_whole", "size", "stride", "offset", "autocast")

    def __init__(self, rebuild_whole, view: torch.Tensor):
        self.rebuild_whole = rebuild_whole
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()
        kind = view.device.type
        # the forward's autocast state, restored for the rebuild (backward may run under another)
        self.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def rebuild(self) -> torch.Tensor:
        kind, enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            whole = self.rebuild_whole()
        return whole.as_strided(self.size, self.stride, self.offset)


def remember(output: torch.Tensor, rebuild) -> None:
    """Inside `recipes()` (a lean layer's forward) with autograd: `output` may be saved as `rebuild` (a
    function of no arguments that returns a tensor equal to it, bit for bit, and that must not
    refer to `output` itself). Elsewhere nothing happens."""
    if _ACTIVE[0] and torch.is_grad_enabled():
        _LIVE[output.untyped_storage().data_ptr()] = (weakref.ref(output), rebuild, output.dtype)


def _pack(t: torch.Tensor):
    entry = _LIVE.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
    if entry is not None and entry[0]() is not None and entry[2] == t.dtype:
        return _Rebuilt(entry[1], t)
    return t


def _unpack(saved):
    return saved.rebuild() if isinstance(saved, _Rebuilt) else saved


def _record(norm, args, output) -> None:
    if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
        x = args[0]
        remember(output, lambda: norm.forward(x))


@contextmanager
def recipes():
    """While it is open, with autograd: saved tensors that `remember` registered are kept as
    recipes. Reentrant (a lean MLP inside a lean layer); the registry empties when the outermost
    one closes, so nothing outlives the forward that registered it."""
    _ACTIVE[0] += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _ACTIVE[0] -= 1
        if not _ACTIVE[0]:
            _LIVE.clear()


def lean_layer_forward(self, *args, **kwargs):
    """The layer's own forward, with its rebuildable outputs saved as recipes (module docstring)."""
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    with recipes():
        return forward(self, *args, **kwargs)


def _is_norm(module: torch.nn.Module) -> bool:
    """A norm module, not one an adapter method made its own layer (its forward may draw dropout,
    which a rebuild would draw again differently)."""
    from ..adapters.layer import AdapterLayer

    name = type(module).__name__
    return (isinstance(module, torch.nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm")) \
        and not isinstance(module, AdapterLayer)


def _layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: no layer class to recognise
        return []
    found = []
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            norms = [child for child in module.children() if _is_norm(child)]
            if norms:
                found.append((module, norms))
    return found


def install_lean_layers(model: torch.nn.Module) -> int:
    """Give every decoder layer of `model` with norm children the lean forward (an instance
    attribute) and its norms a recording hook; returns how many layers got it."""
    count = 0
    for layer, norms in _layers(model):
        if "forward" in layer.__dict__:  # already lean, or patched by someone else: leave it
            continue
        layer.forward = types.MethodType(lean_layer_forward, layer)
        layer._lean_norm_hooks = [norm.register_forward_hook(_record) for norm in norms]
        count += 1
    return count


def uninstall_lean_layers(model: torch.nn.Module) -> None:
    for layer, _ in _layers(model):
        forward = layer.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ is lean_layer_forward:
            del layer.forward
            for handle in layer.__dict__.pop("_lean_norm_hooks", []):
                handle.remove()
