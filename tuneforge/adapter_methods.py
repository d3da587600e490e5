"""The adapter methods tuneforge ships, one line each: finetuning_type -> (the module of
tuneforge.adapters whose last statement registers the method, one line of help).

This list is the whole registration: tuneforge.adapters imports each module (which calls
`register_method`), and the YAML config's `finetuning_type` accepts these names without importing
torch. It imports nothing.
"""

METHODS = {
    "lora": ("lora_method", "train low-rank adapters"),
    "ia3": ("ia3", "train (IA)^3 vectors that rescale layer outputs (or feedforward inputs)"),
}
