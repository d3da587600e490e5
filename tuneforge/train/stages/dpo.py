"""stage: dpo, preference optimisation as LLaMA-Factory runs it (`pref_loss`: sigmoid = DPO,
ipo, hinge, orpo, simpo; train/pref_losses.py has the maths) on preference pairs (ranking: true,
data/pairwise.py).

Per pair, the log-probability of the chosen and of the rejected reply tokens under the policy,
from one forward over all pairs of the micro-batch (one shared-prefix row where the model allows:
each prompt runs once, train/shared_prefix.py; else padded chosen rows then rejected rows); for sigmoid / ipo /
hinge also under the reference, the same model with its adapters disabled
(`tuneforge.adapters.disable_adapters`, under torch.no_grad). With finetuning_type full or
freeze there is no adapter to disable: the reference is a frozen copy of the model made before
training (logged; LLaMA-Factory does the same). orpo and simpo need no reference. sigmoid and
hinge use log-probs summed over the reply; ipo, orpo and simpo averaged per reply token
(LLaMA-Factory, TRL). pref_ftx adds pref_ftx times the chosen reply's per-token NLL.

The loss is summed over pairs (the loop divides by the pairs of the optimizer step), and so are
the metrics, which evaluation reports as their means with TRL's names: rewards/chosen,
rewards/rejected (beta x log-ratio; beta x log-prob without a reference), rewards/margins,
rewards/accuracies (pairs whose chosen reward is higher), logps/chosen, logps/rejected.

Every loss is a sum of per-pair terms, so training runs a micro-batch in parts of consecutive
pairs (Objective.split; train/parts.py part_groups: at most PART_TOKENS tokens or one longer pair),
one forward and backward each, the reference scoring each part before the policy does: only one
part's activations are alive at a time. Evaluation scores a micro-batch whole."""

from __future__ import annotations

from ..parts import PART_TOKENS
from .table import Objective, Stage, register_stage, stage_key

REFERENCE_FREE = ("orpo", "simpo")
AVERAGED = ("ipo", "orpo", "simpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")

PREF_BETA = stage_key(0.1, "Preference stages: beta, the strength of the preference loss (DPO's "
                      "beta, IPO's tau, ORPO's lambda, SimPO's beta; KTO's beta).", bounds="(0, inf)")
PREF_FTX = stage_key(0.0, "Preference stages: weight of the SFT loss (per-token NLL of the chosen reply; "
                     "kto: of each desirable reply) added to the preference loss.", bounds="[0, inf)")
KEYS = {
    "pref_beta": PREF_BETA,
    "pref_loss": stage_key("sigmoid", "stage: dpo: the preference loss: sigmoid (DPO), ipo, hinge, orpo "
                           "or simpo (orpo and simpo need no reference model).",
                           choices=("sigmoid", "ipo", "hinge", "orpo", "simpo")),
    "pref_ftx": PREF_FTX,
    "simpo_gamma": stage_key(0.5, "stage: dpo with pref_loss: simpo: the target reward margin gamma."),
}


def encode(data_args, tokenizer, seed: int):
    """Preference records -> {"chosen_ids", "rejected_ids", "prompt_len"} examples; sets the
    chat template. Raises DataError, ConfigError."""
    from ...data.loader import load_datasets
    from ...data.pairwise import PAIRWISE_REPLIES

    return load_datasets(data_args, tokenizer, seed=seed, kind=PAIRWISE_REPLIES)


def collator(data_args, model, tokenizer):
    """Shared-prefix rows (each pair's prompt once, no padding) where the model scores them
    exactly, else padded pairs (train/shared_prefix.py)."""
    from ..shared_prefix import choose_pair_collator

    return choose_pair_collator(data_args, model, tokenizer.pad_token_id)


def pair_count(batch: dict) -> int:
    """Pairs in a batch: padded (chosen rows, then rejected rows) or shared-prefix."""
    return int(batch["sequences"]) // 2 if "sequences" in batch else batch["input_ids"].size(0) // 2


