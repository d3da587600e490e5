"""stage: dpo: each pref_loss equals TRL's own loss code on the same log-probabilities (TRL is the
oracle); reply log-probs from one forward over chosen + rejected rows equal each row scored
alone; the reference is the model with its adapters disabled, without gradients (a frozen copy
for full fine-tuning); a tiny run raises the reward margin and accuracy; a run resumes."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tuneforge.adapters import LoraConfig, add_adapter, disable_adapters
from tuneforge.config import load_config
from tuneforge.data.pairwise import PairwiseCollator
from tuneforge.errors import ConfigError
from tuneforge.train.logps import reply_logps
from tuneforge.train.parts import keep_whole
from tuneforge.train.stages import get_stage
from tuneforge.workflows import train

BETA = 0.3
# three pairs: prompt [prompt_len tokens], then the replies (chosen rows first in the batch)
EXAMPLES = [{"chosen_ids": [5, 6, 7, 8, 9], "rejected_ids": [5, 6, 7, 10], "prompt_len": 3},
            {"chosen_ids": [11, 12, 13], "rejected_ids": [11, 12, 14, 15, 16, 17], "prompt_len": 2},
            {"chosen_ids": [18, 19, 20, 21], "rejected_ids": [18, 22, 23], "prompt_len": 1}]


@pytest.fixture(scope="module")
def batch():
    return PairwiseCollator(0)(EXAMPLES)


def tiny_model(model_dir, adapter: bool = True, seed: int = 0):
    """The tiny Llama with a LoRA adapter whose B matrices are moved off zero (so policy and
    reference differ, as after some training)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def alone_logps(model, example, which):
    """Oracle: the reply's summed log-prob from the row alone (no padding), full logits."""
    ids = torch.tensor([example[f"{which}_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    start = example["prompt_len"]
    targets = ids[0, start:]
    return logp[start - 1:].gather(1, targets[:, None]).sum(), targets.numel()


def oracle(model, which_model=None):
    """(summed logps, reply token counts) per row, chosen rows then rejected rows, row by row."""
    rows = [alone_logps(which_model or model, e, k) for k in ("chosen", "rejected") for e in EXAMPLES]
    return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


# -- the losses against TRL ---------------------------------------------------------------------
def trl_dpo(kind, policy, ref, counts, beta):
    """TRL's DPOTrainer._compute_loss on given per-sequence log-probs: the smallest honest trainer
    (precomputed reference log-probs) and a model stand-in that returns per-token log-probs whose
    sums are `policy` (each row's mass on its first reply token, the rest zero)."""
    from trl import DPOTrainer

    rows, length = policy.numel(), int(counts.max()) + 2
    completion = torch.zeros(rows, length, dtype=torch.long)
    for i, c in enumerate(counts.tolist()):
        completion[i, 1:1 + c] = 1
    per_token = torch.zeros(rows, length - 1)
    per_token[:, 0] = policy
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                          mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    accelerator = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[kind], loss_weights=[1.0],
        beta=beta, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    n = rows // 2
    inputs = {"input_ids": torch.zeros(rows, length, dtype=torch.long),
              "attention_mask": torch.ones(rows, length, dtype=torch.long), "completion_mask": completion,
              "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: out, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def objective_on(model, batch, **settings):
    values = {"pref_loss": "sigmoid", "pref_beta": BETA, "pref_ftx": 0.0, "simpo_gamma": 0.5, **settings}
    return get_stage("dpo").objective(model, model, batch, None, None, settings=values)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_reference_losses_equal_trl_dpo(tiny_model_dir, batch, kind):
    model = tiny_model(tiny_model_dir)
    loss_sum, n, metrics = objective_on(model, batch, pref_loss=kind).loss(model, batch)
    policy, counts = oracle(model)
    with disable_adapters(model):
        ref, _ = oracle(model)
    want, trl_metrics = trl_dpo(kind, policy, ref, counts, BETA)
    assert n == 3
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-4, atol=1e-5)
    if kind != "ipo":  # ipo's rewards are on per-token log-ratios, as its loss (LLaMA-Factory)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                     "logps/chosen", "logps/rejected"):
            assert metrics[name] / n == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name


def test_simpo_equals_trl_cpo_and_orpo_equals_trl_orpo(tiny_model_dir, batch):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    model = tiny_model(tiny_model_dir)
    policy, counts = oracle(model)
    average = policy / counts
    accelerator = SimpleNamespace(device="cpu")
    cpo = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=0.0,
                          accelerator=accelerator)
    want, *_ = CPOTrainer.cpo_loss(cpo, average[:3], average[3:])
    got, n, _ = objective_on(model, batch, pref_loss="simpo", pref_beta=2.0, simpo_gamma=0.7).loss(model, batch)
    torch.testing.assert_close(got / n, want.mean(), rtol=1e-4, atol=1e-5)
    # ORPO: TRL's odds-ratio term (beta log sigmoid(log odds)) subtracted from the chosen NLL;
    # the NLL is per pair (LLaMA-Factory), TRL's ORPOTrainer averages it over all chosen tokens
    orpo = SimpleNamespace(beta=BETA, accelerator=accelerator)
    odds_term, *_ = ORPOTrainer.odds_ratio_loss(orpo, average[:3], average[3:])
    got, n, _ = objective_on(model, batch, pref_loss="orpo").loss(model, batch)
    torch.testing.assert_close(got / n, (-average[:3] - odds_term).mean(), rtol=1e-4, atol=1e-5)


def test_pref_ftx_adds_the_chosen_per_token_nll(tiny_model_dir, batch):
    model = tiny_model(tiny_model_dir)
    policy, counts = oracle(model)
    plain, _, _ = objective_on(model, batch).loss(model, batch)
    mixed, _, _ = objective_on(model, batch, pref_ftx=0.5).loss(model, batch)
    torch.testing.assert_close(mixed - plain, 0.5 * (-policy[:3] / counts[:3]).sum(), rtol=1e-4, atol=1e-5)


# -- log-probs, one forward, the reference --------------------------------------------------------
@pytest.mark.parametrize("head_at_labels", [True, False])
def test_reply_logps_of_one_padded_forward_equal_each_row_alone(tiny_model_dir, batch, head_at_labels):
    model = tiny_model(tiny_model_dir)
    logps, counts = reply_logps(model, model, batch, head_at_labels)
    want, want_counts = oracle(model)
    torch.testing.assert_close(logps, want, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == want_counts.tolist()


def test_chosen_and_rejected_share_one_forward_and_the_reference_one_more(tiny_model_dir, batch):
    model = tiny_model(tiny_model_dir)
    rows = []
    model.model.register_forward_hook(lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].size(0)),
                                      with_kwargs=True)
    objective = objective_on(model, batch)
    rows.clear()  # the probe of the head
    objective.loss(model, batch)
    assert rows == [6, 6]  # policy: 3 chosen + 3 rejected rows; reference: the same rows
    simpo = objective_on(model, batch, pref_loss="simpo")
    rows.clear()
    simpo.loss(model, batch)
    assert rows == [6]  # no reference


def test_reference_is_the_base_model_without_gradients(tiny_model_dir, batch):
    from tuneforge.train.stages.dpo import reference_logps

    model = tiny_model(tiny_model_dir)
    base = tiny_model(tiny_model_dir, adapter=False)
    ref, _ = reference_logps(model, True)(batch)
    base_logps, _ = oracle(base)
    policy, _ = oracle(model)
    torch.testing.assert_close(ref, base_logps, rtol=1e-4, atol=1e-4)
    assert not ref.requires_grad and not torch.allclose(ref, policy, atol=1e-3)
    loss_sum, _, _ = objective_on(model, batch).loss(model, batch)
    loss_sum.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.count("lora_") for n in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_full_fine_tuning_keeps_a_frozen_copy_as_reference(tiny_model_dir, batch, caplog):
    caplog.set_level(logging.INFO, logger="tuneforge")
    model = tiny_model(tiny_model_dir, adapter=False)
    objective = objective_on(model, batch)
    assert "frozen copy" in caplog.text
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "training" moves the policy; the reference stays the model before it
    base_logps, _ = oracle(tiny_model(tiny_model_dir, adapter=False))
    policy, counts = oracle(model)
    want, _ = trl_dpo("sigmoid", policy, base_logps, counts, BETA)
    loss_sum, n, _ = objective.loss(model, batch)
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-4, atol=1e-5)


