"""stage: kto: LLaMA-Factory's kto_tag records, the mismatched rows of the KL estimate (TRL's
rotation), the loss equal to TRL's KTOTrainer on the same log-probabilities, and a tiny run that
separates desirable from undesirable replies."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.adapters import disable_adapters
from tuneforge.config import load_config
from tuneforge.data.kto import KTO, KtoCollator
from tuneforge.data.loader import load_datasets
from tuneforge.errors import ConfigError, DataError
from tuneforge.models import load_tokenizer
from tuneforge.train.parts import keep_whole
from tuneforge.train.stages import get_stage
from tuneforge.workflows import train

from test_dpo import assert_same_step, step_grads, tiny_model

PARTS = [([5, 6, 7], [8, 9], 1), ([11, 12], [13, 14, 15, 16], 0), ([18], [19, 20, 21], 1),
         ([22, 23, 24, 25], [26], 0)]  # (prompt, reply, kto_tag)
# kl_reply: the previous record's reply (data/kto.py), so this batch of consecutive records is TRL's rotation
EXAMPLES = [{"input_ids": p + r, "prompt_len": len(p), "kto_tag": t, "kl_reply": PARTS[i - 1][1]}
            for i, (p, r, t) in enumerate(PARTS)]


@pytest.fixture(scope="module")
def batch():
    return KtoCollator(0, cutoff_len=64)(EXAMPLES)


def alone(model, prompt, reply):
    """Oracle: the reply's summed log-prob from prompt + reply alone, full logits."""
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logp[len(prompt) - 1:].gather(1, torch.tensor(reply)[:, None]).sum()


def oracle(model):
    """(logps of each example, logps of its KL row: its prompt with the previous reply)."""
    prompts, replies = [p for p, _, _ in PARTS], [r for _, r, _ in PARTS]
    rotated = replies[-1:] + replies[:-1]
    main = torch.stack([alone(model, p, r) for p, r in zip(prompts, replies)])
    kl = torch.stack([alone(model, p, r) for p, r in zip(prompts, rotated)])
    return main, kl


