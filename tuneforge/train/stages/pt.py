"""stage: pt, continued pretraining with LLaMA-Factory's semantics: plain-text records
(data/text.py: EOS after each text, all concatenated and cut into cutoff_len blocks), every
token labelled, the same next-token objective (a micro-batch of several blocks trains as parts,
train/parts.py), collator and perplexity as sft."""

from __future__ import annotations

from .sft import collator, perplexity, token_objective
from .table import Stage, register_stage


def encode(data_args, tokenizer, seed: int):
    """Plain text -> blocks of cutoff_len tokens, all labelled. The chat template is set on the
    tokenizer only when `template` is given. Raises DataError, ConfigError."""
    from ...data.loader import load_datasets
    from ...data.text import TEXT

    return load_datasets(data_args, tokenizer, seed=seed, kind=TEXT)


register_stage(Stage(
    name="pt",
    help="continued pretraining on plain text (EOS after each text, cut into cutoff_len blocks, "
         "every token labelled)",
    records="text",
    encode=encode,
    collator=collator,
    objective=token_objective,
    eval_metrics=perplexity,
    config_keys=("cutoff_len",),  # the size of a part of a micro-batch (train/parts.py)
    part_tokens="cutoff_len",
))
