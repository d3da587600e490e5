"""stage: kto, Kahneman-Tversky optimisation (Ethayarajh et al. 2024) as LLaMA-Factory and TRL
run it, on feedback records (a `kto_tag` column, data/kto.py): single replies tagged desirable
or undesirable, no pairs.

Per example, the log-ratio of its reply (policy minus reference log-probability, summed over the
reply tokens); the reference is the model with its adapters disabled (a frozen copy for full /
freeze fine-tuning, as in stage: dpo). Where the model scores them exactly, the rows are
padding-free rows (data/shared_prefix.py), which the policy and the reference score alike. The KL term z_0 is estimated per micro-batch from
mismatched rows, each example's prompt with the reply of the record before it in the dataset
(LLaMA-Factory's pairing, made when the data is read: data/kto.py; within a micro-batch holding
consecutive records it is TRL's rotation): the mean of their policy-minus-reference log-ratios,
without gradient, clamped at 0. Desirable
replies lose kto_chosen_weight x (1 - sigmoid(beta (r - z_0))), undesirable ones
kto_rejected_weight x (1 - sigmoid(beta (z_0 - r))) (train/pref_losses.kto); pref_ftx adds the
per-token NLL of desirable replies. The loss is summed over examples (count = examples).

An example's loss depends on the rest of its micro-batch only through z_0, which has no
gradient; so training runs a micro-batch in parts (Objective.split): z_0 and the reference
log-probs of the whole micro-batch first, without gradient, then one forward and backward per
part of consecutive examples (train/parts.py part_groups: at most PART_TOKENS tokens,
or one longer example), so only one part's activations are alive at a time. Exact: the parts' losses, metrics
and gradients sum to the micro-batch's. Evaluation scores a micro-batch whole.

On shared-prefix rows the mismatched replies do not run their prompts again: they attend to the
prompts' keys and values recorded in the forward over the main rows (train/prompt_cache.py), the
reference's always, the policy's where the micro-batch runs whole (split, z_0 comes before the
policy's forward over the main rows, so its mismatched rows run their prompts).

Metrics (TRL's names): rewards/chosen and logps/chosen are means over the desirable examples,
rewards/rejected and logps/rejected over the undesirable ones, rewards/margins their difference,
kl the mean KL estimate."""

from __future__ import annotations

from .dpo import PREF_BETA, PREF_FTX, reference_logps
from ..parts import PART_TOKENS
from .table import Objective, Stage, register_stage, stage_key

SUMS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl", "count/chosen",
        "count/rejected")
KEYS = {
    "pref_beta": PREF_BETA,
    "pref_ftx": PREF_FTX,
    "kto_chosen_weight": stage_key(1.0, "stage: kto: weight of the loss of desirable replies (kto_tag true).",
                                   bounds="(0, inf)"),
    "kto_rejected_weight": stage_key(1.0, "stage: kto: weight of the loss of undesirable replies (kto_tag "
                                     "false).", bounds="(0, inf)"),
}


def encode(data_args, tokenizer, seed: int):
    """Feedback records -> {"input_ids", "prompt_len", "kto_tag"} examples; sets the chat
    template. Raises DataError, ConfigError."""
    from ...data.kto import KTO
    from ...data.loader import load_datasets

    return load_datasets(data_args, tokenizer, seed=seed, kind=KTO)


def collator(data_args, model, tokenizer):
    """Padding-free rows where the model scores them exactly, else padded rows
    (train/shared_prefix.py)."""
    from ...data.kto import KtoCollator
    from ...data.shared_prefix import KtoSharedCollator
    from ..shared_prefix import choose_shared_prefix

    return choose_shared_prefix(data_args, model, KtoSharedCollator(data_args.cutoff_len),
                                KtoCollator(tokenizer.pad_token_id, data_args.cutoff_len))


def example_count(batch: dict) -> int:
    return batch["kto_tag"].numel()


def _rows(batch: dict, prefix: str = "") -> dict:
    """The rows of one forward: the batch's keys that start with `prefix`, without it."""
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def _stacked(a: dict, b: dict) -> dict:
    """Two right-padded row sets (input_ids, attention_mask, labels) as one, padded to the
    wider (the padding is masked and unlabelled, so its id does not matter)."""
    import torch
    import torch.nn.functional as F

    width = max(a["input_ids"].size(1), b["input_ids"].size(1))
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.cat([F.pad(rows[k], (0, width - rows[k].size(1)), value=value) for rows in (a, b)])
            for k, value in fill.items()}


def _mismatched(score, batch: dict, recorded: dict):
    """The mismatched replies' log-probs, (examples,): `score(rows)` on the continuation row
    ("klc_": the replies alone, attending to the prompts' keys and values `recorded` from the
    forward over the main rows, train/prompt_cache.py) where the batch has one and the model
    recorded them, else on the mismatched rows ("kl_": each prompt again)."""
    from .. import prompt_cache

    continued = _rows(batch, "klc_")
    if continued and recorded:
        with prompt_cache.reuse(recorded, continued["segments"]):
            return score(continued)
    return score(_rows(batch, "kl_"))


