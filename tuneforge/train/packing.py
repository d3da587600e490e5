"""Padding or packing: which collator a training run uses.

Packing (data/packing.py + train/packed_attention.py) is only right for a model that reads
position_ids and lets transformers build the block-diagonal mask from them. Rather than keep a
list of model families, a probe runs the actual model (adapters included) once before
training, on two short sequences packed and padded, and compares the logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data.collate import PaddingCollator
from ..data.packing import PackingCollator
from ..errors import ConfigError, TuneforgeError
from .fused_loss import one_thread
from .packed_attention import restore_attention, use_packed_attention

PROBE_LENGTHS = (7, 4)  # different lengths: the padded batch has padding, the packed row a restart


def packing_wanted(data_args) -> bool | None:
    """True / False as configured; None = decide by the probe. neat_packing implies packing."""
    if getattr(data_args, "neat_packing", False):
        return True
    return getattr(data_args, "packing", None)


@dataclass
class CollatorChoice:
    collate: object  # PaddingCollator or PackingCollator
    note: str | None  # a line for the log
    undo: Callable[[], None]  # puts the model back as it was (call before saving it)


def choose_collator(data_args, model, pad_token_id: int | None) -> CollatorChoice:
    """Padding or packing for this run. Choosing packing prepares `model` for packed rows
    (packed_attention.use_packed_attention); packing required but not exact: ConfigError."""
    wanted = packing_wanted(data_args)
    if wanted is False:
        return CollatorChoice(PaddingCollator(pad_token_id), None, lambda: None)
    previous = use_packed_attention(model)
    problem = probe_packing(model)
    if problem is None:
        return CollatorChoice(PackingCollator(),
                              "packing: on (padding-free rows, attention within each example)",
                              lambda: restore_attention(model, previous))
    restore_attention(model, previous)
    if wanted:
        key = "neat_packing" if getattr(data_args, "neat_packing", False) else "packing"
        fix = "drop neat_packing" if key == "neat_packing" else "set packing: false"
        raise ConfigError(f"config key '{key}' is true, but packed rows do not reproduce the "
                          f"padded batch on this model ({problem}); {fix}")
    return CollatorChoice(PaddingCollator(pad_token_id),
                          f"packing: off, padding instead ({problem})", lambda: None)


def probe_packing(model, lengths=PROBE_LENGTHS, seed: int = 0) -> str | None:
    """None if a packed row gives this model the padded batch's logits, else the reason."""
    try:
        vocab = model.get_input_embeddings().num_embeddings
        device = next(model.parameters()).device
    except (AttributeError, StopIteration) as exc:
        return f"cannot probe the model: {exc}"
    generator = torch.Generator().manual_seed(seed)
    examples = [{"input_ids": ids, "labels": ids}
                for ids in (torch.randint(0, vocab, (n,), generator=generator).tolist()
                            for n in lengths)]
    padded = PaddingCollator(0)(examples)
    packed = PackingCollator()(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), one_thread():
            padded_logits = model(input_ids=padded["input_ids"].to(device),
                                  attention_mask=padded["attention_mask"].to(device)).logits
            packed_logits = model(input_ids=packed["input_ids"].to(device),
                                  position_ids=packed["position_ids"].to(device)).logits
            alone = [model(input_ids=torch.tensor([e["input_ids"]], device=device)).logits[0]
                     for e in examples]
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot pack this model"
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        if isinstance(exc, TuneforgeError):  # a documented refusal (virtual tokens cannot pack), not a fault
            return first_line
        return f"a probe forward failed: {type(exc).__name__}: {first_line}"
    finally:
        model.train(was_training)
    reference = torch.cat([padded_logits[i, :n] for i, n in enumerate(lengths)]).float()
    return disagreement(packed_logits[0], reference, torch.cat(alone), model, "packed")


def disagreement(got: torch.Tensor, reference: torch.Tensor, alone: torch.Tensor, model, what: str) -> str | None:
    """None if `got` (tokens x vocabulary logits of a rearranged batch) equals `reference`
    (the padded batch's at the same tokens) up to rounding noise, else the reason. `alone`:
    the same logits from each sequence run on its own, whose distance from `reference`
    estimates the noise."""
    low = _low_precision(model) or got.dtype != torch.float32
    got, reference = got.float(), reference.float()
    if got.shape != reference.shape:
        return f"{what} logits have shape {tuple(got.shape)}, padded {tuple(reference.shape)}"
    error = (got - reference).abs().max().item()
    scale = max(reference.abs().max().item(), 1.0)
    # rounding noise: estimated by running the sequences one by one, and at least what the
    # dtype rounds (bf16: ~1e-2 of the largest logit). Attending to another sequence's tokens
    # moves logits by a good fraction of the largest one.
    noise = (alone.float() - reference).abs().max().item()
    floor = 2e-2 if low else 1e-4
    tolerance = min(max(floor * scale, 8 * noise), 5e-2 * scale)
    if not error <= tolerance:  # `not <=` also catches NaN
        return (f"{what} logits differ from padded ones by {error:.3g} (largest logit "
                f"{scale:.3g}, rounding noise {noise:.3g})")
    return None


def _low_precision(model) -> bool:
    """Weights or quantized layers computing in 16 bits."""
    half = (torch.bfloat16, torch.float16)
    return (any(p.dtype in half for p in model.parameters())
            or any(getattr(m, "compute_dtype", None) in half for m in model.modules()))
