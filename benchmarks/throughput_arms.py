"""One arm of benchmarks/train_throughput.py, run in its own process: train, and record per
optimizer step its end time, the batches' shapes and real tokens, the loss, and the peak RSS.

- peer: peft + transformers.Trainer with DataCollatorForSeq2Seq, as LLaMA-Factory runs LoRA SFT.
- tuneforge*: tuneforge.workflows.train(cfg) on the same examples; the loop is observed by
  wrapping MicroBatchStream.get and TrainingRun.train_step/run (timing only, nothing changes).
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch

MB = 1 << 20


# ---- process memory ---------------------------------------------------------------------
def _status(key: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def vm_hwm() -> int:
    """Peak RSS since start or since the last reset_peak(), in bytes."""
    peak = _status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs); False where refused.
    ru_maxrss follows VmHWM down on Linux, so the whole-life peak is kept by the Recorder."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---- what a batch holds ------------------------------------------------------------------
def batch_counts(batch: dict) -> tuple[int, int, list[int]]:
    """(real tokens, positions fed to the model, lengths of the sequences in it).

    Padded batches mark padding with attention_mask == 0. A packed batch without a mask has
    no padding; its sequences start where position_ids restart at 0. A shared-prefix batch
    (tuneforge/data/shared_prefix.py) counts each prompt once per reply, as the padded pairs do,
    although the model runs it once: its sequences are numbered by score_row, and each ends one
    position after the last position that scores one of its tokens."""
    ids = batch["input_ids"]
    if "score_row" in batch:
        ends = batch["position_ids"][0, batch["score_from"]] + 2
        lengths = torch.zeros(int(batch["sequences"]), dtype=torch.long).scatter_reduce(
            0, batch["score_row"], ends, "amax").tolist()
        return sum(lengths), ids.numel(), lengths
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        lengths = [int(n) for n in mask.sum(dim=1)]
        return sum(lengths), ids.numel(), lengths
    pos = batch.get("position_ids")
    lengths = []
    if pos is not None:
        for row in pos.reshape(-1, pos.shape[-1]):
            starts = (row == 0).nonzero().flatten().tolist() or [0]
            if starts[0] != 0:
                starts.insert(0, 0)
            ends = starts[1:] + [row.numel()]
            lengths += [e - s for s, e in zip(starts, ends)]
    else:
        lengths = [ids.shape[-1]] * (ids.numel() // ids.shape[-1])
    return ids.numel(), ids.numel(), lengths


class Recorder:
    """Per optimizer step: [start s, end s, real tokens, positions, sequence lengths]."""

    def __init__(self, grad_accum: int):
        self.grad_accum = grad_accum
        self.micro: list[tuple[int, int, list[int]]] = []
        self.times: list[tuple[float, float]] = []
        self.cpu: list[float] = []  # the process's CPU seconds (all threads) at each step's end
        self.cpu_started = time.process_time()
        self.load_peak = 0
        self.peak_reset = False
        self.train_peak = 0
        self.started = 0.0
        self.started_at = 0.0  # time.time() at start(), for a whole-process timeline
        self.rss_start = 0

    def start(self) -> None:
        """Training begins: the model, adapter and data are loaded; reset the RSS peak."""
        self.load_peak = vm_hwm()
        self.rss_start = _status("VmRSS") or 0
        self.peak_reset = reset_peak()
        self.started, self.started_at = time.perf_counter(), time.time()
        self.cpu_started = time.process_time()

    def batch(self, batch: dict) -> None:
        self.micro.append(batch_counts(batch))

    def step(self, began: float, ended: float) -> None:
        self.times.append((began, ended))
        self.cpu.append(time.process_time() - self.cpu_started)
        self.train_peak = max(self.train_peak, vm_hwm())

    def result(self, losses: list[float]) -> dict:
        steps = []
        for i, (began, ended) in enumerate(self.times):
            micro = self.micro[i * self.grad_accum:(i + 1) * self.grad_accum]
            steps.append({"start": began - self.started, "end": ended - self.started, "cpu_end": self.cpu[i],
                          "real": sum(m[0] for m in micro), "positions": sum(m[1] for m in micro),
                          "lengths": [n for m in micro for n in m[2]],
                          "loss": losses[i] if i < len(losses) else None})
        return {"steps": steps, "peak_reset": self.peak_reset, "rss_start": self.rss_start,
                "started_at": self.started_at,
                "peak_train": self.train_peak if self.peak_reset else max(self.train_peak, self.load_peak),
                "peak_life": max(self.load_peak, self.train_peak)}


def spawn_arm(script: str, arm: str, options: list[str], threads: int) -> dict:
    """Run one arm (`script --arm ARM --result FILE OPTIONS`) in a fresh interpreter with
    OMP_NUM_THREADS=threads; its JSON result with arm and process_s (seconds, start-up
    included), or {"arm", "error"} with the last line it printed to stderr."""
    import json
    import os
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, script, "--arm", arm, "--result", str(result), *options]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        began = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"  {arm}: FAILED ({tail})", flush=True)
            return {"arm": arm, "error": f"exit {proc.returncode}: {tail}"}
        out = json.loads(result.read_text())
    out.update(arm=arm, process_s=time.perf_counter() - began)
    print(f"  {arm}: done in {out['process_s']:.0f} s", flush=True)
    return out


# ---- data shared by all arms ---------------------------------------------------------------
def data_values(opts) -> dict:
    return {"dataset": opts.dataset, "dataset_dir": opts.dataset_dir, "cutoff_len": opts.cutoff}


def ordered_examples(tokenizer, opts) -> list[dict]:
    """The examples in the order tuneforge's loop takes them: micro-batch j of the
    MicroBatchStream, for every micro-batch the run needs."""
    from tuneforge.config import load_config
    from tuneforge.data import load_datasets
    from tuneforge.train.batches import MicroBatchStream

    cfg = load_config(None, {**data_values(opts), "seed": opts.seed})
    splits = load_datasets(cfg.data, tokenizer, seed=opts.seed)  # sets the chat template too
    stream = MicroBatchStream(splits.train, opts.batch, lambda examples: examples, opts.seed)
    return [ex for j in range(opts.steps * opts.grad_accum) for ex in stream.get(j)]


# ---- peer: peft + transformers.Trainer -----------------------------------------------------
def peft_lora_all_linear(model, rank: int):
    """peft LoRA (alpha = 2 x rank, no dropout) on LLaMA-Factory's lora_target: all = every
    Linear's name except the output head."""
    from peft import LoraConfig, get_peft_model

    head = model.get_output_embeddings()
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and m is not head})
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def step_timer(rec: "Recorder"):
    """A transformers TrainerCallback that records each optimizer step's start and end in `rec`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            rec.step(self.began, time.perf_counter())

    return Timer()


def run_peer(opts) -> dict:
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tuneforge.config import ModelArguments
    from tuneforge.models import load_model_and_tokenizer

    torch.manual_seed(opts.seed)
    model, tokenizer = load_model_and_tokenizer(ModelArguments(), dtype=torch.float32)
    examples = ordered_examples(tokenizer, opts)
    model = peft_lora_all_linear(model, opts.rank)
    rec = Recorder(opts.grad_accum)
    padder = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=-100)

    def collate(features):
        batch = padder(features)
        rec.batch(batch)
        return batch

    class InOrder(Trainer):  # tuneforge's order instead of a shuffle
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    saved = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = getattr(opts, "output_dir", None) or tmp  # set: the adapter is saved there at the end
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=opts.batch,
            gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr,
            lr_scheduler_type="cosine", warmup_steps=0, max_steps=opts.steps, logging_steps=1,
            save_strategy="no", report_to="none", bf16=False, fp16=False, seed=opts.seed,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
        trainer = InOrder(model=model, args=targs, train_dataset=examples, data_collator=collate,
                          callbacks=[step_timer(rec)])
        rec.start()
        trainer.train()
        if out != tmp:
            saved["save_began"] = time.time()
            trainer.save_model(out)  # the adapter, as LLaMA-Factory saves it at the end
            tokenizer.save_pretrained(out)
            saved["save_ended"] = time.time()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {**rec.result(losses), **saved}


# ---- tuneforge: the public workflow -----------------------------------------------------------
def tuneforge_values(opts, arm_keys: dict, output_dir: str) -> dict:
    """The keys a user's YAML would have for this run."""
    return {
        "stage": "sft", "finetuning_type": "lora", "lora_rank": opts.rank, "lora_alpha": 2 * opts.rank,
        "lora_dropout": 0.0, "lora_target": "all", **data_values(opts),
        "per_device_train_batch_size": opts.batch, "gradient_accumulation_steps": opts.grad_accum,
        "learning_rate": opts.lr, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0,
        "max_steps": opts.steps, "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
        "bf16": False, "seed": opts.seed, "disable_tqdm": True, "output_dir": output_dir,
        "overwrite_output_dir": True, **arm_keys, **opts.overrides,
    }


