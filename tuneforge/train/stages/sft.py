"""stage: sft, supervised fine-tuning: conversations rendered with the chat template, the
cross-entropy of the next token on the reply tokens (train_on_prompt / mask_history choose
which), fused with the output head where the model allows it, packed rows where they are exact,
and perplexity at evaluation. The token objective and the collator choice are shared by the
stages built on next-token prediction (pt). LLaMA-Factory's use_dft_loss / use_eaft_loss weight
each token's cross-entropy (train/token_weights.py)."""

from __future__ import annotations

import math

from .table import Objective, Stage, register_stage, stage_key

KEYS = {
    "use_dft_loss": stage_key(False, "stage: sft: DFT, Dynamic Fine-Tuning (Wu et al. 2025): each reply "
                              "token's cross-entropy weighted by the model's probability of it (no gradient "
                              "through the weight). As LLaMA-Factory."),
    "use_eaft_loss": stage_key(False, "stage: sft: EAFT: each reply token's cross-entropy weighted by "
                               "(entropy of the top-20 softmax / 3) ** eaft_alpha. As LLaMA-Factory."),
    "eaft_alpha": stage_key(1.0, "stage: sft with use_eaft_loss: the exponent of the EAFT weight.",
                            bounds="[0, inf)"),
}


def check(settings: dict) -> None:
    """use_dft_loss and use_eaft_loss are two weightings of one loss: one at a time."""
    from ...errors import ConfigError

    if settings.get("use_dft_loss") and settings.get("use_eaft_loss"):
        raise ConfigError("config keys 'use_dft_loss' and 'use_eaft_loss' are both true; they weight the same "
                          "loss two ways: keep one")


def encode(data_args, tokenizer, seed: int):
    """Conversations -> {"input_ids", "labels"} examples (data.load_datasets; it also sets
    the chat template on the tokenizer). Raises DataError, ConfigError."""
    from ...data import load_datasets

    return load_datasets(data_args, tokenizer, seed=seed)


def collator(data_args, model, tokenizer):
    """Padding, or packing where a probe shows it exact (train/packing.py). Raises ConfigError
    when packing is required but not exact on this model."""
    from ..packing import choose_collator

    return choose_collator(data_args, model, tokenizer.pad_token_id)


def token_objective(model, unwrapped, sample_batch: dict, train_args, autocast, *,
                    settings: dict | None = None) -> Objective:
    """Summed next-token cross-entropy over the labelled positions, normalised by their count
    (train/token_loss.py picks the fused, sparse or plain way), each token weighted when the
    settings ask for DFT or EAFT. Raises ConfigError when fused_cross_entropy is true but the
    model cannot use it."""
    from ..token_loss import TokenLoss, label_count
    from ..token_weights import token_weight

    token_loss = TokenLoss.choose(model, unwrapped, sample_batch, train_args.fused_cross_entropy,
                                  autocast, token_weight(settings or {}))

    def loss(_model, batch: dict):  # token_loss runs the model it was chosen for (the loop's)
        loss_sum, count = token_loss(batch)
        return loss_sum, count, {}

    return Objective(loss, label_count)


def perplexity(means: dict) -> dict:
    return {"perplexity": math.exp(min(means["loss"], 50))}


register_stage(Stage(
    name="sft",
    help="supervised fine-tuning on conversations (loss on the replies)",
    records="conversations",
    encode=encode,
    collator=collator,
    objective=token_objective,
    eval_metrics=perplexity,
    keys=KEYS,
    check=check,
))
