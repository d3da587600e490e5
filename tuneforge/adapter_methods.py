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
    "bottleneck": ("bottleneck", "train bottleneck adapters (down-project, nonlinearity, up-project) after "
                   "or beside layers: adapter_type houlsby / pfeiffer / parallel"),
}


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
    "adapter_type": key(
        "houlsby", "Where bottleneck adapters go: houlsby (after the attention output projection and "
        "after the feed-forward block), pfeiffer (after the feed-forward block only), parallel (beside "
        "the feed-forward block, on its input, scaled by adapter_scaling). lora_target other than 'all' "
        "names the modules instead.", ("bottleneck",), choices=("houlsby", "pfeiffer", "parallel")),
    "adapter_size": key(64, "Bottleneck width: the adapter projects the hidden size down to this.",
                        ("bottleneck",), bounds="(0, inf)"),
    "adapter_act": key("relu", "Nonlinearity between the adapter's projections.", ("bottleneck",),
                       choices=("relu", "gelu", "silu", "tanh")),
    "adapter_scaling": key(1.0, "Factor on the adapter's output (He et al. use 4 for parallel adapters; "
                           "houlsby and pfeiffer use 1).", ("bottleneck",), bounds="(0, inf)"),
}
