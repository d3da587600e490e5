"""Batched generation over an eval set, teacher-forced eval loss, and the result files.

An encoded eval example ({"input_ids", "labels"}, last assistant reply labelled) is split into
the prompt (everything before the reply: the chat template with its generation prompt) and the
reference answer (the labelled tokens). Prompts are generated in batches with LEFT padding, so
every row's new tokens start at the same column.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import IGNORE_INDEX, PaddingCollator
from ..infer.generation import generation_kwargs, pad_id
from .metrics import similarity_scores


@dataclass
class PredictItem:
    prompt_ids: list[int]
    answer_ids: list[int]


def split_example(example: dict) -> PredictItem:
    """Prompt = tokens before the first labelled one; answer = the labelled tokens."""
    labels = example["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    answer = [t for t, label in zip(example["input_ids"][start:], labels[start:])
              if label != IGNORE_INDEX]
    return PredictItem(list(example["input_ids"][:start]), answer)


def left_pad(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, length - len(row):] = torch.as_tensor(row, dtype=torch.long)
            attention_mask[i, length - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, gen_kwargs: dict,
             progress: bool = True) -> list[str]:
    """Decoded new text for each prompt, generated `batch_size` prompts at a time."""
    outputs = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        batch = left_pad(prompts[start:start + batch_size], pad_id(tokenizer))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model.generate(**batch, **gen_kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return [text.strip() for text in outputs]


@torch.inference_mode()
def eval_loss(model, examples: list[dict], batch_size: int, pad: int,
              progress: bool = True) -> float:
    """Mean cross-entropy per labelled token over all examples (teacher forcing)."""
    collate = PaddingCollator(pad)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="eval loss", unit="batch",
                      disable=not progress):
        batch = {k: v.to(model.device) for k, v in collate(examples[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        total += loss.item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1)


def run_predict(model, tokenizer, examples: list[dict], gen, batch_size: int,
                output_dir: str | Path | None, do_predict: bool = True,
                progress: bool = True) -> dict:
    """Eval loss and perplexity; with do_predict also generated answers and their scores.

    Writes <output_dir>/generated_predictions.jsonl (prompt, predict, label per line) and
    <output_dir>/predict_results.json when output_dir is given; returns the results.
    """
    model.eval()
    started = time.perf_counter()
    loss = eval_loss(model, examples, batch_size, pad_id(tokenizer), progress)
    results = {"eval_loss": round(loss, 4), "perplexity": round(_safe_exp(loss), 4)}
    rows = []
    if do_predict:
        items = [split_example(e) for e in examples]
        predicts = generate(model, tokenizer, [it.prompt_ids for it in items], batch_size,
                            generation_kwargs(gen, tokenizer), progress)
        labels = [tokenizer.decode(it.answer_ids, skip_special_tokens=True).strip() for it in items]
        prompts = [tokenizer.decode(it.prompt_ids, skip_special_tokens=False) for it in items]
        rows = [{"prompt": p, "predict": y, "label": l} for p, y, l in zip(prompts, predicts, labels)]
        # LLaMA-Factory's names, so scripts that read its predict_results.json keep working
        results.update({f"predict_{k}": round(v, 4)
                        for k, v in similarity_scores(predicts, labels).items()})
    runtime = time.perf_counter() - started
    results.update({"predict_runtime": round(runtime, 4), "predict_samples": len(examples),
                    "predict_samples_per_second": round(len(examples) / max(runtime, 1e-9), 3)})
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if do_predict:
            with open(out / "generated_predictions.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        (out / "predict_results.json").write_text(json.dumps(results, indent=2))
    return results


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