def trl_kto(policy, policy_kl, ref, ref_kl, labels, beta, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer._compute_loss (and its _compute_kl_logps) on given per-sequence log-probs:
    precomputed reference log-probs, and a model stand-in whose per-token log-probs sum to
    `policy` (main rows) or `policy_kl` (the KL rows)."""
    from trl import KTOTrainer

    rows, length = policy.numel(), 4
    completion = torch.zeros(rows, length, dtype=torch.long)
    completion[:, 1] = 1

    def outputs(sums):
        per_token = torch.zeros(rows, length - 1)
        per_token[:, 0] = sums
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                               mean_logits=torch.zeros_like(per_token))

    inputs = {"input_ids": torch.zeros(rows, length, dtype=torch.long),
              "attention_mask": torch.ones(rows, length, dtype=torch.long), "completion_mask": completion,
              "KL_input_ids": torch.ones(rows, length, dtype=torch.long),
              "KL_attention_mask": torch.ones(rows, length, dtype=torch.long), "KL_completion_mask": completion,
              "label": labels.bool(), "ref_logps": ref, "ref_KL_logps": ref_kl}

    def model(**kwargs):
        return outputs(policy_kl if bool(kwargs["input_ids"].any()) else policy)

    accelerator = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
        calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
    loss = KTOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def objective_on(model, batch, **settings):
    values = {"pref_beta": 0.3, "pref_ftx": 0.0, "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0,
              **settings}
    return get_stage("kto").objective(model, model, batch, None, None, settings=values)


def test_kl_rows_pair_each_prompt_with_the_previous_reply(batch):
    assert batch["kl_input_ids"][0, :5].tolist() == [5, 6, 7, 26, 0]
    assert batch["kl_input_ids"][1].tolist()[:5] == [11, 12, 8, 9, 0]
    assert batch["kl_labels"][1].tolist()[:5] == [-100, -100, 8, 9, -100]
    assert batch["labels"][0].tolist()[:5] == [-100, -100, -100, 8, 9]
    assert batch["kto_tag"].tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.5)])
def test_loss_equals_trl_kto(tiny_model_dir, batch, weights):
    model = tiny_model(tiny_model_dir)
    got, n, metrics = objective_on(model, batch, kto_chosen_weight=weights[0],
                                   kto_rejected_weight=weights[1]).loss(model, batch)
    policy, policy_kl = oracle(model)
    with disable_adapters(model):
        ref, ref_kl = oracle(model)
    want, trl_metrics = trl_kto(policy, policy_kl, ref, ref_kl, batch["kto_tag"], 0.3, *weights)
    assert n == 4
    torch.testing.assert_close(got / n, want, rtol=1e-4, atol=1e-5)
    # the objective's finish step turns the sums into TRL's per-class means
    means = objective_on(model, batch).report({k: v / n for k, v in metrics.items()})
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert means[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name


def test_one_example_per_micro_batch_has_its_mismatched_row(tiny_model_dir):
    """LLaMA-Factory's kto example trains with per_device_train_batch_size: 1: the KL row is the
    prompt with the previous record's reply, made when the data is read."""
    model = tiny_model(tiny_model_dir)
    one = KtoCollator(0, 64)(EXAMPLES[1:2])
    assert one["kl_input_ids"][0].tolist() == [11, 12, 8, 9]
    loss, n, metrics = objective_on(model, one).loss(model, one)
    assert n == 1 and torch.isfinite(loss) and "kl" in metrics


@pytest.mark.parametrize("layout", ["padded", "shared"])
@pytest.mark.parametrize("most,sizes", [(0, [1, 1, 1, 1]), (11, [2, 2]), (10 ** 6, [4])])
def test_a_split_micro_batch_trains_as_the_whole(tiny_model_dir, monkeypatch, layout, most, sizes):
    """Objective.split: z_0 and the reference log-probs of the whole micro-batch, then parts of
    consecutive examples; the parts' losses, metrics and LoRA gradients sum to the micro-batch's,
    trained as one (both row layouts; PART_TOKENS set so that there are 4, 2 or 1 parts)."""
    from tests.train.test_packing_runs import data_args
    from tuneforge.data.shared_prefix import KtoSharedCollator
    from tuneforge.train import parts as parts_module
    from tuneforge.train.shared_prefix import choose_shared_prefix

    model = tiny_model(tiny_model_dir)
    choice = choose_shared_prefix(data_args(packing=layout == "shared"), model, KtoSharedCollator(64),
                                  KtoCollator(0, 64))
    micro = choice.collate(EXAMPLES)
    assert ("score_from" in micro) == (layout == "shared")
    objective = objective_on(model, micro)
    monkeypatch.setattr(parts_module, "PART_TOKENS", most)
    parts = objective.parts(model, micro)
    assert [int(p["kto_tag"].numel()) for p in parts] == sizes
    assert [t for p in parts for t in p["kto_tag"].tolist()] == micro["kto_tag"].tolist()
    if len(parts) > 1:
        assert all("kl_input_ids" not in p and p["ref_logps"].shape == p["kto_tag"].shape for p in parts)
    split = step_grads(model, objective, parts)
    whole = step_grads(model, objective, [micro])
    choice.undo()
    assert_same_step(split, whole, loss_abs=1e-7)


def test_a_run_in_parts_equals_the_run_in_micro_batches(tiny_model_dir, tmp_path, monkeypatch):
    """Through the training loop (TrainingRun: a part's forward and backward at a time): the
    same losses and evaluation as micro-batches trained whole."""
    from tuneforge.train import parts as parts_module

    records = [{"instruction": f"Question {i} about the weather today?", "output": f"Answer {i}: it rains.",
                "tag": bool(i % 3)} for i in range(12)]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "fb.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"fb": {"file_name": "fb.json",
                                                                 "columns": {"kto_tag": "tag"}}}))
    results, parts, real = {}, [], parts_module.part_groups
    monkeypatch.setattr(parts_module, "part_groups", lambda *a: (parts.append(len(real(*a))), real(*a))[1])
    for most in (0, 10 ** 6):
        monkeypatch.setattr(parts_module, "PART_TOKENS", most)
        results[most] = train(load_config(None, {
            "stage": "kto", "model_name_or_path": str(tiny_model_dir), "dataset": "fb", "dataset_dir": str(folder),
            "cutoff_len": 64, "val_size": 4, "output_dir": str(tmp_path / str(most)),
            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-3,
            "max_steps": 2, "logging_steps": 1, "disable_tqdm": True, "bf16": False, "save_steps": 100}))
    assert parts == [4] * 4 + [1] * 4  # 2 steps of 2 micro-batches of 4 examples
    for key in ("train_loss", "eval_loss", "eval_kl", "eval_rewards/chosen", "eval_logps/chosen"):
        assert results[0][key] == pytest.approx(results[10 ** 6][key], rel=1e-5, abs=1e-7), key