def run_tuneforge(opts, arm_keys: dict) -> dict:
    from tuneforge.config import load_config
    from tuneforge.train import loop
    from tuneforge.train.batches import MicroBatchStream
    from tuneforge.train.reporting import read_log
    from tuneforge.workflows import train

    rec, in_step = Recorder(opts.grad_accum), False
    get, train_step, run = MicroBatchStream.get, loop.TrainingRun.train_step, loop.TrainingRun.run

    def observed_get(self, j):  # only the batches steps train on (not e.g. a probe's)
        batch = get(self, j)
        if in_step:
            rec.batch(batch)
        return batch

    def observed_step(self):
        nonlocal in_step
        began, in_step = time.perf_counter(), True
        try:
            return train_step(self)
        finally:
            in_step = False
            rec.step(began, time.perf_counter())

    def observed_run(self):
        rec.start()
        return run(self)

    MicroBatchStream.get, loop.TrainingRun.train_step = observed_get, observed_step
    loop.TrainingRun.run = observed_run
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, tuneforge_values(opts, arm_keys, out))
        train(cfg)
        logged = [e for e in read_log(out) if "loss" in e]  # the train log lines, one per step
    result = rec.result([e["loss"] for e in logged])
    result["log"] = logged  # with the stage's metrics (benchmarks/stages.py reads rewards/*)
    result["config"] = {k: v for k, v in {**arm_keys, **opts.overrides}.items()}
    return result