# -- config -----------------------------------------------------------------------------------------
def test_keys_defaults_and_refusals():
    ft = load_config(None, {"stage": "dpo"}).finetune
    assert (ft.pref_beta, ft.pref_loss, ft.pref_ftx, ft.simpo_gamma) == (0.1, "sigmoid", 0.0, 0.5)
    with pytest.raises(ConfigError, match="config key 'pref_beta' is read by stage: dpo .*got stage: sft"):
        load_config(None, {"pref_beta": 0.2})
    with pytest.raises(ConfigError, match="'pref_loss' must be one of sigmoid, ipo, hinge, orpo, simpo"):
        load_config(None, {"stage": "dpo", "pref_loss": "kto_pair"})
    with pytest.raises(ConfigError, match="'pissa_init' rewrites the base weights, but stage: dpo"):
        load_config(None, {"stage": "dpo", "pissa_init": True})
    load_config(None, {"stage": "dpo", "pref_loss": "orpo", "pissa_init": True})  # no reference
    load_config(None, {"stage": "dpo", "packing": True})  # shared-prefix rows (test_shared_prefix.py)


# -- runs -----------------------------------------------------------------------------------------
def toy_pairs(folder, n=40):
    """A learnable preference: polite replies over rude ones."""
    polite = ["Thank you, here it is.", "Gladly, happy to help.", "Sure, with pleasure.", "Of course, friend."]
    rude = ["Go away now.", "Stop asking me.", "Leave me alone.", "Not my problem."]
    records = [{"instruction": f"Question number {i}?", "chosen": polite[i % 4], "rejected": rude[i // 4 % 4]}
               for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.json", "ranking": True}}))
    return folder


def dpo_values(model_dir, folder, out, **overrides):
    values = {"stage": "dpo", "model_name_or_path": str(model_dir), "dataset": "toy",
              "dataset_dir": str(folder), "cutoff_len": 64, "val_size": 8, "output_dir": str(out),
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
              "max_steps": 12, "logging_steps": 4, "lora_rank": 8, "disable_tqdm": True, "bf16": False,
              "save_steps": 6, "pref_beta": 0.5}
    return load_config(None, {**values, **overrides})


def test_a_tiny_run_raises_the_reward_margin_and_accuracy(tiny_model_dir, tmp_path):
    out = tmp_path / "dpo"
    results = train(dpo_values(tiny_model_dir, toy_pairs(tmp_path / "data"), out, plot_loss=True))
    assert results["eval_loss_before"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at start
    assert results["eval_rewards/margins_before"] == pytest.approx(0.0, abs=1e-5)
    assert results["eval_rewards/margins"] > 0.5
    assert results["eval_rewards/accuracies"] > results["eval_rewards/accuracies_before"]
    assert results["eval_rewards/accuracies"] >= 0.75
    assert results["eval_loss"] < 0.6
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert {e["current_steps"] for e in log if "eval_rewards/margins" in e} == {0, 12}
    train_log = [e for e in log if "loss" in e]  # the training metrics too, means over 4 steps
    assert [e["current_steps"] for e in train_log] == [4, 8, 12]
    assert all(0 <= e["rewards/accuracies"] <= 1 for e in train_log)
    assert train_log[-1]["rewards/margins"] > train_log[0]["rewards/margins"]
    # plot_loss: the stage's own metrics beside the loss (Stage.plot), training and eval
    assert sorted(p.name for p in out.glob("*.png")) == [
        "training_eval_loss.png", "training_eval_rewards_accuracies.png", "training_eval_rewards_margins.png",
        "training_loss.png", "training_rewards_accuracies.png", "training_rewards_margins.png"]


def test_a_dpo_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    folder = toy_pairs(tmp_path / "data", n=16)
    common = dict(val_size=0, max_steps=4, save_steps=2, lr_scheduler_type="constant", learning_rate=1e-3)
    train(dpo_values(tiny_model_dir, folder, tmp_path / "whole", **common))
    train(dpo_values(tiny_model_dir, folder, tmp_path / "parts", **{**common, "max_steps": 2}))
    train(dpo_values(tiny_model_dir, folder, tmp_path / "parts", **common, resume_from_checkpoint=True))
    whole, parts = (load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("whole", "parts"))
    assert whole.keys() == parts.keys()
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key])


def test_sigmoid_loss_is_log_two_with_an_untrained_adapter(tiny_model_dir, batch):
    model = tiny_model(tiny_model_dir, adapter=False)
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))  # B = 0: policy = reference
    loss_sum, n, metrics = objective_on(model, batch).loss(model, batch)
    torch.testing.assert_close(loss_sum / n, -F.logsigmoid(torch.tensor(0.0)))
    assert metrics["rewards/accuracies"] == 0


