"""Every text the web UI shows, in English and Chinese: one table, key -> {"en": ..., "zh": ...}.

A key names a label (`<name>`), its help line (`<name>.info`) or a message (`msg.<name>`, with
`{...}` fields filled by `text(key, lang, **fields)`). Config keys generated from the registry
(a method's or a stage's own options) show their YAML name, the same in both languages, and the
registry's help text (config.py, adapter_methods.py, train/stages), in Chinese from
key_help_zh.py (options.key_help).
"""

from __future__ import annotations

LANGS = ("en", "zh")

TEXTS: dict[str, dict[str, str]] = {
    "title": {"en": "tuneforge: fine-tune LLMs", "zh": "tuneforge：大模型微调"},
    "lang": {"en": "Language", "zh": "语言"},
    "tab.train": {"en": "Train", "zh": "训练"},
    "tab.chat": {"en": "Chat", "zh": "对话"},
    "tab.eval": {"en": "Evaluate & Predict", "zh": "评估与预测"},
    "tab.export": {"en": "Export", "zh": "导出"},
    "tab.runs": {"en": "Runs", "zh": "训练记录"},
    # model and method
    "model": {"en": "Model path", "zh": "模型路径"},
    "model.info": {"en": "Empty: the default model SmolLM2-135M-Instruct; else a local Hugging Face folder, a .gguf "
                         "file or a hub id (org/name)",
                   "zh": "留空：默认模型 SmolLM2-135M-Instruct；或本地 Hugging Face 模型文件夹、.gguf 文件、"
                         "Hub 名称（org/name）"},
    "stage": {"en": "Stage", "zh": "训练阶段"},
    "stage.info": {"en": "What the model learns from the data (sft: supervised fine-tuning, dpo/kto: preferences, "
                         "pt: pre-training, ...)",
                   "zh": "模型从数据中学习的方式（sft：监督微调，dpo/kto：偏好学习，pt：预训练，……）"},
    "method": {"en": "Fine-tuning method", "zh": "微调方法"},
    "method.info": {"en": "finetuning_type: which weights train (lora: low-rank adapters; freeze: the last layers; "
                          "full: all weights; ...)",
                    "zh": "finetuning_type：训练哪些权重（lora：低秩适配器；freeze：最后几层；full：全部权重；……）"},
    "method_opts": {"en": "Options of this method", "zh": "该方法的参数"},
    "stage_opts": {"en": "Options of this stage", "zh": "该阶段的参数"},
    "no_opts": {"en": "This choice has no options of its own.", "zh": "该选项没有专属参数。"},
    # data
    "dataset_dir": {"en": "Data folder", "zh": "数据路径"},
    "dataset_dir.info": {"en": "Folder with dataset_info.json. Empty: ./data if it has one, else the demo data "
                               "shipped with tuneforge",
                         "zh": "包含 dataset_info.json 的文件夹。留空：若 ./data 中有则用它，否则用 tuneforge 自带的示例数据"},
    "dataset": {"en": "Dataset", "zh": "数据集"},
    "dataset.info": {"en": "One or more datasets of dataset_info.json; several are mixed",
                     "zh": "dataset_info.json 中的一个或多个数据集；多个数据集会混合"},
    "preview_data": {"en": "Preview dataset", "zh": "预览数据集"},
    "data_preview": {"en": "First records", "zh": "前几条数据"},
    # hyperparameters
    "hyper": {"en": "Hyperparameters", "zh": "超参数"},
    "num_train_epochs": {"en": "Epochs", "zh": "训练轮数"},
    "num_train_epochs.info": {"en": "Passes over the training data (ignored when max steps > 0)",
                              "zh": "遍历训练数据的次数（最大步数 > 0 时忽略）"},
    "max_steps": {"en": "Max steps", "zh": "最大步数"},
    "max_steps.info": {"en": "Total optimizer steps; -1: from the epochs", "zh": "优化器总步数；-1：由训练轮数决定"},
    "cutoff_len": {"en": "Cutoff length", "zh": "截断长度"},
    "cutoff_len.info": {"en": "Maximum tokens per example; longer ones are truncated",
                        "zh": "每条样本的最大 token 数；更长的会被截断"},
    "per_device_train_batch_size": {"en": "Batch size", "zh": "批处理大小"},
    "per_device_train_batch_size.info": {"en": "Examples per micro-batch per device", "zh": "每个设备每个微批次的样本数"},
    "gradient_accumulation_steps": {"en": "Gradient accumulation", "zh": "梯度累积"},
    "gradient_accumulation_steps.info": {"en": "Micro-batches per optimizer step", "zh": "每个优化器步的微批次数"},
    "learning_rate": {"en": "Learning rate", "zh": "学习率"},
    "learning_rate.info": {"en": "Peak learning rate of the optimizer", "zh": "优化器的最大学习率"},
    "lora_rank": {"en": "LoRA rank", "zh": "LoRA 秩"},
    "lora_rank.info": {"en": "Rank r of the adapters", "zh": "适配器的秩 r"},
    "lora_alpha": {"en": "LoRA alpha", "zh": "LoRA 缩放系数"},
    "lora_alpha.info": {"en": "scaling = alpha / r; follows 2 x rank until you change it",
                        "zh": "缩放 = alpha / r；未修改时跟随 2 × 秩"},
    "logging_steps": {"en": "Logging steps", "zh": "日志间隔"},
    "logging_steps.info": {"en": "Log loss and learning rate every this many steps", "zh": "每隔多少步记录损失和学习率"},
    "save_steps": {"en": "Save steps", "zh": "保存间隔"},
    "save_steps.info": {"en": "Write a checkpoint every this many steps", "zh": "每隔多少步保存检查点"},
    "val_size": {"en": "Validation size", "zh": "验证集比例"},
    "val_size.info": {"en": "0: none; below 1: fraction; 1 or more: number of examples",
                      "zh": "0：不划分；小于 1：比例；1 及以上：样本数"},
    "devices": {"en": "Device count", "zh": "设备数量"},
    "devices.info": {"en": "N > 1: FORCE_TORCHRUN=1 NPROC_PER_NODE=N, one process per device (torchrun); "
                           "1: the plain command",
                     "zh": "N > 1：FORCE_TORCHRUN=1 NPROC_PER_NODE=N，每个设备一个进程（torchrun）；1：普通命令"},
    # output
    "output_dir": {"en": "Output dir", "zh": "输出目录"},
    "output_dir.info": {"en": "Where the adapter, checkpoints and logs are written", "zh": "适配器、检查点和日志的保存位置"},
    "resume": {"en": "Checkpoint to resume from", "zh": "断点续训的检查点"},
    "resume.info": {"en": "Empty: start (or continue the newest checkpoint in the output dir); a checkpoint folder: "
                          "resume from it",
                    "zh": "留空：新训练（或从输出目录中最新的检查点继续）；检查点文件夹：从该检查点继续"},
    "args_path": {"en": "Arguments file", "zh": "参数文件"},
    "args_path.info": {"en": "YAML file that Save writes and Load reads", "zh": "保存参数写入、读取参数读取的 YAML 文件"},
    # buttons
    "btn.preview": {"en": "Preview command", "zh": "预览命令"},
    "btn.save": {"en": "Save arguments", "zh": "保存参数"},
    "btn.load": {"en": "Load arguments", "zh": "读取参数"},
    "btn.start": {"en": "Start", "zh": "开始"},
    "btn.stop": {"en": "Stop", "zh": "中断"},
    # outputs
    "command": {"en": "Command", "zh": "命令"},
    "yaml": {"en": "YAML", "zh": "YAML 配置"},
    "status": {"en": "Status", "zh": "状态"},
    "progress": {"en": "Progress", "zh": "进度"},
    "loss_plot": {"en": "Loss", "zh": "损失"},
    "log": {"en": "Log", "zh": "日志"},
    "series.original": {"en": "original", "zh": "原始"},
    "series.smoothed": {"en": "smoothed", "zh": "平滑"},
    # messages
    "msg.progress": {"en": "step {step}/{total} · loss {loss} · lr {lr} · {tps} tokens/s · ETA {eta}",
                     "zh": "步数 {step}/{total} · 损失 {loss} · 学习率 {lr} · {tps} tokens/秒 · 剩余 {eta}"},
    "msg.waiting": {"en": "starting: loading the model and the data ...", "zh": "启动中：正在加载模型和数据……"},
    "msg.started": {"en": "training started: {command}", "zh": "训练已开始：{command}"},
    "msg.running": {"en": "a training run is going on; stop it first", "zh": "已有训练在进行，请先中断它"},
    "msg.stopping": {"en": "stopping: the current step finishes and a checkpoint is saved",
                     "zh": "正在中断：当前步完成后保存检查点"},
    "msg.stopped": {"en": "stopped; a checkpoint is saved: Start again with the same arguments resumes it",
                    "zh": "已中断并保存检查点：用相同参数再次开始即可继续训练"},
    "msg.finished": {"en": "training finished: {output_dir}", "zh": "训练完成：{output_dir}"},
    "msg.failed": {"en": "training failed (exit code {code}); see the log", "zh": "训练失败（退出码 {code}），请查看日志"},
    "msg.no_run": {"en": "no training run is going on", "zh": "当前没有训练"},
    "msg.saved": {"en": "arguments saved to {path}", "zh": "参数已保存到 {path}"},
    "msg.loaded": {"en": "arguments loaded from {path}", "zh": "已从 {path} 读取参数"},
    "msg.need_path": {"en": "give the arguments file's path first", "zh": "请先填写参数文件路径"},
    "msg.path_outside": {"en": "'{path}' is outside the folders the page may read and write ({roots}): give a path "
                                "inside one of them",
                         "zh": "“{path}” 不在页面可读写的文件夹内（{roots}）：请填写其中某个文件夹内的路径"},
    "msg.config_ok": {"en": "the config is valid", "zh": "配置有效"},
    "msg.records": {"en": "{count} records in {name}", "zh": "{name} 共 {count} 条数据"},
    "msg.no_dataset": {"en": "choose a dataset first", "zh": "请先选择数据集"},
    "msg.not_loaded": {"en": "keys not shown in the page, kept from {path}: {keys}",
                       "zh": "页面中没有的参数，已按 {path} 保留：{keys}"},
    # chat, evaluate, export, runs
    "adapter": {"en": "Adapters", "zh": "适配器"},
    "adapter.info": {"en": "Adapter folders (peft format) loaded on the model; the runs under saves/ are listed",
                     "zh": "加载到模型上的适配器文件夹（peft 格式）；列出 saves/ 下的训练结果"},
    "system": {"en": "System prompt", "zh": "系统提示词"},
    "do_sample": {"en": "Sample", "zh": "采样"},
    "do_sample.info": {"en": "Off: greedy decoding", "zh": "关闭：贪心解码"},
    "temperature": {"en": "Temperature", "zh": "温度"},
    "top_p": {"en": "Top-p", "zh": "Top-p 采样"},
    "max_new_tokens": {"en": "Max new tokens", "zh": "最大生成长度"},
    "chatbot": {"en": "Conversation", "zh": "对话"},
    "message": {"en": "Message", "zh": "消息"},
    "btn.load_model": {"en": "Load model", "zh": "加载模型"},
    "btn.unload_model": {"en": "Unload model", "zh": "卸载模型"},
    "btn.send": {"en": "Send", "zh": "发送"},
    "btn.clear": {"en": "Clear", "zh": "清空对话"},
    "btn.eval": {"en": "Start evaluation", "zh": "开始评估"},
    "btn.export": {"en": "Export", "zh": "开始导出"},
    "btn.refresh": {"en": "Refresh", "zh": "刷新"},
    "btn.compare": {"en": "Compare", "zh": "对比"},
    "eval_dataset": {"en": "Eval datasets", "zh": "评估数据集"},
    "max_samples": {"en": "Max samples", "zh": "最大样本数"},
    "max_samples.info": {"en": "Evaluate only the first N examples; empty: all", "zh": "只评估前 N 条；留空：全部"},
    "do_predict": {"en": "Generate and score (ROUGE/BLEU)", "zh": "生成并评分（ROUGE/BLEU）"},
    "do_predict.info": {"en": "Off: eval loss and perplexity only", "zh": "关闭：仅计算评估损失和困惑度"},
    "eval_output_dir": {"en": "Results folder", "zh": "结果目录"},
    "eval_output_dir.info": {"en": "Where predict_results.json and generated_predictions.jsonl are written",
                             "zh": "predict_results.json 和 generated_predictions.jsonl 的保存位置"},
    "results": {"en": "Results", "zh": "结果"},
    "benchmark": {"en": "Multiple-choice benchmark", "zh": "选择题基准"},
    "benchmark.info": {"en": "Instead: accuracy per subject on these .json/.jsonl/.csv files or folders (comma list; "
                             "MMLU / C-Eval style)",
                       "zh": "改为：在这些 .json/.jsonl/.csv 文件或文件夹（逗号分隔；MMLU / C-Eval 格式）上按科目计算准确率"},
    "n_shot": {"en": "Shots", "zh": "示例数（n-shot）"},
    "n_shot.info": {"en": "Solved examples before each question", "zh": "每题前给出的已解答示例数"},
    "predictions": {"en": "Predictions", "zh": "预测结果"},
    "export_dir": {"en": "Export dir", "zh": "导出目录"},
    "export_dir.info": {"en": "A new or empty folder (or one an earlier export wrote)", "zh": "新的或空的文件夹（或之前导出写入的文件夹）"},
    "export_format": {"en": "Format", "zh": "导出格式"},
    "export_format.info": {"en": "hf: merged Hugging Face folder; gguf: one .gguf file with an Ollama Modelfile; "
                                 "adapter: the adapters unmerged",
                           "zh": "hf：合并后的 Hugging Face 文件夹；gguf：单个 .gguf 文件及 Ollama Modelfile；adapter：不合并的适配器"},
    "export_dtype": {"en": "Dtype", "zh": "数据类型"},
    "export_size": {"en": "Max shard size (GB)", "zh": "最大分块大小（GB）"},
    "export_quantization": {"en": "GGUF weight type", "zh": "GGUF 权重类型"},
    "written": {"en": "Written files", "zh": "已写入的文件"},
    "runs_root": {"en": "Output root", "zh": "输出根目录"},
    "runs_root.info": {"en": "Folder whose runs (folders with trainer_log.jsonl) are listed",
                       "zh": "列出该文件夹下的训练记录（含 trainer_log.jsonl 的文件夹）"},
    "runs_table": {"en": "Runs", "zh": "训练记录"},
    "run_a": {"en": "Run", "zh": "训练记录"},
    "run_b": {"en": "Compared with", "zh": "对比记录"},
    "msg.model_loaded": {"en": "model loaded: {model}", "zh": "模型已加载：{model}"},
    "msg.model_unloaded": {"en": "model unloaded", "zh": "模型已卸载"},
    "msg.no_model": {"en": "load a model first", "zh": "请先加载模型"},
    "msg.loading": {"en": "loading ...", "zh": "加载中……"},
    "msg.evaluating": {"en": "evaluating ...", "zh": "评估中……"},
    "msg.eval_done": {"en": "evaluation finished", "zh": "评估完成"},
    "msg.exporting": {"en": "exporting ...", "zh": "导出中……"},
    "msg.exported": {"en": "exported to {path}", "zh": "已导出到 {path}"},
    "msg.runs": {"en": "{count} runs under {root}", "zh": "{root} 下共 {count} 条训练记录"},
}


def text(key: str, lang: str = "en", **fields) -> str:
    """The text of `key` in `lang` ("en" or "zh"), with `{field}`s filled in. Raises KeyError for
    a key that is not in TEXTS (a missing translation is a bug, caught by the tests)."""
    value = TEXTS[key][lang if lang in LANGS else "en"]
    return value.format(**fields) if fields else value


def has(key: str) -> bool:
    return key in TEXTS
