"""LoRA for `nn.Embedding`: `y = embed(ids) + scaling * A.T[ids] @ B.T`, with peft's maths.

The weight of an embedding is stored (num_embeddings, dim), i.e. (in, out), so adapter
`<module>.lora_A.<adapter>` is (r, num_embeddings) and `lora_B.<adapter>` is (dim, r) as for a
linear layer, and the delta is the transpose of `B @ A`. peft's differences from its Linear layer,
all kept here so checkpoints move both ways:
- files name the tensors `lora_embedding_A` / `lora_embedding_B` (no `.weight` suffix);
- default init is the reverse of Linear's: A zeros, B standard normal (also for "gaussian" and
  for the weight-based inits, which peft applies to linear layers only); False: both standard normal;
- the lookup of A uses the base's padding_idx / max_norm / norm_type / scale_grad_by_freq / sparse;
- no dropout is applied (peft builds the dropout module but never calls it);
- an `embed_scale` on the base (e.g. Gemma's scaled embeddings) multiplies the adapter output too.

DoRA on an embedding (peft's DoraEmbeddingLayer) is the DoRA variant's (lora_variants.py, maths in
dora.py); it uses `_lora_rows` and `_embed_scale` below.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoraLayer


class LoraEmbedding(LoraLayer, nn.Embedding):
    """`nn.Embedding` (or a subclass, via the registry) with LoRA adapters."""

    # the layout is fixed by the layer type; a config's fan_in_fan_out does not apply (as in peft)
    fan_in_fan_out = None
    supports_dora = True  # DoRA (lora_variants.py) has this layer type's maths
    weight_inits = False  # peft gives embeddings the default start for PiSSA / OLoRA

    def in_out_features(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def init_lora_weights(self, name: str, init: bool | str) -> None:
        A, B = self.lora_A[name].data, self.lora_B[name].data
        with torch.no_grad():
            if init is False:
                nn.init.normal_(A)
                nn.init.normal_(B)
            else:
                # peft: every other init LoraConfig accepts ("gaussian", and the weight-based PiSSA / OLoRA,
                # which it applies to the linear layers only) gives an embedding the default init
                nn.init.zeros_(A)
                nn.init.normal_(B)

    def peft_tensors(self, name: str) -> dict[str, nn.Parameter]:
        out = {"lora_embedding_A": self.lora_A[name], "lora_embedding_B": self.lora_B[name]}
        return self._with_variant_tensors(name, out)

    def lora_update(self, name: str) -> torch.Tensor:
        A, B = self.lora_A[name].detach().float(), self.lora_B[name].detach().float()
        return (B @ A).T * self.lora_scaling[name]

    def _embed_scale(self) -> torch.Tensor | None:
        scale = getattr(self, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=self.weight.device, dtype=self.weight.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        warnings.warn(
            f"{type(self).__name__}.embed_scale has shape {tuple(getattr(scale, 'shape', ()))}, not a scalar; "
            "the LoRA output is not scaled by it (as peft does)",
            stacklevel=3,
        )
        return None

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        # `x` holds token ids. Same order of operations as peft (also under autocast, where the
        # matmul runs in the autocast dtype): the sum is kept in the promoted dtype and cast at the end.
        out_dtype = out.dtype
        scale = self._embed_scale()
        for name in names:
            delta = self._lora_rows(x, name)
            if scale is not None:
                delta = delta * scale.to(delta.dtype)
            out = out + delta
        return out.to(out_dtype)

    def _lora_rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """`scaling * A.T[ids] @ B.T` of adapter `name` for token ids `x` (the base's lookup options)."""
        A, B = self.lora_A[name], self.lora_B[name]
        rows = F.embedding(
            x,
            A.T,
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
        )
        return (rows @ B.T) * self.lora_scaling[name]
