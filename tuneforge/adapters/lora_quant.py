"""LoRA (and DoRA) on a quantized base layer (`tuneforge.quant.QuantLinear`): QLoRA.

The adapters train in fp32 exactly as on an nn.Linear; the base stays frozen in its codes.
Merging is refused, since the sum would have to be requantized and the adapter's update would
mostly round away; `tuneforge.dequantize_model` (or `tuneforge export`, which does it) turns the
base into a plain Linear first. Inits that rewrite the weight (PiSSA/OLoRA) are refused too:
LoftQ (`tuneforge.adapters.loftq`) is the init that fits a quantized base.
"""

from __future__ import annotations

from tuneforge.errors import ConfigError
from tuneforge.quant.linear import QuantLinear

from . import inits
from .lora import LoraLayer


class LoraQuantLinear(LoraLayer, QuantLinear):
    inplace_add = True  # the base output is a fresh tensor autograd does not keep
    supports_dora = True

    def in_out_features(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def add_lora(self, name, r, alpha, dropout, use_rslora, init, use_dora=False) -> None:
        if inits.is_weight_init(init):
            raise ConfigError(
                f"init_lora_weights={init!r} rewrites the base weight, which is quantized here; "
                "use loftq_iter (LoftQ) for a quantized base, or drop quantization_bit"
            )
        super().add_lora(name, r, alpha, dropout, use_rslora, init, use_dora)

    def cannot_merge(self) -> str | None:
        kind = f"{self.bits}-bit {self.quant_type if self.bits == 4 else 'int8'}"
        return (
            f"its base weight is quantized ({kind}); merging would requantize and lose the update. "
            "Call tuneforge.dequantize_model(model) first, or use `tuneforge export`, which does"
        )
