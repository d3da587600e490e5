"""stage: ppo: GAE, whitening, the per-token rewards, the clipped policy and value losses and the
adaptive KL coefficient equal their hand formulas (TRL 1.16 has no PPO trainer left to call); on a
toy task with a rule reward standing in for the reward model the mean reward rises while the KL to
the reference stays bounded; a run chained from a stage: rm run's output trains, logs and saves
its value head; bad settings are refused in one line."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train import rl_losses
from tuneforge.train.heads import add_value_head
from tuneforge.train.stages import get_stage
from tuneforge.workflows import train

from test_dpo import toy_pairs
from test_grpo import Digits, PromptCollator, tiny_policy


# -- maths ------------------------------------------------------------------------------------------
def whiten_by_hand(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


def test_gae_and_whitening_equal_the_hand_formulas():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.3, 0.5, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 9.0], [-0.1, 0.3, 9.0, 9.0]])  # 9: padding, ignored
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    advantages, returns = rl_losses.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    raw = []
    for r, v, n in ([[0.1, -0.2, 1.0], [0.5, 0.4, 0.2], 3], [[0.3, 0.5], [-0.1, 0.3], 2]):
        a, following = [0.0] * n, 0.0
        for t in reversed(range(n)):
            delta = r[t] + 0.9 * (v[t + 1] if t + 1 < n else 0.0) - v[t]
            following = delta + 0.9 * 0.8 * following
            a[t] = following
        raw.append(a)
        assert returns[len(raw) - 1, :n].tolist() == pytest.approx([x + y for x, y in zip(a, v)], abs=1e-6)
    flat = whiten_by_hand(raw[0] + raw[1])
    assert advantages[0, :3].tolist() == pytest.approx(flat[:3], abs=1e-5)
    assert advantages[1, :2].tolist() == pytest.approx(flat[3:], abs=1e-5)
    kept = rl_losses.masked_whiten(torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3), shift_mean=False)
    assert kept.tolist()[0] == pytest.approx([x + 7 / 3 for x in whiten_by_hand([1.0, 2.0, 4.0])], abs=1e-5)


def test_token_rewards_put_the_score_on_the_last_token():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = rl_losses.token_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [-0.05, -1.0, 0.0]]))


def test_ppo_loss_equals_the_hand_formula():
    gen = torch.Generator().manual_seed(0)
    logps, old = -torch.rand(2, 3, generator=gen), -torch.rand(2, 3, generator=gen)
    adv, ret = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    values, old_values = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, parts = rl_losses.ppo_loss(logps, old, adv, values, old_values, ret, mask, 0.2, 0.3, 0.1)
    pg, vf, clipped = [], [], []
    for i, t in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        ratio = math.exp(logps[i, t] - old[i, t])
        a = float(adv[i, t])
        pg.append(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
        v, v_old, r = float(values[i, t]), float(old_values[i, t]), float(ret[i, t])
        v_clip = v_old + min(max(v - v_old, -0.3), 0.3)
        vf.append(max((v - r) ** 2, (v_clip - r) ** 2))
        clipped.append(abs(ratio - 1) > 0.2)
    want_pg, want_vf = sum(pg) / 4, 0.5 * sum(vf) / 4
    assert parts["pg_loss"] == pytest.approx(want_pg, rel=1e-5)
    assert parts["vf_loss"] == pytest.approx(want_vf, rel=1e-5)
    assert parts["clipfrac"] == pytest.approx(sum(clipped) / 4)
    assert loss.item() == pytest.approx(want_pg + 0.1 * want_vf, rel=1e-5)


def test_adaptive_kl_and_running_score_moments():
    ctl = rl_losses.AdaptiveKL(0.2, target=6.0, horizon=100)
    ctl.update(kl=12.0, n=10)  # far above target: the error is clipped at 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))
    ctl.update(kl=5.4, n=10)
    assert ctl.value == pytest.approx(0.2 * 1.02 * (1 - 0.1 * 10 / 100))
    fixed = rl_losses.AdaptiveKL(0.2, target=None)
    fixed.update(kl=100.0, n=10)
    assert fixed.value == 0.2
    moments, seen = rl_losses.RunningMoments(), []
    for batch in ([1.0, 2.0, 3.0], [10.0, -4.0]):
        seen += batch
        got = moments.normalise(torch.tensor(batch))
        all_ = torch.tensor(seen)
        torch.testing.assert_close(got, (torch.tensor(batch) - all_.mean()) / (all_.std() + 1e-8))


# -- a toy task -------------------------------------------------------------------------------------
def rule_reward_standing_in_for_a_reward_model(rollout) -> torch.Tensor:
    """Not a reward model: a rule, half a point per completion token equal to token 5."""
    hits = (rollout.completion_ids == 5) & (rollout.completion_mask == 1)
    return hits.sum(-1).float() * 0.5


SETTINGS = {"reward_model": None, "reward_model_type": "lora", "ppo_epochs": 2, "ppo_buffer_size": 1,
            "ppo_target": 6.0, "ppo_score_norm": False, "ppo_whiten_rewards": False, "max_completion_length": 6,
            "temperature": 1.0, "top_p": 1.0, "top_k": 0}


def test_the_mean_reward_rises_and_the_kl_stays_bounded_on_a_toy_task():
    model = tiny_policy()
    add_value_head(model)
    batch = PromptCollator(0)([{"input_ids": [2, 3 + i, 4], "reference_ids": [5]} for i in range(8)])
    objective = get_stage("ppo").objective(model, model, batch, SimpleNamespace(gradient_accumulation_steps=1),
                                           None, settings=SETTINGS, tokenizer=Digits(),
                                           scorer=rule_reward_standing_in_for_a_reward_model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    rollouts = []
    for step in range(48):
        loss_sum, n, metrics = objective.loss(model, batch)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:  # each rollout serves ppo_epochs = 2 steps
            rollouts.append({k: v / n for k, v in metrics.items()})
        else:
            assert metrics["reward"] / n == rollouts[-1]["reward"]  # the same rollout, a second pass
    rewards = [r["reward"] for r in rollouts]
    windows = [sum(rewards[i:i + 4]) / 4 for i in range(len(rewards) - 3)]
    assert max(windows) > windows[0] + 0.4, rewards
    # a policy that always says token 5 has a KL of about 6 x log 16 = 16.6: the penalty keeps it far below
    assert max(r["kl"] for r in rollouts) < 8, [r["kl"] for r in rollouts]
    assert rollouts[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts as the reference
    assert all(1 <= r["completion_length"] <= 6 for r in rollouts)


# -- a run chained from stage: rm -------------------------------------------------------------------------
def test_a_ppo_run_from_a_stage_rm_output_trains_and_resumes_to_the_same_weights(tiny_model_dir, tiny_data_dir,
                                                                                  tmp_path):
    from safetensors.torch import load_file

    common = {"model_name_or_path": str(tiny_model_dir), "cutoff_len": 64, "lora_rank": 4, "disable_tqdm": True,
              "bf16": False, "logging_steps": 1, "max_steps": 2, "per_device_train_batch_size": 2}
    rm_out = tmp_path / "rm"
    train(load_config(None, {**common, "stage": "rm", "dataset": "toy", "output_dir": str(rm_out),
                             "dataset_dir": str(toy_pairs(tmp_path / "pairs", n=8))}))

    def ppo(out, **overrides):
        # resume is exact with a fixed KL coefficient (ppo_target null) and save_steps a multiple of ppo_epochs
        return train(load_config(None, {
            **common, "stage": "ppo", "reward_model": str(rm_out), "dataset": "arith",
            "dataset_dir": str(tiny_data_dir), "output_dir": str(tmp_path / out), "max_steps": 4, "ppo_epochs": 2,
            "max_completion_length": 4, "save_steps": 2, "ppo_target": None, "lr_scheduler_type": "constant",
            **overrides}))

    assert ppo("whole")["global_step"] == 4
    log = [json.loads(line) for line in (tmp_path / "whole" / "trainer_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["current_steps"] for e in steps] == [1, 2, 3, 4]
    assert all({"reward", "kl", "kl_coef", "pg_loss", "vf_loss", "completion_length"} <= e.keys() for e in steps)
    assert steps[0]["reward"] == steps[1]["reward"] and steps[2]["reward"] == steps[3]["reward"]  # 2 passes each
    ppo("parts", max_steps=2)
    ppo("parts", resume_from_checkpoint=True)
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        whole, parts = (load_file(str(tmp_path / run / name)) for run in ("whole", "parts"))
        assert whole.keys() == parts.keys()
        for key in whole:
            torch.testing.assert_close(parts[key], whole[key])


@pytest.mark.parametrize("values,match", [
    ({"reward_model_type": "api"}, "'reward_model_type' is api, which tuneforge does not support"),
    ({}, "stage: ppo needs reward_model: the output folder of a stage: rm run"),
    ({"ppo_buffer_size": 2}, "'ppo_buffer_size' must be 1"),
])
def test_bad_settings_are_refused_in_one_line(values, match):
    model = tiny_policy()
    add_value_head(model)
    batch = PromptCollator(0)([{"input_ids": [2, 3], "reference_ids": [5]}])
    with pytest.raises(ConfigError, match=match):
        get_stage("ppo").objective(model, model, batch, None, None, settings={**SETTINGS, **values},
                                   tokenizer=Digits())


def test_keys_and_refusals():
    ft = load_config(None, {"stage": "ppo"}).finetune
    assert (ft.ppo_epochs, ft.ppo_buffer_size, ft.ppo_target, ft.reward_model_type) == (4, 1, 6.0, "lora")
    with pytest.raises(ConfigError, match="config key 'ppo_epochs' is read by stage: ppo"):
        load_config(None, {"ppo_epochs": 2})
    load_config(None, {"stage": "ppo", "max_completion_length": 16})  # shared with grpo