def test_kto_en_demo_loads_and_tags_must_be_booleans(tiny_model_dir, shared_data_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    data = load_config(None, {"stage": "kto", "dataset": "kto_en_demo", "dataset_dir": str(shared_data_dir),
                              "cutoff_len": 128, "max_samples": 20}).data
    examples = load_datasets(data, tokenizer, kind=KTO).train
    assert len(examples) == 20 and {e["kto_tag"] for e in examples} == {0, 1}
    assert all(0 < e["prompt_len"] < len(e["input_ids"]) <= 128 for e in examples)
    replies = [e["input_ids"][e["prompt_len"]:] for e in examples]  # each KL row borrows another record's reply
    assert sum(e["kl_reply"] in replies and e["kl_reply"] != r for e, r in zip(examples, replies)) >= 18
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "f.json").write_text(json.dumps([{"instruction": "Hi", "output": "Hello", "tag": "yes"}]))
    (folder / "dataset_info.json").write_text(json.dumps({"f": {"file_name": "f.json",
                                                                "columns": {"kto_tag": "tag"}}}))
    bad = load_config(None, {"stage": "kto", "dataset": "f", "dataset_dir": str(folder)}).data
    with pytest.raises(DataError, match="column 'tag' \\(kto_tag\\) holds .*not true or false"):
        load_datasets(bad, tokenizer, kind=KTO)


def test_stage_and_data_mismatches_are_named(tiny_model_dir, shared_data_dir):
    tokenizer = load_tokenizer(tiny_model_dir)

    def data(stage, name):
        return load_config(None, {"stage": stage, "dataset": name, "dataset_dir": str(shared_data_dir)}).data
    with pytest.raises(DataError, match="is KTO data .*it needs stage: kto; set stage: kto, or pick an SFT"):
        get_stage("sft").encode(data("sft", "kto_en_demo"), tokenizer, 0)
    with pytest.raises(DataError, match="is not KTO data \\(no kto_tag in its columns\\)"):
        get_stage("kto").encode(data("kto", "identity"), tokenizer, 0)
    with pytest.raises(ConfigError, match="config key 'kto_chosen_weight' is read by stage: kto"):
        load_config(None, {"stage": "dpo", "kto_chosen_weight": 2.0})


def test_a_tiny_run_separates_desirable_from_undesirable_replies(tiny_model_dir, tmp_path):
    polite = ["Thank you, here it is.", "Gladly, happy to help.", "Sure, with pleasure.", "Of course, friend."]
    rude = ["Go away now.", "Stop asking me.", "Leave me alone.", "Not my problem."]
    records = [{"instruction": f"Question number {i}?", "output": (polite if i % 2 else rude)[i // 2 % 4],
                "tag": bool(i % 2)} for i in range(48)]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "fb.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"fb": {"file_name": "fb.json",
                                                                 "columns": {"kto_tag": "tag"}}}))
    out = tmp_path / "kto"
    results = train(load_config(None, {
        "stage": "kto", "model_name_or_path": str(tiny_model_dir), "dataset": "fb", "dataset_dir": str(folder),
        "cutoff_len": 64, "val_size": 8, "output_dir": str(out), "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "max_steps": 12, "logging_steps": 4,
        "disable_tqdm": True, "bf16": False, "save_steps": 6, "pref_beta": 0.5}))
    assert results["eval_loss_before"] == pytest.approx(0.5, abs=1e-3)  # 1 - sigmoid(0) at the start
    assert results["eval_rewards/margins"] > 0.5 > abs(results["eval_rewards/margins_before"])
    assert results["eval_loss"] < results["eval_loss_before"]
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["current_steps"] for e in log if "rewards/margins" in e] == [4, 8, 12]


def test_a_method_with_a_per_forward_term_keeps_micro_batches_whole(tiny_model_dir, batch):
    """lora_moe's router load balance counts each whole forward's tokens: kto does not split them."""
    from transformers import AutoModelForCausalLM

    from tuneforge import LoraMoeConfig
    from tuneforge.adapters import add_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_adapter(model, LoraMoeConfig(r=2, num_experts=2, top_k=1, target_modules=["q_proj", "v_proj"]))
    assert keep_whole(objective_on(model, batch), model).split is None
    plain = tiny_model(tiny_model_dir)
    assert keep_whole(objective_on(plain, batch), plain).split is not None
