"""stage: grpo, group-relative policy optimisation (Shao et al. 2024, DeepSeekMath; TRL's
GRPOTrainer names its keys and is the reference for the maths) on prompts from SFT data
(data/prompts.py: the conversation up to its last reply; that reply is the `reference` column
reward functions may read). No value model.

Each loop step's micro-batch is a batch of prompts. The objective generates num_generations (G)
completions per prompt with the policy (the model with its adapters, train/rollout.py: no grad,
eval mode, left-padded prompts, the generate section's temperature / top_p / top_k, at most
max_completion_length tokens, ending at EOS), scores them with reward_funcs
(train/rewards.py; weighted by reward_weights), and turns the rewards into advantages relative
to the prompt's group: (r - mean) / (std + 1e-4). The loss is PPO's clipped surrogate with
epsilon, per completion token, plus grpo_beta x the k3 KL to the reference (the model with its
adapters disabled; none is computed at grpo_beta 0), averaged over each completion's tokens
(loss_type grpo) or summed and divided by max_completion_length (dr_grpo); then summed over the
completions: the loop divides by the completions of the optimizer step (the normaliser, known
before generation; a token count is not). One policy update per generation (TRL's default
num_iterations 1): the old log-probabilities are the current ones detached, so the ratio is 1 and
its gradient is the policy gradient; epsilon matters when old_logps differ (rl_losses).

Metrics (means over completions): reward, reward_std (the std of the rewards within a group,
averaged), rewards/<function> per reward function, completion_length (tokens, EOS included), kl
(mean per-token KL to the reference; with grpo_beta > 0). Resume after kill -9 samples as the
uninterrupted run would: the sampling RNG (torch's) is in every checkpoint."""

from __future__ import annotations

from .table import Objective, Stage, register_stage, stage_key

KEYS = {
    "num_generations": stage_key(8, "stage: grpo: completions generated per prompt (the group size G; 2 or "
                                 "more).", bounds="[2, inf)"),
    "reward_funcs": stage_key("length", "stage: grpo: the reward function(s), a name or a list: exact_match "
                              "(completion == the record's reply), length (1 / (1 + tokens): shorter is "
                              "better), ends_with=WORD, token_share=ID, or a Python module:function called "
                              "as f(prompts, completions, **columns) -> list[float].", type="str"),
    "reward_weights": stage_key(None, "stage: grpo: one weight per reward function (default: all 1).",
                                type="Optional[list]"),
    "max_completion_length": stage_key(256, "stage: grpo and ppo: most tokens generated per completion.",
                                       bounds="(0, inf)"),
    "grpo_beta": stage_key(0.0, "stage: grpo: KL coefficient to the reference (the model with adapters "
                           "disabled); 0: no reference pass (TRL's beta).", bounds="[0, inf)"),
    "epsilon": stage_key(0.2, "stage: grpo: clipping range of the policy ratio.", bounds="(0, inf)"),
    "loss_type": stage_key("grpo", "stage: grpo: grpo (mean over each completion's tokens) or dr_grpo (sum "
                           "over its tokens / max_completion_length).", choices=("grpo", "dr_grpo")),
}
SAMPLING_KEYS = ("temperature", "top_p", "top_k")


def encode(data_args, tokenizer, seed: int):
    """Conversations -> {"input_ids" (the prompt), "reference_ids" (its last reply)} examples;
    sets the chat template. Raises DataError, ConfigError."""
    from ...data.loader import load_datasets
    from ...data.prompts import PROMPTS

    return load_datasets(data_args, tokenizer, seed=seed, kind=PROMPTS)


def collator(data_args, model, tokenizer):
    from ...data.prompts import PromptCollator
    from ..packing import CollatorChoice

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return CollatorChoice(PromptCollator(pad), None, lambda: None)


