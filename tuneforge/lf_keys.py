"""LLaMA-Factory's config keys that tuneforge does not have, one row per key, each naming the
LLaMA-Factory feature it belongs to. config.build_config reads it for every key it does not
know: a key set to its `accepted` value (LLaMA-Factory's default, which changes nothing in
tuneforge) is accepted and ignored; any other value is refused in one line that names the key, the
feature and what to do, instead of "unknown key" and a spelling guess at an unrelated key.

The keys are those of LLaMA-Factory's hparams/*.py (model, data, finetuning, generating,
evaluation, training, Megatron Bridge), the transformers TrainingArguments LLaMA-Factory's YAML
passes through, and LLaMA-Factory v1's config format. A row whose key tuneforge comes to
implement is removed (tests/test_lf_keys.py fails while a row names a key tuneforge knows).
README.md's "LLaMA-Factory features not supported" list is checked against this table.
"""

from __future__ import annotations

import difflib

REFUSED = object()  # `accepted` of a row whose key no value makes harmless

# feature -> (what the key belongs to, what to do); {value} in either is the value the config gives
FEATURES = {
    "galore": ("LLaMA-Factory's GaLore optimizer", "remove it"),
    "gc_options": ("LLaMA-Factory's gradient-checkpointing options",
                   "remove it (gradient_checkpointing: true or false)"),
    "special_tokens": ("LLaMA-Factory's added tokens and vocabulary resizing", "remove it"),
    "multimodal": ("LLaMA-Factory's multimodal (image, video, audio) training",
                   "remove it (tuneforge trains on text only)"),
    "mod": ("LLaMA-Factory's Mixture-of-Depths conversion", "remove it"),
    "ppo": ("LLaMA-Factory's PPO reward-model options (an adapter list or quantization for the reward model)",
            "remove it (reward_model: a stage: rm output folder, loaded as it is)"),
    "ref_model": ("LLaMA-Factory's separate reference model",
                  "remove it (tuneforge's reference is the model with its adapters disabled)"),
    "bco": ("LLaMA-Factory's BCO term of DPO", "remove it"),
    "cdpo": ("LLaMA-Factory's conservative DPO (label smoothing)", "remove it"),
    "lddpo": ("LLaMA-Factory's LD-DPO length weighting", "remove it"),
    "swanlab": ("LLaMA-Factory's SwanLab settings", "remove it (report_to: swanlab logs with SwanLab's defaults)"),
    "megatron": ("LLaMA-Factory's Megatron training backend", "remove it"),
    "hyper_parallel": ("LLaMA-Factory's HyperParallel (FSDP / tensor parallel) backend", "remove it"),
    "ray": ("LLaMA-Factory's Ray distributed training", "remove it"),
    "fp8": ("LLaMA-Factory's FP8 mixed-precision training", "remove it (bf16: true for mixed precision)"),
    "profiler": ("LLaMA-Factory's torch profiler", "remove it"),
    "fsdp": ("transformers' deprecated FSDP key", "use fsdp_config: {transformer_layer_cls_to_wrap: [<layer class>]}"),
    "ddp": ("transformers' DistributedDataParallel settings", "remove it"),
    "vllm": ("LLaMA-Factory's vLLM inference engine", "remove it (infer_backend: huggingface)"),
    "sglang": ("LLaMA-Factory's SGLang inference engine", "remove it (infer_backend: huggingface)"),
    "ktransformers": ("LLaMA-Factory's KTransformers MoE backend", "remove it"),
    "unsloth": ("Unsloth's optimised training", "remove it"),
    "liger": ("Liger kernels", "remove it"),
    "v1_kernels": ("LLaMA-Factory's v1 kernels", "remove it"),
    "rope_scaling": ("LLaMA-Factory's RoPE scaling", "remove it (the model's own config.json rope settings are used)"),
    "shift_attn": ("LongLoRA's shift short attention", "remove it"),
    "moe_aux_loss": ("LLaMA-Factory's MoE router auxiliary loss", "remove it"),
    "upcast": ("LLaMA-Factory's fp32 upcasting of layer norms and lm_head outputs", "remove it"),
    "from_scratch": ("LLaMA-Factory's training from randomly initialised weights", "remove it"),
    "offload": ("weight offloading to disk", "remove it"),
    "kv_cache": ("LLaMA-Factory's switch for the KV cache in generation", "remove it (the KV cache is always used)"),
    "other_hubs": ("ModelScope / Modelers hub tokens", "remove it"),
    "param_status": ("LLaMA-Factory's parameter status printout", "remove it"),
    "quant_method": ("LLaMA-Factory's on-the-fly quantization with {value}",
                     "remove it (quantization_bit quantizes with bitsandbytes-style nf4 / fp4 / int8, "
                     "LLaMA-Factory's quantization_method: bnb)"),
    "quant_device_map": ("LLaMA-Factory's quantized-inference device map", "remove it"),
    "gptq_export": ("LLaMA-Factory's GPTQ export (export_quantization_bit with a calibration dataset, through "
                    "gptqmodel)", "remove it (tuneforge does not depend on gptqmodel; export_quantization_bit alone "
                    "writes a bitsandbytes model that from_pretrained loads, and export_format: gguf with "
                    "export_quantization: q4_0 or q8_0 one for llama.cpp / Ollama)"),
    "hub_push": ("pushing to the Hugging Face Hub", "remove it (upload the folder with `hf upload`)"),
    "adapter_folder": ("LLaMA-Factory's adapter_folder", "use adapter_name_or_path"),
    "slow_tokenizer": ("LLaMA-Factory's slow-tokenizer switch", "remove it (the fast tokenizer is used)"),
    "low_cpu_mem": ("transformers' low_cpu_mem_usage loading", "remove it"),
    "split_special": ("LLaMA-Factory's splitting of special tokens", "remove it"),
    "derived": ("a key LLaMA-Factory derives itself ('do not specify it')", "remove it"),
    "freeze_extra": ("LLaMA-Factory's extra trainable modules of freeze tuning", "remove it"),
    "eval_options": ("LLaMA-Factory's evaluation option", "remove it"),
    "data_option": ("LLaMA-Factory's data-processing option", "remove it"),
    "throughput": ("LLaMA-Factory's effective tokens-per-second count", "remove it"),
    "loss_options": ("LLaMA-Factory's loss option", "remove it"),
    "shuffling": ("LLaMA-Factory's disable_shuffling", "remove it (the training data is always shuffled)"),
    "early_stopping": ("LLaMA-Factory's early stopping", "remove it"),
    "tool_format": ("LLaMA-Factory's tool_format (a tool-call format other than the template's)",
                    "remove it (the template's own tool format is used)"),
    "preserve_thinking": ("LLaMA-Factory's thoughts kept in earlier turns", "remove it"),
    "download_mode": ("LLaMA-Factory's benchmark download mode", "remove it (nothing is downloaded)"),
    "beam_search": ("beam search in generation", "remove it (generation samples or decodes greedily)"),
    "gen_max_length": ("LLaMA-Factory's generation max_length, which max_new_tokens overrides",
                       "use max_new_tokens (cutoff_len for training examples)"),
    "special_text": ("LLaMA-Factory's skip_special_tokens: false (special tokens shown in replies)", "remove it"),
    "trainer_option": ("a transformers Trainer option tuneforge's training loop does not have", "remove it"),
    "precision_eval": ("transformers' full half-precision evaluation", "remove it (infer_dtype sets chat's dtype)"),
    "compile": ("torch.compile", "remove it"),
    "neftune": ("NEFTune noise embeddings", "remove it"),
    "label_smoothing": ("label smoothing", "remove it"),
    "best_model": ("transformers' best-checkpoint selection", "remove it (eval loss is logged at every eval)"),
    "sampling": ("transformers' length-grouped or sequential sampling", "remove it"),
    "trackers": ("transformers' Trackio settings", "remove it (report_to lists tuneforge's trackers)"),
    "device": ("transformers' device switch", "remove it (CUDA_VISIBLE_DEVICES= trains on the CPU)"),
    "v1": ("LLaMA-Factory v1's config format", "write it with LLaMA-Factory's v0 keys (model_name_or_path, "
           "dataset, per_device_train_batch_size, finetuning_type, ...)"),
}

