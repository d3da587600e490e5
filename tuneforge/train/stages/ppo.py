"""stage: ppo, RLHF with proximal policy optimisation as LLaMA-Factory runs it (TRL 0.x's
PPOTrainer: Ziegler et al. 2019, Ouyang et al. 2022) on prompts from SFT data (data/prompts.py),
rewarded by a reward model trained by stage: rm (`reward_model`: its output folder).

The policy carries a value head (HEADS "value", trained with it and saved beside the adapter as
value_head.safetensors). The reward model is a separate frozen model (train/reward.py's
load_reward_model: the base loaded again with the rm adapter and its value head, logged): the
engine's adapters are one set per model, so the reward adapter is not switched in on the policy's
layers. Its score of each prompt + completion is the value head on the last token.

How the epochs fit the one loop: a rollout is the prompts of one micro-batch, one completion each
(train/rollout.py). It is generated when its slot (the micro-batch's position in the optimizer
step) has no rollout left, then ppo_epochs loop steps each make one pass over it (one minibatch:
ppo_buffer_size 1), so loop steps = rollouts x ppo_epochs, and the prompts of the micro-batches
that arrive while a rollout is in use are not generated for. Per rollout: the reward model's
scores (normalised by their running mean and std with ppo_score_norm), the per-token KL
logp - ref_logp to the reference (the model with its adapters disabled) times the adaptive KL
coefficient (0.2 at the start, moved toward ppo_target per rollout) as per-token penalty, the
score added on the last token, GAE advantages (gamma 1, lambda 0.95; ppo_whiten_rewards scales the
rewards first) whitened, returns = advantages + old values. Each pass: the clipped policy loss
(clip 0.2) + 0.1 x the clipped value loss (clip 0.2), masked means over the rollout's tokens
(train/rl_losses.py), weighted by the micro-batch's prompts (the normaliser).

Metrics: reward (raw score), kl (summed over a completion's tokens), kl_coef, pg_loss, vf_loss,
clipfrac, completion_length. Evaluation generates a fresh rollout per eval batch (no pass is
consumed). Resume is exact when save_steps is a multiple of ppo_epochs and ppo_target and
ppo_score_norm are off (the rollout buffer, the KL coefficient and the running score moments are
not in checkpoints; a resumed run starts a new rollout)."""

from __future__ import annotations

from .grpo import KEYS as GRPO_KEYS
from .grpo import SAMPLING_KEYS, eos_ids, policy_reference
from .table import Objective, Stage, register_stage, stage_key

KEYS = {
    "reward_model": stage_key(None, "stage: ppo: the reward model, the output folder of a stage: rm run (an "
                              "adapter with value_head.safetensors, or a full model).", type="Optional[str]"),
    "reward_model_type": stage_key("lora", "stage: ppo: lora (reward_model is an adapter on this run's base "
                                   "model) or full (a whole model folder); api is not supported.",
                                   choices=("lora", "full", "api")),
    "ppo_epochs": stage_key(4, "stage: ppo: passes over each rollout (each pass is one loop step).",
                            bounds="(0, inf)"),
    "ppo_buffer_size": stage_key(1, "stage: ppo: minibatches per rollout (only 1: a rollout is one "
                                 "micro-batch of prompts).", bounds="(0, inf)"),
    "ppo_target": stage_key(6.0, "stage: ppo: target KL of the adaptive KL coefficient.",
                            type="Optional[float]", bounds="(0, inf)"),
    "ppo_score_norm": stage_key(False, "stage: ppo: normalise the reward model's scores by their running mean "
                                "and std."),
    "ppo_whiten_rewards": stage_key(False, "stage: ppo: whiten the per-token rewards before GAE."),
    "max_completion_length": GRPO_KEYS["max_completion_length"],  # grpo's spec, shared
}
INIT_KL_COEF, CLIPRANGE, CLIPRANGE_VALUE, VF_COEF, GAMMA, LAM = 0.2, 0.2, 0.2, 0.1, 1.0, 0.95
METRICS = ("reward", "kl", "kl_coef", "pg_loss", "vf_loss", "clipfrac", "completion_length")


def encode(data_args, tokenizer, seed: int):
    from .grpo import encode as prompts

    return prompts(data_args, tokenizer, seed)


def collator(data_args, model, tokenizer):
    from .grpo import collator as prompts

    return prompts(data_args, model, tokenizer)


def reward_model_scorer(settings: dict, tokenizer):
    """`score(rollout) -> (rows,) fp32` by the reward model of `settings` (separate, frozen).
    Raises ConfigError for a missing, api or mismatched reward model."""
    import logging
    from pathlib import Path

    import torch

    from ...data.pairwise import pad_rows
    from ...errors import ConfigError
    from ..heads import value_scores
    from ..reward import load_reward_model

    folder, kind = settings["reward_model"], settings["reward_model_type"]
    if kind == "api":
        raise ConfigError("config key 'reward_model_type' is api, which tuneforge does not support; train a "
                          "reward model with stage: rm and set reward_model_type: lora or full")
    if not folder:
        raise ConfigError("stage: ppo needs reward_model: the output folder of a stage: rm run "
                          "(e.g. saves/demo-rm from examples/rm.yaml)")
    if not Path(folder).is_dir():  # a stage: rm output folder (its value head is a file there), never a hub id
        raise ConfigError(f"config key 'reward_model': folder '{folder}' does not exist; train the reward model "
                          "first with stage: rm (`tuneforge train examples/rm.yaml` writes saves/demo-rm) and set "
                          "reward_model to its output_dir")
    is_adapter = (Path(folder) / "adapter_config.json").is_file()
    if is_adapter != (kind == "lora"):
        raise ConfigError(f"config key 'reward_model' ({folder}) holds {'an adapter' if is_adapter else 'a full model'}"
                          f", but reward_model_type is {kind}; set reward_model_type: "
                          f"{'lora' if is_adapter else 'full'}")
    model, rm_tokenizer = load_reward_model(folder, model_name_or_path=settings.get("model_name_or_path"))
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"config key 'reward_model' ({folder}) uses another tokenizer than the policy; train "
                          "the reward model on the same base model")
    logging.getLogger("tuneforge").info("reward model %s loaded beside the policy (a frozen copy of its base, "
                                        "which doubles the base weights in memory)", folder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def score(rollout) -> torch.Tensor:
        rows = [torch.cat([p[pm.bool()], c[cm.bool()]]).tolist() for p, pm, c, cm in
                zip(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)]
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in pad_rows(rows, pad).items()}
        with torch.no_grad():
            return value_scores(model, model, batch).to(rollout.completion_ids.device)
    return score


