"""stage: grpo: prompt records from sft data, the reward functions (built-ins, module:function, bad
names refused), the loss equal to TRL's GRPOTrainer._compute_loss and to the hand formula on given
log-probs, zero advantages for a group of equal rewards, a tiny policy that raises its reward with
the KL to the reference bounded, and a run through `tuneforge train` that resumes to the same adapter."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.config import load_config
from tuneforge.data.loader import load_datasets
from tuneforge.data.prompts import PROMPTS, PromptCollator
from tuneforge.errors import ConfigError
from tuneforge.models import load_tokenizer
from tuneforge.train import rl_losses
from tuneforge.train.rewards import Rewards, load_reward
from tuneforge.train.rollout import completion_mask
from tuneforge.train.stages import get_stage
from tuneforge.workflows import train


# -- maths ------------------------------------------------------------------------------------------
def trl_grpo(logps, old, ref, advantages, mask, beta, epsilon, loss_type, max_length):
    """TRL's GRPOTrainer._compute_loss on given per-token log-probs (a stand-in for its forward)."""
    from trl import GRPOTrainer

    rows, width = logps.shape
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    accelerator = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, args=SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_length, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), accelerator=accelerator)
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def given(seed=0, rows=6, width=5):
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(rows, width, generator=gen) * 3
    old = logps + torch.randn(rows, width, generator=gen) * 0.3  # ratios beyond 1 +- epsilon: clipping
    ref = logps + torch.randn(rows, width, generator=gen) * 0.2
    mask = torch.ones(rows, width)
    mask[1, 2:] = 0
    mask[-1, 1:] = 0
    return logps, old, ref, torch.randn(rows, generator=gen), mask


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("grpo", 0.04), ("dr_grpo", 0.1)])
def test_loss_equals_trl_grpo(loss_type, beta):
    logps, old, ref, advantages, mask = given()
    got = rl_losses.grpo_loss(logps, old, advantages, mask, 0.2, beta, ref, loss_type, 7)
    want = trl_grpo(logps, old, ref, advantages, mask, beta, 0.2, loss_type, 7)
    torch.testing.assert_close(got.mean(), want)


def test_loss_equals_the_hand_formula():
    logps, old, ref, advantages, mask = given(seed=1, rows=2, width=3)
    got = rl_losses.grpo_loss(logps, old, advantages, mask, 0.2, 0.1, ref)
    for i in range(2):
        terms = []
        for t in range(3):
            if mask[i, t]:
                ratio = float(torch.exp(logps[i, t] - old[i, t]))
                a = float(advantages[i])
                clipped = min(max(ratio, 0.8), 1.2)
                d = float(ref[i, t] - logps[i, t])
                terms.append(-min(ratio * a, clipped * a) + 0.1 * (torch.exp(torch.tensor(d)).item() - d - 1))
        assert got[i].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_group_advantages_and_equal_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    got = rl_losses.group_advantages(rewards, 4)
    first = rewards[:4]
    torch.testing.assert_close(got[:4], (first - first.mean()) / (first.std() + 1e-4))
    assert got[4:].tolist() == [0.0] * 4  # a group of equal rewards teaches nothing
    # with old = current log-probs (one update per generation) the loss is -mean(advantage) per group: 0
    logps = torch.randn(8, 3)
    loss = rl_losses.grpo_loss(logps, logps, got, torch.ones(8, 3), 0.2)
    assert loss.sum().item() == pytest.approx(0.0, abs=1e-5)


def test_completion_mask_ends_at_the_first_eos():
    ids = torch.tensor([[4, 2, 7, 2], [4, 5, 6, 7], [2, 3, 3, 3]])
    assert completion_mask(ids, {2}).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