# key -> (feature, accepted value or REFUSED[, what to do instead of the feature's advice])
LF_KEYS = {
    # model_args.py
    "adapter_folder": ("adapter_folder", None),
    "use_fast_tokenizer": ("slow_tokenizer", True),
    "split_special_tokens": ("split_special", False),
    "new_special_tokens_config": ("special_tokens", None),
    "init_special_tokens": ("special_tokens", "noise_init"),
    "low_cpu_mem_usage": ("low_cpu_mem", True),
    "rope_scaling": ("rope_scaling", None),
    "shift_attn": ("shift_attn", False),
    "mixture_of_depths": ("mod", None),
    "use_unsloth": ("unsloth", False),
    "use_unsloth_gc": ("unsloth", False),
    "enable_liger_kernel": ("liger", False),
    "moe_aux_loss_coef": ("moe_aux_loss", None),
    "upcast_layernorm": ("upcast", False),
    "upcast_lmhead_output": ("upcast", False),
    "train_from_scratch": ("from_scratch", False),
    "offload_folder": ("offload", "offload"),
    "use_kv_cache": ("kv_cache", True),
    "use_v1_kernels": ("v1_kernels", False),
    "ms_hub_token": ("other_hubs", None),
    "om_hub_token": ("other_hubs", None),
    "print_param_status": ("param_status", False),
    "quantization_method": ("quant_method", "bnb"),
    "quantization_device_map": ("quant_device_map", None),
    "image_max_pixels": ("multimodal", REFUSED),
    "image_min_pixels": ("multimodal", REFUSED),
    "image_do_pan_and_scan": ("multimodal", False),
    "crop_to_patches": ("multimodal", False),
    "video_max_pixels": ("multimodal", REFUSED),
    "video_min_pixels": ("multimodal", REFUSED),
    "video_fps": ("multimodal", REFUSED),
    "video_maxlen": ("multimodal", REFUSED),
    "use_audio_in_video": ("multimodal", False),
    "audio_sampling_rate": ("multimodal", REFUSED),
    "export_quantization_dataset": ("gptq_export", None),
    "export_quantization_nsamples": ("gptq_export", 128),
    "export_quantization_maxlen": ("gptq_export", 1024),
    "export_hub_model_id": ("hub_push", None),
    "vllm_maxlen": ("vllm", REFUSED),
    "vllm_gpu_util": ("vllm", REFUSED),
    "vllm_enforce_eager": ("vllm", REFUSED),
    "vllm_max_lora_rank": ("vllm", REFUSED),
    "vllm_config": ("vllm", REFUSED),
    "sglang_maxlen": ("sglang", REFUSED),
    "sglang_mem_fraction": ("sglang", REFUSED),
    "sglang_tp_size": ("sglang", REFUSED),
    "sglang_config": ("sglang", REFUSED),
    "sglang_lora_backend": ("sglang", REFUSED),
    "use_kt": ("ktransformers", False),
    "kt_cpu_activation": ("ktransformers", REFUSED),
    "kt_weight_path": ("ktransformers", REFUSED),
    "kt_non_expert_weight_path": ("ktransformers", REFUSED),
    "kt_expert_checkpoint_path": ("ktransformers", REFUSED),
    "kt_use_lora_experts": ("ktransformers", REFUSED),
    "kt_lora_expert_num": ("ktransformers", REFUSED),
    "kt_lora_expert_intermediate_size": ("ktransformers", REFUSED),
    "kt_config": ("ktransformers", REFUSED),
    "device_map": ("derived", None),
    "model_max_length": ("derived", None),
    "block_diag_attn": ("derived", False),
    # data_args.py
    "media_dir": ("multimodal", None),
    "preprocessing_batch_size": ("data_option", 1000),
    "eval_num_beams": ("beam_search", None),
    "ignore_pad_token_for_loss": ("loss_options", True),
    "eval_on_each_dataset": ("eval_options", False),
    "tool_format": ("tool_format", None),
    "preserve_thinking": ("preserve_thinking", False),
    "data_shared_file_system": ("data_option", False),
    # evaluation_args.py
    "download_mode": ("download_mode", "reuse_dataset_if_exists"),
    # finetuning_args.py
    "freeze_extra_modules": ("freeze_extra", None),
    "pref_bco_weight": ("bco", 0.0),
    "dpo_label_smoothing": ("cdpo", 0.0),
    "ld_alpha": ("lddpo", None),
    "reward_model_adapters": ("ppo", None),
    "reward_model_quantization_bit": ("ppo", None),
    "ref_model": ("ref_model", None),
    "ref_model_adapters": ("ref_model", None),
    "ref_model_quantization_bit": ("ref_model", None),
    "use_swanlab": ("swanlab", False, "use report_to: swanlab"),
    "swanlab_project": ("swanlab", REFUSED),
    "swanlab_workspace": ("swanlab", REFUSED),
    "swanlab_run_name": ("swanlab", None, "use run_name"),
    "swanlab_mode": ("swanlab", REFUSED),
    "swanlab_api_key": ("swanlab", REFUSED),
    "swanlab_logdir": ("swanlab", REFUSED),
    "swanlab_lark_webhook_url": ("swanlab", REFUSED),
    "swanlab_lark_secret": ("swanlab", REFUSED),
    "use_mca": ("megatron", False),
    "use_megatron_bridge": ("megatron", False),
    "megatron_bridge_args": ("megatron", None),
    "use_hyper_parallel": ("hyper_parallel", False),
    "hyper_parallel_args": ("hyper_parallel", None),
    "hyper_parallel_cp_size": ("hyper_parallel", 1),
    "freeze_vision_tower": ("multimodal", True),
    "freeze_multi_modal_projector": ("multimodal", True),
    "freeze_language_model": ("multimodal", False),
    "compute_accuracy": ("eval_options", False),
    "disable_shuffling": ("shuffling", False),
    "early_stopping_steps": ("early_stopping", None),
    "include_effective_tokens_per_second": ("throughput", False),
    # generating_args.py
    "num_beams": ("beam_search", 1),
    "max_length": ("gen_max_length", 1024),
    "length_penalty": ("beam_search", 1.0),
    "skip_special_tokens": ("special_text", True),
    # megatron_bridge_args.py
    "tensor_model_parallel_size": ("megatron", REFUSED),
    "pipeline_model_parallel_size": ("megatron", REFUSED),
    "expert_model_parallel_size": ("megatron", REFUSED),
    "context_parallel_size": ("megatron", REFUSED),
    "virtual_pipeline_model_parallel_size": ("megatron", REFUSED),
    "sequence_parallel": ("megatron", REFUSED),
    "recompute_granularity": ("megatron", REFUSED),
    "recompute_method": ("megatron", REFUSED),
    "recompute_num_layers": ("megatron", REFUSED),
    "account_for_embedding_in_pipeline_split": ("megatron", REFUSED),
    "account_for_loss_in_pipeline_split": ("megatron", REFUSED),
    "bias_activation_fusion": ("megatron", REFUSED),
    "apply_rope_fusion": ("megatron", REFUSED),
    "masked_softmax_fusion": ("megatron", REFUSED),
    "cross_entropy_loss_fusion": ("megatron", REFUSED),
    "moe_grouped_gemm": ("megatron", REFUSED),
    "moe_token_dispatcher_type": ("megatron", REFUSED),
    "calculate_per_token_loss": ("megatron", REFUSED),
    "use_distributed_optimizer": ("megatron", REFUSED),
    "overlap_param_gather": ("megatron", REFUSED),
    "overlap_grad_reduce": ("megatron", REFUSED),
    "use_packed_sequences": ("megatron", REFUSED),
    "mixed_precision": ("megatron", REFUSED),
    "megatron_pretrained_checkpoint": ("megatron", REFUSED),
    "export_hf_on_finish": ("megatron", REFUSED),
    "extra_config": ("megatron", REFUSED),
    # training_args.py
    "ray_num_workers": ("ray", 1),
    "ray_init_kwargs": ("ray", None),
    "master_addr": ("ray", None),
    "master_port": ("ray", None),
    "enable_torch_profiler": ("profiler", False),
    "profiler_output_dir": ("profiler", REFUSED),
    "profiler_wait_steps": ("profiler", REFUSED),
    "profiler_warmup_steps": ("profiler", REFUSED),
    "profiler_active_steps": ("profiler", REFUSED),
    "profiler_repeat": ("profiler", REFUSED),
    "profiler_record_shapes": ("profiler", REFUSED),
    "profiler_profile_memory": ("profiler", REFUSED),
    "profiler_with_stack": ("profiler", REFUSED),
    "profile_modules": ("profiler", REFUSED),
    "fp8": ("fp8", False),
    "fp8_backend": ("fp8", REFUSED),
    "fp8_enable_fsdp_float8_all_gather": ("fp8", REFUSED),
    # transformers' Seq2SeqTrainingArguments, which LLaMA-Factory's training arguments extend
    "fsdp_transformer_layer_cls_to_wrap": ("fsdp", None),
    "ddp_bucket_cap_mb": ("ddp", None),
    "ddp_broadcast_buffers": ("ddp", None),
    "ddp_static_graph": ("ddp", None),
    "ddp_backend": ("ddp", None),
    "local_rank": ("ddp", -1),
    "activation_checkpointing": ("gc_options", None),
    "activation_checkpointing_kwargs": ("gc_options", None),
    "optim_target_modules": ("galore", None),
    "lr_scheduler_kwargs": ("trainer_option", None),
    "average_tokens_across_devices": ("trainer_option", REFUSED),
    "label_smoothing_factor": ("label_smoothing", 0.0),
    "bf16_full_eval": ("precision_eval", False),
    "fp16_full_eval": ("precision_eval", False),
    "tf32": ("trainer_option", None),
    "torch_compile": ("compile", False),
    "torch_compile_backend": ("compile", None),
    "torch_compile_mode": ("compile", None),
    "use_liger_kernel": ("liger", False),
    "liger_kernel_config": ("liger", None),
    "use_cache": ("trainer_option", False),
    "neftune_noise_alpha": ("neftune", None),
    "torch_empty_cache_steps": ("trainer_option", None),
    "auto_find_batch_size": ("trainer_option", False),
    "logging_strategy": ("trainer_option", "steps"),
    "logging_first_step": ("trainer_option", REFUSED),
    "log_on_each_node": ("trainer_option", True),
    "logging_nan_inf_filter": ("trainer_option", REFUSED),
    "include_num_input_tokens_seen": ("trainer_option", "no"),
    "include_tokens_per_second": ("trainer_option", False),
    "log_level": ("trainer_option", "passive"),
    "log_level_replica": ("trainer_option", "warning"),
    "project": ("trackers", "huggingface"),
    "trackio_space_id": ("trackers", None),
    "trackio_bucket_id": ("trackers", None),
    "trackio_static_space_id": ("trackers", None),
    "eval_delay": ("trainer_option", 0),
    "prediction_loss_only": ("trainer_option", REFUSED),
    "eval_do_concat_batches": ("trainer_option", True),
    "eval_use_gather_object": ("trainer_option", False),
    "eval_accumulation_steps": ("trainer_option", None),
    "include_for_metrics": ("trainer_option", REFUSED),
    "batch_eval_metrics": ("trainer_option", False),
    "save_on_each_node": ("trainer_option", False),
    "save_safetensors": ("trainer_option", True),
    "enable_jit_checkpoint": ("trainer_option", False),
    "push_to_hub": ("hub_push", False),
    "hub_token": ("hub_push", None),
    "hub_private_repo": ("hub_push", None),
    "hub_model_id": ("hub_push", None),
    "hub_strategy": ("hub_push", "every_save"),
    "hub_always_push": ("hub_push", False),
    "hub_revision": ("hub_push", None),
    "load_best_model_at_end": ("best_model", False),
    "metric_for_best_model": ("best_model", None),
    "greater_is_better": ("best_model", None),
    "ignore_data_skip": ("trainer_option", REFUSED),
    "restore_callback_states_from_checkpoint": ("trainer_option", False),
    "full_determinism": ("trainer_option", False),
    "data_seed": ("trainer_option", None),
    "use_cpu": ("device", False),
    "accelerator_config": ("trainer_option", None),
    "parallelism_config": ("trainer_option", None),
    "dataloader_drop_last": ("trainer_option", REFUSED),
    "dataloader_pin_memory": ("trainer_option", REFUSED),
    "dataloader_persistent_workers": ("trainer_option", False),
    "dataloader_prefetch_factor": ("trainer_option", None),
    "dataloader_multiprocessing_context": ("trainer_option", None),
    "dataloader_in_order": ("trainer_option", True),
    "remove_unused_columns": ("trainer_option", True),
    "label_names": ("trainer_option", None),
    "train_sampling_strategy": ("sampling", "random"),
    "group_by_length": ("sampling", False),
    "length_column_name": ("sampling", "length"),
    "debug": ("trainer_option", ""),
    "skip_memory_metrics": ("trainer_option", True),
    "do_eval": ("eval_options", REFUSED, "remove it (tuneforge evaluates when val_size or eval_dataset is set)"),
    "sortish_sampler": ("sampling", False),
    "generation_max_length": ("trainer_option", None),
    "generation_num_beams": ("beam_search", None),
    "generation_config": ("trainer_option", None),
    # LLaMA-Factory v1 (USE_V1=1)
    "train_dataset": ("v1", REFUSED, "use dataset"),
    "custom_chat_template": ("v1", REFUSED),
    "model_class": ("v1", REFUSED),
    "init_config": ("v1", REFUSED),
    "peft_config": ("v1", REFUSED),
    "kernel_config": ("v1", REFUSED),
    "quant_config": ("v1", REFUSED),
    "sample_backend": ("v1", REFUSED),
    "micro_batch_size": ("v1", REFUSED, "use per_device_train_batch_size"),
    "global_batch_size": ("v1", REFUSED),
    "batching_strategy": ("v1", REFUSED),
    "batching_workers": ("v1", REFUSED),
    "enable_activation_checkpointing": ("v1", REFUSED, "use gradient_checkpointing"),
    "dist_config": ("v1", REFUSED),
    "dp_size": ("v1", REFUSED),
    "cp_size": ("v1", REFUSED),
    "cp_mode": ("v1", REFUSED),
    "mp_replicate_size": ("v1", REFUSED),
    "mp_shard_size": ("v1", REFUSED),
    "dist_timeout": ("v1", REFUSED, "use ddp_timeout"),
    "optim_config": ("v1", REFUSED),
    "lr_scheduler_config": ("v1", REFUSED),
    "save_epochs": ("v1", REFUSED),
    "save_ckpt_as_hf": ("v1", REFUSED),
}


