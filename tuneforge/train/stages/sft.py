"""stage: sft, supervised fine-tuning: conversations rendered with the chat template, the
cross-entropy of the next token on the reply tokens (train_on_prompt / mask_history choose
which), fused with the output head where the model allows it, packed rows where they are exact,
and perplexity at evaluation. `dynamic_mask_ratio` (dynamic-mask fine-tuning, data/dynamic_mask.py)
replaces that share of the prompt tokens of training batches by a mask token, drawn anew each
epoch; LLaMA-Factory's use_dft_loss / use_eaft_loss weight each token's cross-entropy
(train/token_weights.py), and use_asft_loss adds a KL to the model before training
(train/asft_loss.py). The token objective and the collator choice are shared by the
stages built on next-token prediction (pt)."""

from __future__ import annotations

import math

from .table import Objective, Stage, register_stage, stage_key

KEYS = {
    "dynamic_mask_ratio": stage_key(0.0, "stage: sft: dynamic-mask fine-tuning: the share of prompt tokens "
                                    "(no label, not special) replaced by the tokenizer's mask token (else unk, "
                                    "else pad) in training batches, drawn anew each epoch; labels never "
                                    "change. 0: off.", bounds="[0, 1]"),
    "use_dft_loss": stage_key(False, "stage: sft: DFT, Dynamic Fine-Tuning (Wu et al. 2025): each reply "
                              "token's cross-entropy weighted by the model's probability of it (no gradient "
                              "through the weight). As LLaMA-Factory."),
    "use_eaft_loss": stage_key(False, "stage: sft: EAFT: each reply token's cross-entropy weighted by "
                               "(entropy of the top-20 softmax / 3) ** eaft_alpha. As LLaMA-Factory."),
    "eaft_alpha": stage_key(1.0, "stage: sft with use_eaft_loss: the exponent of the EAFT weight.",
                            bounds="[0, inf)"),
    "use_asft_loss": stage_key(False, "stage: sft: ASFT: the DFT loss plus asft_alpha x KL(model before training "
                               "|| model) per reply token; the reference is the model with its adapters disabled "
                               "(full / freeze: a frozen copy). As LLaMA-Factory."),
    "asft_alpha": stage_key(0.1, "stage: sft with use_asft_loss: the weight of the KL term.", bounds="[0, inf)"),
}


def check(settings: dict) -> None:
    """use_dft_loss, use_eaft_loss and use_asft_loss are three losses: one at a time; ASFT's KL
    needs the logits, which the fused cross-entropy never holds."""
    from ...errors import ConfigError

    chosen = [key for key in ("use_dft_loss", "use_eaft_loss", "use_asft_loss") if settings.get(key)]
    if len(chosen) > 1:
        both = "both" if len(chosen) == 2 else "all"
        raise ConfigError(f"config keys {' and '.join(repr(k) for k in chosen)} are {both} true; they are different "
                          "losses of the same tokens: keep one")
    if settings.get("use_asft_loss") and settings.get("fused_cross_entropy"):
        raise ConfigError("config key 'use_asft_loss' needs the logits for its KL term, which fused_cross_entropy: "
                          "true never holds; set fused_cross_entropy to false or leave it empty")


def encode(data_args, tokenizer, seed: int):
    """Conversations -> {"input_ids", "labels"} examples (data.load_datasets; it also sets
    the chat template on the tokenizer). Raises DataError, ConfigError."""
    from ...data import load_datasets

    return load_datasets(data_args, tokenizer, seed=seed)


def collator(data_args, model, tokenizer, settings: dict | None = None):
    """Padding, or packing where a probe shows it exact (train/packing.py). Raises ConfigError
    when packing is required but not exact on this model. With dynamic_mask_ratio (sft's key, in
    `settings`), training batches have prompt tokens masked, anew each epoch (data/dynamic_mask.py)."""
    from ..packing import choose_collator

    choice = choose_collator(data_args, model, tokenizer.pad_token_id)
    ratio = (settings or {}).get("dynamic_mask_ratio") or 0.0
    if ratio > 0:
        import dataclasses

        from ...data.dynamic_mask import DynamicMask, mask_token

        token_id, which = mask_token(tokenizer)
        note = (f"dynamic mask: each epoch, {ratio:g} of the prompt tokens become the {which} token "
                f"{tokenizer.convert_ids_to_tokens(token_id)!r} (id {token_id})")
        choice = dataclasses.replace(
            choice, collate=DynamicMask(choice.collate, ratio, token_id, tokenizer.all_special_ids),
            note="; ".join(n for n in (choice.note, note) if n))
    return choice


def token_objective(model, unwrapped, sample_batch: dict, train_args, autocast, *,
                    settings: dict | None = None) -> Objective:
    """Summed next-token cross-entropy over the labelled positions, normalised by their count
    (train/token_loss.py picks the fused, sparse or plain way), each token weighted when the
    settings ask for DFT or EAFT. A training micro-batch of several examples runs as parts, one
    forward and backward each (train/parts.py: exact, less memory; the loop keeps it whole where
    the model's adapters add a term of each whole forward). Raises ConfigError when
    fused_cross_entropy is true but the model cannot use it."""
    from ..parts import split_batch
    from ..token_loss import TokenLoss, label_count
    from ..token_weights import token_weight

    budget = (settings or {}).get("cutoff_len")  # parts of whole examples up to cutoff_len tokens
    split = lambda _model, batch: split_batch(batch, budget)  # noqa: E731
    if (settings or {}).get("use_asft_loss"):
        from ..asft_loss import AsftLoss

        asft = AsftLoss(unwrapped, settings["asft_alpha"])
        return Objective(lambda run_model, batch: (*asft(run_model, batch), {}), label_count, split=split)
    token_loss = TokenLoss.choose(model, unwrapped, sample_batch, train_args.fused_cross_entropy,
                                  autocast, token_weight(settings or {}))

    def loss(_model, batch: dict):  # token_loss runs the model it was chosen for (the loop's)
        loss_sum, count = token_loss(batch)
        return loss_sum, count, {}

    return Objective(loss, label_count, split=split)


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
    config_keys=("fused_cross_entropy", "cutoff_len"),  # cutoff_len: the size of a part (train/parts.py)
    check=check,
    needs_reference=lambda settings: bool(settings.get("use_asft_loss")),
    part_tokens="cutoff_len",
))