def finish(means: dict) -> dict:
    """Means over all examples -> TRL's per-class means (a class absent: not reported)."""
    out = {"kl": means["kl"]}
    for side in ("chosen", "rejected"):
        share = means[f"count/{side}"]
        if share > 0:
            out[f"rewards/{side}"] = means[f"rewards/{side}"] / share
            out[f"logps/{side}"] = means[f"logps/{side}"] / share
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def kto_objective(model, unwrapped, sample_batch: dict, train_args, autocast, *,
                  settings: dict) -> Objective:
    """The KTO loss summed over the batch's examples (see the module's docstring)."""
    from contextlib import nullcontext

    import torch

    from ...data.shared_prefix import PADDED, group_tokens, is_shared_prefix, select_groups
    from .. import pref_losses, prompt_cache
    from ..logps import head_only_at_labels, reply_logps
    from ..parts import part_groups

    beta, ftx = settings["pref_beta"], settings["pref_ftx"]
    weights = settings["kto_chosen_weight"], settings["kto_rejected_weight"]
    head_at_labels = head_only_at_labels(unwrapped, sample_batch, autocast or nullcontext)
    reference = reference_logps(unwrapped, head_at_labels)

    def reference_values(batch: dict, n: int):
        """The reference's log-probs of the n main rows, then of the n mismatched ones, (2n,),
        without gradient. Shared-prefix rows: the mismatched replies reuse the prompts' keys
        recorded in the main rows' forward (train/prompt_cache.py), as the policy's do."""
        main, mismatched = _rows(batch), _rows(batch, "kl_")
        with torch.no_grad():
            if not is_shared_prefix(main):  # padded rows: one stacked forward
                return reference(_stacked({k: main[k] for k in PADDED}, {k: mismatched[k] for k in PADDED}))[0]
            with prompt_cache.capture() as recorded:
                ref_main = reference(main)[0]
            return torch.cat([ref_main, _mismatched(lambda rows: reference(rows)[0], batch, recorded)])

    def policy_kl_logps(batch: dict, recorded: dict):
        """The policy's log-probs of the n mismatched replies, without gradient (reusing the
        prompts' keys `recorded` in the policy's forward over the main rows, where there is one)."""
        with torch.no_grad():
            return _mismatched(lambda rows: reply_logps(unwrapped, unwrapped, rows, head_at_labels)[0],
                               batch, recorded)

    def loss(run_model, batch: dict):
        n = example_count(batch)
        if "ref_logps" in batch:  # a part of a micro-batch (split): its shared values come with it
            kl, ref = batch["kto_kl"], batch["ref_logps"]
            logps, counts = reply_logps(run_model, unwrapped, _rows(batch), head_at_labels)
        else:  # whole: the reference first, its activations and recorded keys gone before the policy's graph
            ref = reference_values(batch, n)
            with prompt_cache.capture() as recorded:
                logps, counts = reply_logps(run_model, unwrapped, _rows(batch), head_at_labels)
            kl = (policy_kl_logps(batch, recorded) - ref[n:]).mean()
            del recorded
            ref = ref[:n]
        ratios = logps - ref
        desirable = batch["kto_tag"].bool()
        losses = pref_losses.kto(ratios, desirable, kl, beta, *weights)
        if ftx:
            losses = losses - ftx * torch.where(desirable, logps / counts.clamp(min=1), 0.0)
        rewards = beta * ratios.detach()
        chosen, rejected = desirable, ~desirable
        metrics = {"rewards/chosen": rewards[chosen].sum().item(),
                   "rewards/rejected": rewards[rejected].sum().item(),
                   "logps/chosen": logps.detach()[chosen].sum().item(),
                   "logps/rejected": logps.detach()[rejected].sum().item(),
                   "kl": kl.clamp(min=0).item() * n,
                   "count/chosen": int(chosen.sum()), "count/rejected": int(rejected.sum())}
        return losses.sum(), n, metrics

    def split(run_model, batch: dict) -> list[dict]:
        """The micro-batch as parts of consecutive examples (train/parts.py part_groups),
        each its main rows with z_0 and its reference log-probs of the whole micro-batch."""
        n = example_count(batch)
        groups = part_groups(group_tokens(batch, n))
        if len(groups) == 1:
            return [batch]
        ref = reference_values(batch, n)  # z_0 before any part: the policy's KL replies run their prompts again
        kl = (policy_kl_logps(batch, {}) - ref[n:]).mean()
        ref = ref[:n]
        return [{**select_groups(batch, g, n), "kto_tag": batch["kto_tag"][g], "ref_logps": ref[g], "kto_kl": kl}
                for g in groups]

    # the loop drops split where a method adds a per-forward term (lora_moe: train/parts.keep_whole)
    return Objective(loss, example_count, SUMS, finish, split)


register_stage(Stage(
    name="kto",
    help="KTO on feedback records (a kto_tag column): desirable and undesirable replies against the "
         "model with adapters disabled, the KL term from mismatched prompt/reply pairs",
    records="kto",
    encode=encode,
    collator=collator,
    objective=kto_objective,
    needs_reference=True,
    keys=KEYS,
    part_tokens=PART_TOKENS,
    plot=("rewards/margins", "kl"),
))