# -- rewards ----------------------------------------------------------------------------------------
def test_built_in_rewards_and_a_module_function(tmp_path, monkeypatch):
    completions = ["Paris", " paris. ", "It is Lyon"]
    rewards = Rewards("exact_match,length,ends_with=Paris", [1.0, 0.0, 2.0])
    total, each = rewards.score(["p"] * 3, completions, reference=["Paris"] * 3, completion_ids=[[1], [1], [1, 2, 3]])
    assert each["exact_match"] == [1.0, 0.0, 0.0]
    assert each["length"] == [0.5, 0.5, 0.25]  # 1 / (1 + tokens)
    assert each["ends_with=Paris"] == [1.0, 1.0, 0.0]
    assert total == [3.0, 2.0, 0.0]
    assert load_reward("token_share=7")([""] * 2, ["", ""], completion_ids=[[7, 7, 1, 2], []]) == [0.5, 0.0]
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions, reference, **kw):\n    return [float(c.isupper()) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    assert Rewards(["my_rewards:shout"]).score(["p"] * 2, ["YES", "no"], reference=["", ""])[0] == [1.0, 0.0]


@pytest.mark.parametrize("names,weights,match", [
    ("exact", None, "names 'exact', which is no built-in and not module:function"),
    ("ends_with=", None, "with no word after '='"),
    ("no_such_module_xyz:f", None, "module 'no_such_module_xyz' cannot be imported"),
    ("json:no_function", None, "module 'json' has no function 'no_function'"),
    ("length,exact_match", [1.0], "has 1 weights for 2 reward_funcs"),
])
def test_bad_reward_settings_are_refused_in_one_line(names, weights, match):
    with pytest.raises(ConfigError, match=match):
        Rewards(names, weights)


# -- data -------------------------------------------------------------------------------------------
def test_prompts_from_sft_data_end_where_the_reply_starts(tiny_model_dir, shared_data_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    data = load_config(None, {"stage": "grpo", "dataset": "identity", "dataset_dir": str(shared_data_dir),
                              "max_samples": 3, "placeholders": {"name": "Ada", "author": "Lab"}}).data
    examples = load_datasets(data, tokenizer, kind=PROMPTS).train
    prompt = tokenizer.decode(examples[0]["input_ids"])
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in prompt
    references = [tokenizer.decode(e["reference_ids"], skip_special_tokens=True) for e in examples]
    assert all("Ada" in r and "{{" not in r for r in references)
    batch = PromptCollator(tokenizer.pad_token_id)([{"input_ids": [5, 6, 7], "reference_ids": [8]},
                                                    {"input_ids": [9], "reference_ids": [10, 11]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [tokenizer.pad_token_id] * 2 + [9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["reference_ids"].tolist() == [[8, -100], [10, 11]]


def test_keys_and_refusals():
    ft = load_config(None, {"stage": "grpo"}).finetune
    assert (ft.num_generations, ft.grpo_beta, ft.epsilon, ft.loss_type) == (8, 0.0, 0.2, "grpo")
    with pytest.raises(ConfigError, match="config key 'num_generations' is read by stage: grpo"):
        load_config(None, {"num_generations": 4})
    with pytest.raises(ConfigError, match="num_generations"):
        load_config(None, {"stage": "grpo", "num_generations": 1})
    with pytest.raises(ConfigError, match="'packing' is true, but stage: grpo"):
        load_config(None, {"stage": "grpo", "packing": True})


# -- a tiny policy learns -------------------------------------------------------------------------------
class Digits:
    """A tokenizer stand-in for a 16-token model: token t is the text f"t{t} "; 1 is EOS."""
    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"t{t} " for t in ids if not (skip_special_tokens and t in (0, 1)))

    def batch_decode(self, rows, skip_special_tokens=False):
        return [self.decode(r, skip_special_tokens) for r in rows]


def tiny_policy():
    """A 16-token Llama with LoRA on its output head and MLP (the head learns the toy task fast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=1,
                                         pad_token_id=0, bos_token_id=2, max_position_embeddings=64,
                                         tie_word_embeddings=False))
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "down_proj"]))
    return model


def grpo_settings(**overrides):
    return {"num_generations": 4, "reward_funcs": "token_share=5", "reward_weights": None,
            "max_completion_length": 6, "grpo_beta": 0.0, "epsilon": 0.2, "loss_type": "grpo",
            "temperature": 1.0, "top_p": 1.0, "top_k": 0, **overrides}


def tiny_run(beta: float, steps: int = 25) -> list[dict]:
    """Train the tiny policy on the toy task (reward: the share of completion tokens that are token
    5); the metric means of each step."""
    model = tiny_policy()
    batch = PromptCollator(0)([{"input_ids": [2, 3 + i, 4], "reference_ids": [5]} for i in range(4)])
    objective = get_stage("grpo").objective(model, model, batch, None, None, settings=grpo_settings(grpo_beta=beta),
                                            tokenizer=Digits())
    assert objective.count(batch) == 16
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    history = []
    for _ in range(steps):
        loss_sum, n, metrics = objective.loss(model, batch)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: v / n for k, v in metrics.items()})
    return history


def test_a_tiny_policy_raises_its_reward_and_a_larger_beta_keeps_it_near_the_reference():
    loose, tight = tiny_run(beta=0.05), tiny_run(beta=1.0)
    first = sum(h["reward"] for h in loose[:5]) / 5
    last = sum(h["reward"] for h in loose[-5:]) / 5
    assert first < 0.15 and last > first + 0.3, (first, last)  # from about 1/16 (chance)
    assert loose[-1]["rewards/token_share=5"] == pytest.approx(loose[-1]["reward"])
    assert loose[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts as the reference (B = 0)
    assert all(1 <= h["completion_length"] <= 6 for h in loose)
    assert max(h["kl"] for h in tight) < 0.5
    assert sum(h["kl"] for h in tight[-10:]) < sum(h["kl"] for h in loose[-10:]) / 2


# -- a run -------------------------------------------------------------------------------------------------
def grpo_values(model_dir, folder, out, **overrides):
    values = {"stage": "grpo", "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(folder),
              "cutoff_len": 64, "output_dir": str(out), "per_device_train_batch_size": 2, "learning_rate": 1e-3,
              "max_steps": 2, "save_steps": 1, "logging_steps": 1, "lora_rank": 4, "disable_tqdm": True,
              "bf16": False, "num_generations": 2, "max_completion_length": 4, "reward_funcs": "length",
              "grpo_beta": 0.1, "lr_scheduler_type": "constant"}
    return load_config(None, {**values, **overrides})


def test_a_grpo_run_logs_its_metrics_and_resumes_to_the_same_adapter(tiny_model_dir, tiny_data_dir, tmp_path):
    from safetensors.torch import load_file

    train(grpo_values(tiny_model_dir, tiny_data_dir, tmp_path / "whole"))
    train(grpo_values(tiny_model_dir, tiny_data_dir, tmp_path / "parts", max_steps=1))
    train(grpo_values(tiny_model_dir, tiny_data_dir, tmp_path / "parts", resume_from_checkpoint=True))
    log = [json.loads(line) for line in (tmp_path / "whole" / "trainer_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["current_steps"] for e in steps] == [1, 2]
    assert all({"reward", "reward_std", "kl", "completion_length", "rewards/length"} <= e.keys() for e in steps)
    assert all(0 < e["reward"] <= 1 and 1 <= e["completion_length"] <= 4 for e in steps)
    whole, parts = (load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("whole", "parts"))
    assert whole.keys() == parts.keys()
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key])