def ppo_objective(model, unwrapped, sample_batch: dict, train_args, autocast, *, settings: dict,
                  tokenizer, scorer=None) -> Objective:
    """PPO over rollouts kept between loop steps (see the module's docstring). `scorer(rollout)
    -> scores` replaces the reward model (tests: a rule standing in for it). Raises ConfigError."""
    import torch

    from ...errors import ConfigError
    from .. import rl_losses
    from ..rollout import Sampling, forward, generate, token_logps

    if settings["ppo_buffer_size"] != 1:
        raise ConfigError("config key 'ppo_buffer_size' must be 1: stage: ppo makes one rollout of each "
                          "micro-batch's prompts; raise per_device_train_batch_size for bigger rollouts")
    if not hasattr(unwrapped, "v_head"):
        raise ConfigError("stage: ppo needs the policy's value head (Stage head 'value')")
    score = scorer or reward_model_scorer(settings, tokenizer)
    sampling = Sampling(settings["max_completion_length"], settings["temperature"], settings["top_p"],
                        settings["top_k"])
    epochs = settings["ppo_epochs"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = eos_ids(unwrapped, tokenizer)
    reference = policy_reference(unwrapped)
    kl_ctl = rl_losses.AdaptiveKL(INIT_KL_COEF, settings["ppo_target"])
    moments = rl_losses.RunningMoments() if settings["ppo_score_norm"] else None
    slots = [None] * max(1, getattr(train_args, "gradient_accumulation_steps", 1) or 1)
    state = {"calls": 0}

    def logps_and_values(run_model, rollout):
        out = forward(run_model, unwrapped, rollout, output_hidden_states=True)
        start = rollout.prompt_ids.size(1)
        values = unwrapped.v_head(out.hidden_states[-1][:, start - 1:-1]).squeeze(-1).float()
        return token_logps(out.logits, rollout, sampling.logit_scale), values

    def experience(batch: dict, update: bool) -> dict:
        """A rollout of the batch's prompts with its old log-probs, values, advantages, returns."""
        rollout = generate(unwrapped, batch, 1, sampling, pad, stop)
        mask = rollout.completion_mask.float()
        with torch.no_grad():
            old_logps, old_values = logps_and_values(unwrapped, rollout)
            ref_logps = reference(rollout, sampling.logit_scale)
            raw = score(rollout).float()
        scores = moments.normalise(raw) if moments is not None and update else raw
        rewards, kl = rl_losses.token_rewards(scores, old_logps, ref_logps, mask, kl_ctl.value)
        advantages, returns = rl_losses.gae(rewards, old_values, mask, GAMMA, LAM, settings["ppo_whiten_rewards"])
        exp = {"rollout": rollout, "mask": mask, "old_logps": old_logps, "old_values": old_values,
               "advantages": advantages, "returns": returns, "passes": epochs, "reward": raw.mean().item(),
               "kl": kl.sum(-1).mean().item(), "kl_coef": kl_ctl.value, "length": mask.sum(-1).mean().item()}
        if update:
            kl_ctl.update(exp["kl"], raw.numel())
        return exp

    def count(batch: dict) -> int:
        return batch["input_ids"].size(0)

    def loss(run_model, batch: dict):
        training = torch.is_grad_enabled()
        if training:
            slot = state["calls"] % len(slots)
            state["calls"] += 1
            if slots[slot] is None or slots[slot]["passes"] == 0:
                slots[slot] = experience(batch, update=True)
            exp = slots[slot]
            exp["passes"] -= 1
        else:  # evaluation: a fresh rollout, no pass consumed
            exp = experience(batch, update=False)
        logps, values = logps_and_values(run_model, exp["rollout"])
        value, parts = rl_losses.ppo_loss(logps, exp["old_logps"], exp["advantages"], values, exp["old_values"],
                                          exp["returns"], exp["mask"], CLIPRANGE, CLIPRANGE_VALUE, VF_COEF)
        n = count(batch)
        means = {"reward": exp["reward"], "kl": exp["kl"], "kl_coef": exp["kl_coef"],
                 "completion_length": exp["length"], **parts}
        return value * n, n, {k: v * n for k, v in means.items()}

    return Objective(loss, count, METRICS)


register_stage(Stage(
    name="ppo",
    help="RLHF with PPO on prompts (sft data): a value head on the policy, rewards from a stage: rm "
         "reward model, a KL penalty to the model with adapters disabled, GAE, clipped losses",
    records="conversations",
    encode=encode,
    collator=collator,
    objective=ppo_objective,
    head="value",
    needs_reference=True,
    packing=False,
    keys=KEYS,
    config_keys=(*SAMPLING_KEYS, "model_name_or_path"),
    plot=("reward", "kl"),
))