def test_the_loss_is_a_sum_over_pairs_so_accumulation_equals_one_big_batch(tiny_model_dir, batch):
    model = tiny_model(tiny_model_dir)
    objective = objective_on(model, batch, pref_ftx=0.3)
    whole, n, metrics = objective.loss(model, batch)
    parts = [objective.loss(model, PairwiseCollator(0)([e])) for e in EXAMPLES]
    assert n == objective.count(batch) == sum(p[1] for p in parts) == 3
    torch.testing.assert_close(whole, sum(p[0] for p in parts), rtol=1e-4, atol=1e-5)
    for name, value in metrics.items():
        assert value == pytest.approx(sum(p[2][name] for p in parts), rel=1e-4, abs=1e-5), name


def assert_same_step(split, whole, loss_abs: float) -> None:
    """step_grads of the parts equal the whole micro-batch's: loss, metric sums, every gradient."""
    assert split[0] == pytest.approx(whole[0], rel=1e-6, abs=loss_abs)
    assert split[1] == pytest.approx(whole[1], rel=1e-6, abs=1e-5)  # rewards: beta x a difference of logps
    assert split[2].keys() == whole[2].keys() and split[2]
    for name, grad in whole[2].items():  # fp32, summed in another order: within 5e-5 of the largest entry
        torch.testing.assert_close(split[2][name], grad, rtol=1e-5, atol=5e-5 * float(grad.abs().max()))


