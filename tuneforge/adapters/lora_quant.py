"""LoRA (and DoRA) on a quantized base layer (`tuneforge.quant.QuantLinear`): QLoRA.

The adapters train in fp32 exactly as on an nn.Linear; the base stays frozen in its codes.
Merging is refused, since the sum would have to be requantized and the adapter's update would
mostly round away; `tuneforge.dequantize_model` (or `tuneforge export`, which does it) turns the
base into a plain Linear first. Inits that rewrite the weight (PiSSA/OLoRA) are refused too:
LoftQ (`tuneforge.adapters.loftq`) is the init that fits a quantized base.
"""

from __future__ import annotations

from tuneforge.quant.linear import QuantLinear

from .lora import LoraLayer


class LoraQuantLinear(LoraLayer, QuantLinear):
    inplace_add = True  # the base output is a fresh tensor autograd does not keep
    supports_dora = True  # DoRA (lora_variants.py) has this layer type's maths
    quantized_base = True  # inits that rewrite the weight (PiSSA / OLoRA) are refused (lora_variants.py)

    def in_out_features(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def cannot_merge(self) -> str | None:
        return self.merge_refusal()
