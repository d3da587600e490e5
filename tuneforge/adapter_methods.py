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

`QUANTIZED_BASE`: the methods whose layers run over a quantized base (`quantization_bit`).
`TASK_ID_METHODS`: the methods that read each example's task (`multitask: true`).

It imports nothing.
"""

METHODS = {
    "lora": ("lora_method", "train low-rank adapters"),
    "lora_ensemble": ("lora_ensemble", "train several LoRAs of different ranks on the same layers jointly, "
                      "weights fixed or learned (saved as the one plain LoRA they sum to)"),
    "lora_dynamic": ("lora_dynamic", "train a Dynamic LoRA (DyLoRA): nested ranks grown min -> max on a schedule, "
                     "so the adapter runs at any rank up to max (saved as a plain LoRA at the rank chosen)"),
    "lora_multitask": ("lora_multitask", "train multi-task LoRA: one LoRA shared by all tasks plus a small LoRA per "
                       "task (each dataset of dataset: with multitask: true), saved also as a plain LoRA per task"),
    "ia3": ("ia3", "train (IA)^3 vectors that rescale layer outputs (or feedforward inputs)"),
    "loha": ("loha", "train low-rank Hadamard-product updates (LyCORIS LoHa, peft LoHaConfig)"),
    "lokr": ("lokr", "train Kronecker-product updates (LyCORIS LoKr, peft LoKrConfig)"),
    "ln_tuning": ("ln_tuning", "train a copy of the norm layers only (LN tuning)"),
    "vera": ("vera", "train two scaling vectors per layer around frozen random projections shared by all layers (VeRA)"),
    "bitfit": ("bitfit", "train only bias terms (BitFit), adding a zero bias where a layer has none"),
    "oft": ("oft", "train block-diagonal orthogonal rotations (Cayley) of each adapted layer's input (OFT)"),
    "boft": ("boft", "train butterfly-factorised orthogonal rotations of each adapted layer's input and a "
                     "scale per output (BOFT)"),
    "prompt": ("prompt_tuning", "train soft-prompt embeddings put before the input (prompt tuning)"),
    "prefix": ("prefix_tuning", "train key/value prefixes of every attention layer (prefix tuning)"),
    "ptuning_v2": ("prefix_tuning", "train key/value prefixes of every layer without reparametrisation"),
    "ptuning": ("p_tuning", "train a prompt encoder (MLP or LSTM) whose output is put before the input"),
    "bottleneck": ("bottleneck", "train bottleneck adapters (down-project, nonlinearity, up-project) after "
                   "or beside layers: adapter_type houlsby / pfeiffer / parallel"),
    "mam": ("mam", "train a MAM adapter: prefix tuning on attention plus a scaled parallel bottleneck adapter "
            "beside the feed-forward block (He et al. 2022)"),
    "unipelt": ("unipelt", "train UniPELT: LoRA, a prefix and a bottleneck adapter, each behind a learned gate "
                "(Mao et al. 2022)"),
    "adalora": ("adalora", "train AdaLoRA: LoRA in SVD form whose ranks are pruned to a budget while training "
                "(Zhang et al. 2023, peft AdaLoraConfig)"),
    "lora_moe": ("lora_moe", "train adaptive LoRA: per adapted layer, LoRA experts mixed per token by a learned "
                 "top-k router with a load-balancing loss (finetuning_type: lora with adaptive: moe; not mergeable)"),
}


# the finetuning types that train on a quantized base (quantization_bit): each adapts
# tuneforge.quant.QuantLinear layers (LoRA, IA3, LoHa, LoKr, VeRA, BitFit, OFT, BOFT, AdaLoRA, MoE LoRA) or adapts no quantized
# layer at all (LN tuning: the norms stay unquantized; prompt / prefix / P-tuning: virtual tokens that
# only read the base; bottleneck: its own small projections after or beside a block; mam: both;
# unipelt: gated LoRA over QuantLinear, a prefix and adapters after blocks).
# config_checks refuses quantization_bit for the others.
QUANTIZED_BASE = ("lora", "lora_ensemble", "lora_dynamic", "lora_multitask", "ia3", "loha", "lokr", "ln_tuning",
                  "vera", "bitfit", "oft", "boft", "prompt", "prefix", "ptuning_v2", "ptuning", "bottleneck", "mam",
                  "unipelt", "adalora", "lora_moe")

# the finetuning types that route each token by its task id (multitask: true, data/loader.py): config_checks
# refuses multitask with any other, and these without multitask
TASK_ID_METHODS = ("lora_multitask",)

# YAML keys that choose a method from another's finetuning_type: {key: {value: (the finetuning_type
# it refines, the finetuning_type it selects)}}. `finetuning_type: lora` with `adaptive: moe` is
# `finetuning_type: lora_moe` (config.py rewrites it before validation; the selected name is also
# accepted as is); the key with any other finetuning_type is refused.
METHOD_SELECTORS = {"adaptive": {"moe": ("lora", "lora_moe")}}


def key(default, help: str, methods: tuple[str, ...], *, type: str | None = None,
        choices: tuple | None = None, bounds: str | None = None, alias: str | None = None) -> dict:
    """One method key: its default, help text, the methods (finetuning_type names) that read it,
    its type as an annotation string ("int", "Optional[str]"; default: the default's type), and
    optionally its allowed values or numeric interval (config.py's `_f` conventions). `alias`: a
    key of another section that, in a config of one of `methods` that does not set this key, sets
    it instead (the MoE LoRA's experts per token are `top_k` in the issue's and papers' terms,
    a name the generate section also has)."""
    if type is None:
        if default is None:
            raise TypeError("a key whose default is None needs type='Optional[...]'")
        type = default.__class__.__name__
    return {"default": default, "help": help, "methods": tuple(methods), "type": type,
            "choices": choices, "bounds": bounds, "alias": alias}


METHOD_KEYS: dict[str, dict] = {
    "ensemble": key(None, "LoRA ensemble: the members, each a LoRA on the same layers, e.g. "
                    "[{r: 4}, {r: 16, lora_alpha: 32}]; a member sets r and lora_alpha (default: lora_alpha, "
                    "else 2 r). Empty: [{r: 4}, {r: 16}].", ("lora_ensemble",), type="Optional[list]"),
    "ensemble_weights": key(None, "LoRA ensemble: member weights w_i in W0 + sum w_i B_i A_i: empty (1 each: "
                            "the sum of the members), a list of numbers (fixed), or learn (one trained weight "
                            "per member and layer, starting at 1).", ("lora_ensemble",),
                            type="Optional[Union[list, str]]"),
    "dynamic_rank": key(None, "Dynamic LoRA (DyLoRA): {min: 2, max: 16, schedule: linear}; the rank grows "
                        "min -> max over the first `until` (default 1.0) of the run, schedule linear (equal steps "
                        "per rank), cosine or constant (max from the start: the paper's DyLoRA); each step trains "
                        "a rank drawn from [min, rank reached] (sample: true) or the rank reached (sample: false); "
                        "save: the rank the adapter is saved at (default max). Empty: {min: 1, max: 8}.",
                        ("lora_dynamic",), type="Optional[dict]"),
    "adaptive": key(None, "Adaptive LoRA: moe (with finetuning_type: lora) trains a mixture of LoRA experts per "
                    "layer, mixed per token by a router (the same as finetuning_type: lora_moe). AdaLoRA's "
                    "budgeted ranks are finetuning_type: adalora.", ("lora_moe",), type="Optional[str]",
                    choices=("moe",)),
    "num_experts": key(4, "Adaptive (MoE) LoRA: LoRA experts per adapted layer, each of rank lora_rank.",
                       ("lora_moe",), bounds="[1, inf)"),
    "moe_top_k": key(2, "Adaptive (MoE) LoRA: experts each token uses; their router weights are renormalised "
                     "to sum to one. At most num_experts. In a lora_moe config that does not set moe_top_k, "
                     "top_k means this (and sampling keeps its default top_k).",
                     ("lora_moe",), bounds="[1, inf)", alias="top_k"),
    "router_aux_loss_coef": key(0.01, "Adaptive (MoE) LoRA: weight of the router's load-balancing loss "
                                "(num_experts x sum_e f_e P_e, Switch Transformer / Mixtral, averaged over "
                                "the adapted layers) in the training loss; 0: off.", ("lora_moe",),
                                bounds="[0, inf)"),
    "multitask_rank": key(4, "Multi-task LoRA: rank of each task's own part (the shared part has lora_rank).",
                          ("lora_multitask",), bounds="(0, inf)"),
    "multitask_alpha": key(None, "Multi-task LoRA: lora_alpha of each task's part (scaling multitask_alpha / "
                           "multitask_rank); empty: the shared part's scaling, lora_alpha / lora_rank (so "
                           "2 x multitask_rank when lora_alpha is empty too).", ("lora_multitask",),
                           type="Optional[float]", bounds="(0, inf)"),
    # per-layer LoRA ranks (adapters/lora_ranks.py), written as peft's rank_pattern / alpha_pattern
    "lora_rank_pattern": key(None, "Distributed LoRA: a rank per layer or module, {entry: rank}; an entry is a layer "
                             "index (5), an inclusive range ('0-7') or a regex matched against the end of the "
                             "module name ('.*mlp.*'); the first entry that applies wins. Other modules: "
                             "lora_rank. Empty lora_alpha: alpha = 2 x each module's rank.", ("lora",),
                             type="Optional[dict]"),
    "lora_rank_schedule": key(None, "Distributed LoRA by depth: 'linear 4->16' or 'cosine 4->16' (first layer's "
                              "rank -> last layer's), rounded to the nearest integer; lora_rank_pattern and "
                              "lora_rank_levels entries win over it.", ("lora",), type="Optional[str]"),
    "lora_rank_levels": key(None, "Hierarchical LoRA: ranks by level, e.g. {embed: 4, attn: 8, mlp: 16, head: 4}; "
                            "attn: modules in an attention block of a layer, mlp: the layer's other modules, "
                            "embed / head: the input embeddings / output head (added to the adapted modules). "
                            "attn / mlp also take a depth ramp ('linear 8->16') or {layer range: rank}.",
                            ("lora",), type="Optional[dict]"),
    "rank_dropout": key(0.0, "loha / lokr: while training, zero each output row of the weight update "
                        "with this probability (peft's rank_dropout).", ("loha", "lokr"), bounds="[0, 1)"),
    "module_dropout": key(0.0, "loha / lokr: while training, skip the whole adapter of a layer for a "
                          "step with this probability (peft's module_dropout); oft: the fraction of each "
                          "layer's blocks that act as identity while training.", ("loha", "lokr", "oft"),
                          bounds="[0, 1)"),
    "rank_dropout_scale": key(False, "lokr: rescale the rows rank_dropout keeps by 1 / (fraction kept) "
                              "(loha always does).", ("lokr",)),
    "decompose_both": key(False, "lokr: also write the small Kronecker factor as a rank-lora_rank "
                          "product.", ("lokr",)),
    "decompose_factor": key(-1, "lokr: split each weight dimension as (factor, dim / factor); -1: "
                            "factors as near square as possible.", ("lokr",), bounds="[-1, inf)"),
    "vera_rank": key(256, "VeRA: rank r of the shared random projections (peft's default 256; VeRA trains "
                     "r + out values per layer, so ranks far above LoRA's are cheap).", ("vera",), bounds="(0, inf)"),
    "vera_d_initial": key(0.1, "VeRA: start value of the lambda_d vectors (lambda_b starts at 0).", ("vera",)),
    "vera_dropout": key(0.0, "VeRA: dropout on the adapter's input while training.", ("vera",), bounds="[0, 1)"),
    "vera_projection_prng_key": key(0, "VeRA: seed of the shared random projections.", ("vera",)),
    "bitfit_target": key("all", "BitFit: whose biases train: 'all' (every linear layer but the output head, and "
                         "every LayerNorm), 'attention', 'mlp', or a comma list of module names such as "
                         "q_proj,v_proj. Layers without a bias get a zero one.", ("bitfit",)),
    "oft_rank": key(0, "OFT: blocks per adapted layer (in_features = oft_rank x oft_block_size); 0: set by "
                    "oft_block_size. Set exactly one of the two non-zero (oft_rank alone: oft_block_size is "
                    "taken as 0).", ("oft",), bounds="[0, inf)"),
    "oft_block_size": key(32, "OFT: size of each orthogonal block; 0: set by oft_rank. A size that does not "
                          "divide a layer's width moves to the nearest divisor (as peft).", ("oft",),
                          bounds="[0, inf)"),
    "oft_target": key(None, "OFT: modules that get OFT: 'all' (every linear layer but the output head) or a "
                      "comma list of module names; empty: lora_target.", ("oft",), type="Optional[str]"),
    "boft_block_size": key(4, "BOFT: size of each orthogonal block; 0: set by boft_block_num. Set exactly one of "
                           "the two non-zero (boft_block_num alone: boft_block_size is taken as 0).", ("boft",),
                           bounds="[0, inf)"),
    "boft_block_num": key(0, "BOFT: blocks per butterfly factor (in_features = boft_block_num x boft_block_size); "
                          "0: set by boft_block_size.", ("boft",), bounds="[0, inf)"),
    "boft_n_butterfly_factor": key(1, "BOFT: butterfly factors of each rotation (1: one block-diagonal rotation).",
                                   ("boft",), bounds="[1, inf)"),
    "num_virtual_tokens": key(20, "Virtual tokens the adapter puts before every input (prompt) or in front "
                          "of every attention layer (prefix).", ("prompt", "prefix", "ptuning_v2", "ptuning", "mam",
                          "unipelt"), type="int", bounds="(0, inf)"),
    "prompt_tuning_init": key("random", "How the prompt starts: random, sample_vocab (embeddings of random "
                          "tokens) or text (the embeddings of prompt_tuning_init_text).", ("prompt",),
                          choices=("random", "sample_vocab", "text")),
    "prompt_tuning_init_text": key(None, "The text whose token embeddings start the prompt "
                                   "(prompt_tuning_init: text), repeated or cut to num_virtual_tokens.",
                                   ("prompt",), type="Optional[str]"),
    "prefix_projection": key(True, "Train the prefix through an MLP (folded into the prefix when saved); "
                             "finetuning_type: ptuning_v2 is prefix tuning without it.", ("prefix", "mam", "unipelt")),
    "prefix_init": key("zero", "How the prefix starts: zero (zero keys and values) or random (peft's default, "
                       "N(0, 1): far from the base model at the start).", ("prefix", "ptuning_v2", "mam", "unipelt"),
                       choices=("zero", "random")),
    "encoder_hidden_size": key(None, "Hidden size of the prefix MLP / the P-tuning prompt encoder; empty: "
                               "the model's (key/value) width.", ("prefix", "ptuning", "mam", "unipelt"),
                               type="Optional[int]",
                               bounds="(0, inf)"),
    "encoder_reparameterization_type": key("MLP", "P-tuning's prompt encoder: MLP or LSTM.", ("ptuning",),
                                           choices=("MLP", "LSTM")),
    "init_r": key(12, "AdaLoRA: rank each adapted matrix starts with.", ("adalora",), bounds="(0, inf)"),
    "target_r": key(8, "AdaLoRA: average rank the budget falls to (total rank target_r x adapted matrices).",
                    ("adalora",), bounds="(0, inf)"),
    "tinit": key(0, "AdaLoRA: warm-up steps before ranks are pruned.", ("adalora",), bounds="[0, inf)"),
    "tfinal": key(0, "AdaLoRA: last steps that train with the rank pattern fixed.", ("adalora",), bounds="[0, inf)"),
    "deltaT": key(1, "AdaLoRA: steps between two budget allocations.", ("adalora",), bounds="(0, inf)"),
    "beta1": key(0.85, "AdaLoRA: EMA coefficient of the sensitivity |w * grad|.", ("adalora",), bounds="(0, 1)"),
    "beta2": key(0.85, "AdaLoRA: EMA coefficient of the uncertainty.", ("adalora",), bounds="(0, 1)"),
    "orth_reg_weight": key(0.5, "AdaLoRA: weight of the orthogonality regulariser added to the loss.",
                           ("adalora",), bounds="[0, inf)"),
    "total_step": key(None, "AdaLoRA: steps of the budget schedule; empty: the run's optimizer steps.",
                      ("adalora",), type="Optional[int]", bounds="(0, inf)"),
    "adapter_type": key(
        "houlsby", "Where bottleneck adapters go: houlsby (after the attention output projection and "
        "after the feed-forward block), pfeiffer (after the feed-forward block only), parallel (beside "
        "the feed-forward block, on its input, scaled by adapter_scaling). lora_target other than 'all' "
        "names the modules instead.", ("bottleneck",), choices=("houlsby", "pfeiffer", "parallel")),
    "adapter_size": key(64, "Bottleneck width: the adapter projects the hidden size down to this.",
                        ("bottleneck", "mam", "unipelt"), bounds="(0, inf)"),
    "adapter_act": key("relu", "Nonlinearity between the adapter's projections.", ("bottleneck", "mam", "unipelt"),
                       choices=("relu", "gelu", "silu", "tanh")),
    "adapter_scaling": key(None, "Factor on the adapter's output; empty: the method's own (bottleneck 1, as "
                           "Houlsby and Pfeiffer; mam 4, He et al.'s parallel adapter; unipelt 1).",
                           ("bottleneck", "mam", "unipelt"), type="Optional[float]", bounds="(0, inf)"),
}