def _same(value, accepted) -> bool:
    """`value` is the row's accepted value: equal, and a bool only where a bool is accepted."""
    if accepted is REFUSED or isinstance(value, bool) != isinstance(accepted, bool):
        return False
    if isinstance(value, str) and isinstance(accepted, str):
        return value.strip().lower() == accepted.lower()
    return value == accepted and type(value) in (type(accepted), int, float)


def accepted(key: str, value) -> bool:
    """A LLaMA-Factory key set to the value that changes nothing in tuneforge (its default there)."""
    row = LF_KEYS.get(key)
    return row is not None and _same(value, row[1])


def refusal(key: str, value) -> str | None:
    """The one line for a LLaMA-Factory key tuneforge does not have (None: not such a key)."""
    row = LF_KEYS.get(key)
    if row is None:
        return None
    what, todo = FEATURES[row[0]]
    todo = row[2] if len(row) > 2 else todo
    shown = value if not isinstance(value, (dict, list)) else type(value).__name__
    return (f"config key '{key}': {what}, not supported by tuneforge; {todo}").replace("{value}", str(shown))


def features() -> dict[str, list[str]]:
    """Feature text -> its keys, in table order (for README's list)."""
    out: dict[str, list[str]] = {}
    for key, row in LF_KEYS.items():
        out.setdefault(FEATURES[row[0]][0], []).append(key)
    return out


# Names users type for a key, from other tools or habit, that no spelling distance finds.
KEY_ALIASES = {
    "lr": "learning_rate", "epochs": "num_train_epochs", "num_epochs": "num_train_epochs",
    "rank": "lora_rank", "r": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
    "target_modules": "lora_target", "modules_to_save": "additional_target",
    "model": "model_name_or_path", "model_path": "model_name_or_path",
    "adapter": "adapter_name_or_path", "max_seq_length": "cutoff_len", "evaluation_strategy": "eval_strategy",
    "train_batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps", "output": "output_dir",
    "data": "dataset", "data_dir": "dataset_dir", "warmup": "warmup_ratio",
}


def unknown_key(key: str, value, known, given) -> str:
    """The line for a key that is no field: LLaMA-Factory's key with its feature (lf_keys), else
    a likely meant key (an alias, or a close spelling the config does not set already)."""
    line = refusal(key, value)
    if line:
        return line
    if KEY_ALIASES.get(key) in known:
        return f"unknown config key '{key}'; did you mean '{KEY_ALIASES[key]}'?"
    close = difflib.get_close_matches(key, [k for k in known if k not in given], n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'{hint}"
