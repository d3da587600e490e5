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
    "prompt": ("prompt_tuning", "train soft-prompt embeddings put before the input (prompt tuning)"),
    "prefix": ("prefix_tuning", "train key/value prefixes of every attention layer (prefix tuning)"),
    "ptuning_v2": ("prefix_tuning", "train key/value prefixes of every layer without reparametrisation"),
    "ptuning": ("p_tuning", "train a prompt encoder (MLP or LSTM) whose output is put before the input"),
}

# finetuning types that train over a frozen quantized base (quantization_bit): the adapter's
# parameters are its own and the base's quantized weights are only read
QUANTIZED_BASE = ("lora", "prompt", "prefix", "ptuning_v2", "ptuning")


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
    "num_virtual_tokens": key(20, "Virtual tokens the adapter puts before every input (prompt) or in front "
                          "of every attention layer (prefix).", ("prompt", "prefix", "ptuning_v2", "ptuning"),
                          type="int", bounds="(0, inf)"),
    "prompt_tuning_init": key("random", "How the prompt starts: random, sample_vocab (embeddings of random "
                          "tokens) or text (the embeddings of prompt_tuning_init_text).", ("prompt",),
                          choices=("random", "sample_vocab", "text")),
    "prompt_tuning_init_text": key(None, "The text whose token embeddings start the prompt "
                                   "(prompt_tuning_init: text), repeated or cut to num_virtual_tokens.",
                                   ("prompt",), type="Optional[str]"),
    "prefix_projection": key(True, "Train the prefix through an MLP (folded into the prefix when saved); "
                             "finetuning_type: ptuning_v2 is prefix tuning without it.", ("prefix",)),
    "prefix_init": key("zero", "How the prefix starts: zero (zero keys and values) or random (peft's default, "
                       "N(0, 1): far from the base model at the start).", ("prefix", "ptuning_v2"),
                       choices=("zero", "random")),
    "encoder_hidden_size": key(None, "Hidden size of the prefix MLP / the P-tuning prompt encoder; empty: "
                               "the model's (key/value) width.", ("prefix", "ptuning"), type="Optional[int]",
                               bounds="(0, inf)"),
    "encoder_reparameterization_type": key("MLP", "P-tuning's prompt encoder: MLP or LSTM.", ("ptuning",),
                                           choices=("MLP", "LSTM")),
}
