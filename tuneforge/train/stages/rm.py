"""stage: rm, reward modelling as LLaMA-Factory trains it: preference pairs (ranking: true,
data/pairwise.py), a scalar value head on the last real token of each sequence (train/heads.py,
saved beside the adapter as value_head.safetensors), the pairwise loss
-log sigmoid(r_chosen - r_rejected) averaged over pairs, and the share of pairs ranked right
(chosen scored above rejected) as eval_accuracy. Batches are padded (packing: no)."""

from __future__ import annotations

from .table import Objective, Stage, register_stage


def encode(data_args, tokenizer, seed: int):
    """Preference records -> {"chosen_ids", "rejected_ids"} examples; sets the chat template.
    Raises DataError, ConfigError."""
    from ...data.loader import load_datasets
    from ...data.pairwise import PAIRWISE

    return load_datasets(data_args, tokenizer, seed=seed, kind=PAIRWISE)


def collator(data_args, model, tokenizer):
    from ...data.pairwise import PairwiseCollator
    from ..packing import CollatorChoice

    return CollatorChoice(PairwiseCollator(tokenizer.pad_token_id), None, lambda: None)


def pair_count(batch: dict) -> int:
    return batch["input_ids"].size(0) // 2


def pairwise_objective(model, unwrapped, sample_batch: dict, train_args, autocast) -> Objective:
    """-log sigmoid(r_chosen - r_rejected) summed over the batch's pairs; metrics: the number of
    pairs whose chosen reply scores higher."""
    import torch.nn.functional as F

    from ..heads import value_scores

    def loss(run_model, batch: dict):
        scores = value_scores(run_model, unwrapped, batch)
        n = pair_count(batch)
        chosen, rejected = scores[:n], scores[n:]
        return (-F.logsigmoid(chosen - rejected).sum(), n,
                {"accuracy": int((chosen > rejected).sum())})

    return Objective(loss, pair_count, ("accuracy",))


register_stage(Stage(
    name="rm",
    help="reward model on preference pairs (ranking: true): a value head trained with "
         "-log sigmoid(r_chosen - r_rejected), eval_accuracy = pairs ranked right",
    records="pairwise",
    encode=encode,
    collator=collator,
    objective=pairwise_objective,
    head="value",
    packing=False,
    plot=("accuracy",),
))
