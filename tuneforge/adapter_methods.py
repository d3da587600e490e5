"""The adapter methods tuneforge ships, and the YAML keys they read.

`METHODS`, one line per method: finetuning_type -> (the module of tuneforge.adapters whose last
statement registers the method, one line of help). This list is the whole registration:
tuneforge.adapters imports each module (which calls `register_method`), and the YAML config's
`finetuning_type` accepts these names without importing torch.

`METHOD_KEYS`: the YAML keys a method adds (LLaMA-Factory's or peft's names), each declared once
with `key(...)`, naming the methods that read it. config.py makes them keys of the finetune
section (so `tuneforge keys`, validation and the web UI see them with their help), and a key set
in a config whose finetuning_type does not read it is refused. Keys every method shares
(lora_target, additional_target) stay in config.py.

It imports nothing.
"""

METHODS = {
    "lora": ("lora_method", "train low-rank adapters"),
    "ia3": ("ia3", "train (IA)^3 vectors that rescale layer outputs (or feedforward inputs)"),
    "oft": ("oft", "train block-diagonal orthogonal rotations (Cayley) of each adapted layer's input (OFT)"),
    "boft": ("boft", "train butterfly-factorised orthogonal rotations of each adapted layer's input and a "
                     "scale per output (BOFT)"),
}

# the methods whose layers take a quantized base (tuneforge.quant.QuantLinear in their layer table):
# quantization_bit may train them (config_checks.py); the others are refused at config load
QUANTIZED_BASE = ("lora", "oft", "boft")


def key(default, help: str, methods: tuple[str, ...], *, type: str | None = None,
        choices: tuple | None = None, bounds: str | None = None) -> dict:
    """One method key: its default, help text, the methods (finetuning_type names) that read it,
    its type as an annotation string ("int", "Optional[str]"; default: the default's type), and
    optionally its allowed values or numeric interval (config.py's `_f` conventions)."""
    if type is None:
        if default is None:
            raise TypeError("a key whose default is None needs type='Optional[...]'")
        type = default.__class__.__name__
    return {"default": default, "help": help, "methods": tuple(methods), "type": type,
            "choices": choices, "bounds": bounds}


METHOD_KEYS: dict[str, dict] = {
    "oft_rank": key(0, "OFT: blocks per adapted layer (in_features = oft_rank x oft_block_size); 0: set by "
                    "oft_block_size. Set exactly one of the two non-zero (oft_rank alone: oft_block_size is "
                    "taken as 0).", ("oft",), bounds="[0, inf)"),
    "oft_block_size": key(32, "OFT: size of each orthogonal block; 0: set by oft_rank. A size that does not "
                          "divide a layer's width moves to the nearest divisor (as peft).", ("oft",),
                          bounds="[0, inf)"),
    "module_dropout": key(0.0, "OFT: fraction of each layer's blocks that act as identity while training.",
                          ("oft",), bounds="[0, 1)"),
    "oft_target": key(None, "OFT: modules that get OFT: 'all' (every linear layer but the output head) or a "
                      "comma list of module names; empty: lora_target.", ("oft",), type="Optional[str]"),
    "boft_block_size": key(4, "BOFT: size of each orthogonal block; 0: set by boft_block_num. Set exactly one of "
                           "the two non-zero (boft_block_num alone: boft_block_size is taken as 0).", ("boft",),
                           bounds="[0, inf)"),
    "boft_block_num": key(0, "BOFT: blocks per butterfly factor (in_features = boft_block_num x boft_block_size); "
                          "0: set by boft_block_size.", ("boft",), bounds="[0, inf)"),
    "boft_n_butterfly_factor": key(1, "BOFT: butterfly factors of each rotation (1: one block-diagonal rotation).",
                                   ("boft",), bounds="[1, inf)"),
}