def eos_ids(unwrapped, tokenizer) -> set[int]:
    """The token ids that end a completion: the tokenizer's EOS and the model's generation EOS."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(unwrapped, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else ({configured} if configured is not None else set())
    return ids


def policy_reference(unwrapped):
    """`ref(run) -> per-token log-probs` of the reference model, without gradients: the model
    with its adapters disabled, or (no adapter: full / freeze) a frozen copy made now (logged)."""
    import copy
    import logging

    import torch

    from ...adapters import disable_adapters
    from ...adapters.core import get_state
    from ..rollout import completion_logps

    state = get_state(unwrapped)
    if state is not None and state.configs:
        def ref(rollout, scale):
            with torch.no_grad(), disable_adapters(unwrapped):
                return completion_logps(unwrapped, unwrapped, rollout, scale)
        return ref
    logging.getLogger("tuneforge").info(
        "the model has no adapter to disable: the reference model is a frozen copy of it, which "
        "doubles the weights in memory")
    frozen = copy.deepcopy(unwrapped).requires_grad_(False).eval()

    def ref_copy(rollout, scale):
        with torch.no_grad():
            return completion_logps(frozen, frozen, rollout, scale)
    return ref_copy


def texts(tokenizer, rollout, batch: dict, group: int) -> dict:
    """The reward functions' arguments: prompts, completions (texts) and the columns."""
    prompts = [tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
               for ids, mask in zip(rollout.prompt_ids, rollout.prompt_mask)]
    completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids,
                                                                     rollout.completion_mask)]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    references = [tokenizer.decode([t for t in row.tolist() if t >= 0], skip_special_tokens=True)
                  for row in batch["reference_ids"]]
    return {"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
            "reference": [r for r in references for _ in range(group)]}


def grpo_objective(model, unwrapped, sample_batch: dict, train_args, autocast, *,
                   settings: dict, tokenizer) -> Objective:
    """The GRPO loss summed over the batch's completions (prompts x num_generations); see the
    module's docstring. Raises ConfigError for a reward function that cannot be loaded."""
    import torch

    from ..rewards import Rewards
    from ..rl_losses import group_advantages, grpo_loss, k3_kl
    from ..rollout import Sampling, completion_logps, generate

    group, beta, epsilon = settings["num_generations"], settings["grpo_beta"], settings["epsilon"]
    loss_type, length = settings["loss_type"], settings["max_completion_length"]
    rewards = Rewards(settings["reward_funcs"], settings["reward_weights"])
    sampling = Sampling(length, settings["temperature"], settings["top_p"], settings["top_k"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = eos_ids(unwrapped, tokenizer)
    reference = policy_reference(unwrapped) if beta > 0 else None
    names = ("reward", "reward_std", "completion_length", *(f"rewards/{n}" for n in rewards.names),
             *(("kl",) if beta > 0 else ()))

    def count(batch: dict) -> int:
        return batch["input_ids"].size(0) * group

    def loss(run_model, batch: dict):
        rollout = generate(unwrapped, batch, group, sampling, pad, stop)
        columns = texts(tokenizer, rollout, batch, group)
        total, each = rewards.score(**columns)
        device = rollout.completion_ids.device
        scores = torch.tensor(total, dtype=torch.float32, device=device)
        advantages = group_advantages(scores, group)
        logps = completion_logps(run_model, unwrapped, rollout, sampling.logit_scale)
        ref = reference(rollout, sampling.logit_scale) if reference is not None else None
        mask = rollout.completion_mask
        losses = grpo_loss(logps, logps.detach(), advantages, mask, epsilon, beta, ref, loss_type, length)
        lengths = mask.sum(-1)
        group_std = scores.view(-1, group).std(dim=1)
        metrics = {"reward": scores.sum().item(), "reward_std": group_std.sum().item() * group,
                   "completion_length": int(lengths.sum()),
                   **{f"rewards/{n}": sum(v) for n, v in each.items()}}
        if ref is not None:
            kl = (k3_kl(logps.detach(), ref) * mask).sum(-1) / lengths.clamp(min=1)
            metrics["kl"] = kl.sum().item()
        return losses.sum(), count(batch), metrics

    return Objective(loss, count, names)


register_stage(Stage(
    name="grpo",
    help="group-relative policy optimisation on prompts (sft data): num_generations completions per "
         "prompt, scored by reward_funcs, advantages relative to the group; no value model",
    records="conversations",
    encode=encode,
    collator=collator,
    objective=grpo_objective,
    needs_reference=lambda settings: settings["grpo_beta"] > 0,
    packing=False,
    keys=KEYS,
    config_keys=SAMPLING_KEYS,
    plot=("reward", "kl"),
))
