"""Batched generation over an eval set, teacher-forced eval loss, and the result files.

An encoded eval example ({"input_ids", "labels"}, last assistant reply labelled) is split into
the prompt (everything before the reply: the chat template with its generation prompt) and the
reference answer (the labelled tokens). Prompts are generated in batches with LEFT padding, so
every row's new tokens start at the same column.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import IGNORE_INDEX, PaddingCollator
from ..errors import ConfigError
from ..infer.generation import check_virtual_room, context_length, generation_kwargs, pad_id, virtual_prefix
from .metrics import similarity_scores

log = logging.getLogger("tuneforge")


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


def answer_limits(prompt_lengths: list[int], batch_size: int, max_new_tokens: int | None,
                  context: int | None, virtual: int = 0, adapter: str | None = None,
                  cutoff_len: int | None = None) -> list[int | None]:
    """max_new_tokens for each batch of `batch_size` prompts (of these lengths, in order): the
    requested number, capped to what a context of `context` tokens leaves after the batch's
    longest prompt (left padding puts every row's answer after it) and the `virtual` tokens of
    adapter `adapter` (prompt / prefix tuning, ...; they come before every prompt). Logs one line
    when it caps. No cap when `context` is None.

    Raises ConfigError (one line: the example's number in the eval split, its prompt's tokens, the
    virtual tokens, the context and the cutoff_len that fits) for a prompt that leaves no room for
    one answer token."""
    starts = range(0, len(prompt_lengths), batch_size)
    if context is None:
        return [max_new_tokens for _ in starts]
    for i, length in enumerate(prompt_lengths):
        if length + virtual >= context:
            added = f" and adapter {adapter!r} adds {virtual} virtual tokens" if virtual else ""
            cut = f" (cutoff_len={cutoff_len})" if cutoff_len else ""
            raise ConfigError(
                f"eval example {i + 1} of {len(prompt_lengths)}: its prompt is {length} tokens{cut}{added}, but "
                f"this model's context is {context} tokens, which must also hold at least one answer token; "
                f"lower cutoff_len to {context - virtual}")
    limits = []
    for start in starts:
        room = context - virtual - max(prompt_lengths[start:start + batch_size])
        limits.append(room if max_new_tokens is None else min(max_new_tokens, room))
    capped = [n for n in limits if max_new_tokens is not None and n < max_new_tokens]
    if capped:
        span = f"{min(capped)}" if min(capped) == max(capped) else f"{min(capped)}..{max(capped)}"
        added = f", the {virtual} virtual tokens of adapter {adapter!r}" if virtual else ""
        log.info("max_new_tokens=%d capped to %s in %d of %d batches: this model's context of %d tokens "
                 "holds the batch's longest prompt%s and the answer", max_new_tokens, span, len(capped),
                 len(limits), context, added)
    return limits


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, gen_kwargs: dict,
             progress: bool = True, limits: list[int | None] | None = None) -> list[str]:
    """Decoded new text for each prompt, generated `batch_size` prompts at a time; `limits`: the
    max_new_tokens of each batch (answer_limits), else gen_kwargs' for all."""
    outputs = []
    batches = range(0, len(prompts), batch_size)
    for index, start in enumerate(tqdm(batches, desc="generating", unit="batch", disable=not progress)):
        batch = left_pad(prompts[start:start + batch_size], pad_id(tokenizer))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        kwargs = gen_kwargs if limits is None else {**gen_kwargs, "max_new_tokens": limits[index]}
        out = model.generate(**batch, **kwargs)
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
                progress: bool = True, cutoff_len: int | None = None,
                adapter: str | None = None) -> dict:
    """Eval loss and perplexity; with do_predict also generated answers and their scores.
    Each batch's answers get at most what the model's context leaves after its longest prompt
    and the active adapter's virtual tokens (answer_limits). `cutoff_len` (the examples' limit)
    and `adapter` (the active adapter as the config names it) are for messages.

    Writes <output_dir>/generated_predictions.jsonl (prompt, predict, label per line) and
    <output_dir>/predict_results.json when output_dir is given; returns the results.
    Raises ConfigError, before any work, for an example that does not fit the context with the
    adapter's virtual tokens (generation.check_virtual_room) or a prompt that leaves no room for
    an answer (answer_limits).
    """
    model.eval()
    check_virtual_room(model, tokenizer, {"eval": examples}, cutoff_len, adapter and f"adapter {adapter!r}")
    items = [split_example(e) for e in examples] if do_predict else []
    if do_predict:
        kwargs = generation_kwargs(gen, tokenizer)
        virtual, name = virtual_prefix(model)
        limits = answer_limits([len(it.prompt_ids) for it in items], batch_size, kwargs["max_new_tokens"],
                               context_length(model, tokenizer), virtual, adapter or name, cutoff_len)
    started = time.perf_counter()
    loss = eval_loss(model, examples, batch_size, pad_id(tokenizer), progress)
    results = {"eval_loss": round(loss, 4), "perplexity": round(_safe_exp(loss), 4)}
    rows = []
    if do_predict:
        predicts = generate(model, tokenizer, [it.prompt_ids for it in items], batch_size, kwargs,
                            progress, limits)
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