def reference_logps(unwrapped, head_at_labels: bool):
    """`ref(batch) -> (logps, counts)` of the reference model, without gradients: the model
    with its adapters disabled, or (no adapters: full / freeze) a frozen copy made now."""
    import copy
    import logging

    import torch

    from ...adapters import disable_adapters
    from ...adapters.core import get_state
    from ..logps import reply_logps

    state = get_state(unwrapped)
    if state is not None and state.configs:
        def ref(batch):
            with torch.no_grad(), disable_adapters(unwrapped):
                return reply_logps(unwrapped, unwrapped, batch, head_at_labels)
        return ref
    logging.getLogger("tuneforge").info(
        "the model has no adapter to disable: the reference model is a frozen copy of it (as "
        "LLaMA-Factory keeps one), which doubles the weights in memory")
    frozen = copy.deepcopy(unwrapped).requires_grad_(False).eval()

    def ref_copy(batch):
        with torch.no_grad():
            return reply_logps(frozen, frozen, batch, head_at_labels)
    return ref_copy


def dpo_objective(model, unwrapped, sample_batch: dict, train_args, autocast, *,
                  settings: dict) -> Objective:
    """The pref_loss of stage: dpo summed over the batch's pairs (chosen rows first, then the
    rejected rows, labels on the reply tokens), plus pref_ftx x the chosen reply's per-token
    NLL; metric sums: METRICS."""
    from contextlib import nullcontext

    from ...data.shared_prefix import group_tokens, select_groups
    from .. import pref_losses
    from ..logps import head_only_at_labels, reply_logps
    from ..parts import part_groups

    kind, beta = settings["pref_loss"], settings["pref_beta"]
    ftx, gamma = settings["pref_ftx"], settings["simpo_gamma"]
    head_at_labels = head_only_at_labels(unwrapped, sample_batch, autocast or nullcontext)
    reference = None if kind in REFERENCE_FREE else reference_logps(unwrapped, head_at_labels)

    def loss(run_model, batch: dict):
        n = pair_count(batch)
        # the reference first: its activations come and go before the policy's graph is built
        ref = None if reference is None else reference(batch)[0]
        logps, counts = reply_logps(run_model, unwrapped, batch, head_at_labels)
        average = logps / counts.clamp(min=1)
        scored = average if kind in AVERAGED else logps
        if reference is None:
            chosen, rejected = scored[:n], scored[n:]
            losses = (pref_losses.orpo(chosen, rejected, beta) if kind == "orpo"
                      else pref_losses.simpo(chosen, rejected, beta, gamma))
        else:
            ref_scored = ref / counts.clamp(min=1) if kind in AVERAGED else ref
            chosen, rejected = scored[:n] - ref_scored[:n], scored[n:] - ref_scored[n:]
            losses = {"sigmoid": pref_losses.dpo_sigmoid, "hinge": pref_losses.dpo_hinge,
                      "ipo": pref_losses.ipo}[kind](chosen, rejected, beta)
        if ftx:
            losses = losses - ftx * average[:n]
        chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
        metrics = {"rewards/chosen": chosen_rewards.sum().item(),
                   "rewards/rejected": rejected_rewards.sum().item(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
                   "rewards/accuracies": int((chosen_rewards > rejected_rewards).sum()),
                   "logps/chosen": scored[:n].detach().sum().item(),
                   "logps/rejected": scored[n:].detach().sum().item()}
        return losses.sum(), n, metrics

    def split(run_model, batch: dict) -> list[dict]:
        """The micro-batch as parts of consecutive pairs (train/parts.py part_groups),
        each scored by the policy and the reference on its own: no loss term mixes pairs."""
        n = pair_count(batch)
        groups = part_groups(group_tokens(batch, n))
        return [batch] if len(groups) == 1 else [select_groups(batch, g, n) for g in groups]

    # the loop drops split where a method adds a per-forward term (lora_moe: train/parts.keep_whole)
    return Objective(loss, pair_count, METRICS, split=split)


register_stage(Stage(
    name="dpo",
    help="preference optimisation on preference pairs (ranking: true): pref_loss sigmoid (DPO), "
         "ipo, hinge against the model with adapters disabled, or orpo, simpo without reference",
    records="pairwise",
    encode=encode,
    collator=collator,
    objective=dpo_objective,
    needs_reference=lambda settings: settings["pref_loss"] not in REFERENCE_FREE,
    keys=KEYS,
    part_tokens=PART_TOKENS,
    plot=("rewards/accuracies", "rewards/margins"),
))
