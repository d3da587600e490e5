"""LoRA for `nn.Conv2d`, with peft's maths: `y = conv(x) + scaling * B(A(dropout(x)))`.

A is a convolution in_channels -> r with the base's kernel size, stride and padding (no bias),
B a 1x1 convolution r -> out_channels with the base's groups (no bias). In memory they are the
parameters `<module>.lora_A.<adapter>` (r, in_channels, kh, kw) and `lora_B.<adapter>`
(out_channels, r // groups, 1, 1); files name them `lora_A.weight` / `lora_B.weight` like peft.
Init as peft: A kaiming-uniform(a=sqrt(5)), B zeros (the generic `init_lora` works on 4-d tensors).

What peft 0.21 does not really support is refused when the adapter is added:
- dilation > 1 on a kernel larger than 1: peft builds A without the dilation, so A's output
  does not line up with the base output;
- padding_mode other than 'zeros': peft pads A with zeros, so merging would change the outputs;
- r not divisible by groups (peft refuses too). With groups > 1 the adapter trains and runs, but
  cannot be merged (peft raises as well).

DoRA on a Conv2d (peft's DoraConv2dLayer) is the DoRA variant's (lora_variants.py, maths in
dora.py); it uses `_lora_conv` and `_base_conv` below. DoRA on a grouped conv is refused.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError

from .lora import LoraLayer


class LoraConv2d(LoraLayer, nn.Conv2d):
    """`nn.Conv2d` (or a subclass, via the registry) with LoRA adapters."""

    # the layout is fixed by the layer type; a config's fan_in_fan_out does not apply (as in peft)
    fan_in_fan_out = None
    supports_dora = True  # DoRA (lora_variants.py) has this layer type's maths

    @classmethod
    def check_target(cls, module: nn.Module, path: str, r: int) -> None:
        dilated = any(d != 1 and k > 1 for d, k in zip(module.dilation, module.kernel_size))
        if dilated:
            raise ConfigError(
                f"{path} is a Conv2d with dilation={module.dilation}, which LoRA does not support "
                "(peft neither); leave it out of target_modules"
            )
        if module.padding_mode != "zeros":
            raise ConfigError(
                f"{path} is a Conv2d with padding_mode={module.padding_mode!r}; LoRA supports only "
                "padding_mode='zeros' (as peft computes it); leave it out of target_modules"
            )
        if r % module.groups != 0:
            raise ConfigError(
                f"{path} is a Conv2d with groups={module.groups}; LoRA needs a rank divisible by it, got r={r} "
                "(set rank_pattern for it or leave it out of target_modules)"
            )
        if module.groups > 1:
            warnings.warn(
                f"{path} is a Conv2d with groups={module.groups}: its LoRA adapter trains and runs, but cannot "
                "be merged (as in peft)",
                stacklevel=4,
            )

    def in_out_features(self) -> tuple[int, int]:
        return self.in_channels, self.out_channels

    def new_lora_tensors(self, r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        kh, kw = self.kernel_size
        A = torch.empty(r, self.in_channels, kh, kw, dtype=torch.float32, device=device)
        B = torch.empty(self.out_channels, r // self.groups, 1, 1, dtype=torch.float32, device=device)
        return A, B

    def cannot_merge(self) -> str | None:
        if self.groups > 1:
            return f"a Conv2d with groups={self.groups} cannot have its LoRA adapter merged (peft neither)"
        return None

    def lora_update(self, name: str) -> torch.Tensor:
        why = self.cannot_merge()
        if why:
            raise ConfigError(why)
        A, B = self.lora_A[name].detach().float(), self.lora_B[name].detach().float()
        if tuple(self.weight.shape[2:4]) == (1, 1):
            delta = (B[:, :, 0, 0] @ A[:, :, 0, 0])[:, :, None, None]
        else:
            # a 1x1 conv after a conv is one conv whose kernel mixes A's kernels by B
            delta = F.conv2d(A.transpose(0, 1), B).transpose(0, 1)
        return delta * self.lora_scaling[name]

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        # same order of operations as peft (also under autocast): input cast to the adapter dtype,
        # sum kept in the promoted dtype, cast back to the base output dtype at the end
        out_dtype = out.dtype
        for name in names:
            _, lora = self._lora_conv(x, name)
            out = out + lora * self.lora_scaling[name]
        return out.to(out_dtype)

    def _lora_conv(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the adapter's input after dropout, B(A(it))) for adapter `name`."""
        A, B = self.lora_A[name], self.lora_B[name]
        h = x if x.dtype == A.dtype else x.to(A.dtype)
        p = self.lora_dropout[name]
        if p > 0.0 and self.training:
            h = F.dropout(h, p=p, training=True)
        return h, F.conv2d(F.conv2d(h, A, None, self.stride, self.padding), B, None, 1, 0, 1, self.groups)

    def _base_conv(self, h: torch.Tensor, base_w: torch.Tensor | None) -> torch.Tensor:
        """conv(h, W) without bias, in the weight's dtype (as the base computes it), returned in h's dtype."""
        w = self.weight if base_w is None else base_w
        hw = h if h.dtype == w.dtype or torch.is_autocast_enabled(h.device.type) else h.to(w.dtype)
        y = F.conv2d(hw, w, None, self.stride, self.padding, self.dilation, self.groups)
        return y if y.dtype == h.dtype else y.to(h.dtype)
