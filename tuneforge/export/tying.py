"""Tied embeddings through a merge: the exported model must compute what the trained one did.

In a tied model (tie_word_embeddings, e.g. SmolLM2) the input embedding and the output head are
one tensor. An adapter that changes either side (modules_to_save of lm_head or embed_tokens,
LoRA on either) trained the two apart: the trained head next to the original embedding, or the
reverse. Merging into the shared tensor would change both, so before merging the head gets its
own copy; after merging, the two are tied again when they are still equal, and otherwise the
model is exported untied (tie_word_embeddings false, both tensors saved).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..adapters import LoraLayer
from ..adapters.modules_to_save import ModulesToSave

log = logging.getLogger("tuneforge")


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    return (get_in() if get_in else None), (get_out() if get_out else None)


def is_tied(model: nn.Module) -> bool:
    inp, out = _embeddings(model)
    return inp is not None and out is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0)


def untie_adapted_embeddings(model: nn.Module) -> bool:
    """Before merging: give the output head its own copy of a tied weight an adapter changes.
    Returns whether it did (then call `settle_tying` after the merge)."""
    inp, out = _embeddings(model)
    if not is_tied(model) or not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in (inp, out)):
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    return True


@torch.no_grad()
def settle_tying(model: nn.Module, untied: bool) -> None:
    """After merging: tie the head to the embedding again if they are equal; otherwise record in
    the config that the model is untied, so transformers and llama.cpp load both tensors."""
    if not untied:
        return
    inp, out = _embeddings(model)
    if torch.equal(inp.weight, out.weight):
        out.weight = inp.weight
        return
    model.config.tie_word_embeddings = False
    log.info("the adapter trained the output head and the input embedding apart: the export is "
             "untied (tie_word_embeddings: false, both tensors saved)")