def step_grads(model, objective, parts):
    """(summed loss, summed metrics, LoRA gradients) of one micro-batch trained as `parts`, one
    forward and backward each (the loop's way)."""
    model.zero_grad()
    total, sums = 0.0, defaultdict(float)
    for part in parts:
        loss, _, metrics = objective.loss(model, part)
        loss.backward()
        total += loss.item()
        for k, v in metrics.items():
            sums[k] += v
    return total, dict(sums), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "shared"])
@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "orpo", "simpo"])
def test_a_split_micro_batch_trains_as_the_whole(tiny_model_dir, monkeypatch, layout, kind):
    """Objective.split: parts of consecutive pairs, each scored by the policy and the reference
    alone; the parts' losses (pref_ftx included), metrics and LoRA gradients sum to the
    micro-batch's trained as one, for every pref_loss and both row layouts."""
    from tests.train.test_packing_runs import data_args
    from tuneforge.train import parts as parts_module
    from tuneforge.train.shared_prefix import choose_pair_collator

    model = tiny_model(tiny_model_dir)
    choice = choose_pair_collator(data_args(packing=layout == "shared"), model, pad_token_id=0)
    micro = choice.collate(EXAMPLES)
    assert ("score_from" in micro) == (layout == "shared")
    objective = objective_on(model, micro, pref_loss=kind, pref_ftx=0.2)
    monkeypatch.setattr(parts_module, "PART_TOKENS", 0)
    parts = objective.parts(model, micro)
    assert [objective.count(p) for p in parts] == [1, 1, 1]
    split = step_grads(model, objective, parts)
    whole = step_grads(model, objective, [micro])
    monkeypatch.setattr(parts_module, "PART_TOKENS", 10 ** 6)
    assert objective.parts(model, micro) == [micro]
    choice.undo()
    assert_same_step(split, whole, loss_abs=1e-6)


def test_a_method_with_a_per_forward_term_keeps_dpo_micro_batches_whole(tiny_model_dir):
    """lora_moe's router load balance counts each whole forward's tokens: parts would change it, so
    dpo (like sft: tests/train/test_parts.py; kto: test_kto.py) leaves its micro-batches whole."""
    from transformers import AutoModelForCausalLM

    from tuneforge import LoraMoeConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_adapter(model, LoraMoeConfig(r=2, num_experts=2, top_k=1, target_modules=["q_proj", "v_proj"]))
    batch = PairwiseCollator(pad_token_id=0)(EXAMPLES)
    assert objective_on(model, batch).split is not None  # dpo splits; the loop keeps it whole
    assert keep_whole(objective_on(model, batch), model).split is None
    plain = tiny_model(tiny_model_dir)
    assert keep_whole(objective_on(plain, PairwiseCollator(pad_token_id=0)(EXAMPLES)), plain).split is not None
