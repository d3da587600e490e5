"""stage: rm (reward model): LLaMA-Factory's preference records, a value head on the last real
token, the pairwise loss -log sigmoid(r_chosen - r_rejected), eval accuracy, the value head saved
as value_head.safetensors (LLaMA-Factory's keys) and loaded back to score text."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from tuneforge.config import load_config
from tuneforge.data.encode import encode_conversations
from tuneforge.data.formats import Conversation
from tuneforge.data.loader import load_datasets
from tuneforge.data.pairwise import PAIRWISE, PairwiseCollator
from tuneforge.errors import CheckpointError, ConfigError, DataError
from tuneforge.models import load_tokenizer
from tuneforge.train.heads import (VALUE_HEAD_FILE, add_value_head, load_value_head, save_value_head,
                                   value_scores)
from tuneforge.train.reward import load_reward_model, score
from tuneforge.train.stages import get_stage
from tuneforge.workflows import train


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def gpt(text):
    return {"from": "gpt", "value": text}


def sharegpt_pair(prompt, chosen, rejected, history=()):
    turns = [m for user, reply in history for m in ({"from": "human", "value": user}, gpt(reply))]
    return {"conversations": [*turns, {"from": "human", "value": prompt}], "chosen": gpt(chosen),
            "rejected": gpt(rejected)}


def preference_folder(tmp_path, sharegpt_records=(), alpaca_records=()):
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "pairs.json").write_text(json.dumps(list(sharegpt_records)))
    (folder / "apairs.json").write_text(json.dumps(list(alpaca_records)))
    (folder / "dataset_info.json").write_text(json.dumps({
        "pairs": {"file_name": "pairs.json", "ranking": True, "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "apairs": {"file_name": "apairs.json", "ranking": True,
                   "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                               "rejected": "rejected"}},
        "sft": {"file_name": "apairs.json"}}))
    return folder


def data_cfg(folder, name, **values):
    return load_config(None, {"stage": "rm", "dataset": name, "dataset_dir": str(folder),
                              "cutoff_len": 256, **values}).data


def test_pairs_encode_as_the_template_renders_each_reply(tokenizer, tmp_path):
    folder = preference_folder(
        tmp_path, [sharegpt_pair("Hi?", "Hello!", "Go away.", history=[("Q1", "A1")])],
        [{"instruction": "Add", "input": "1 and 2", "chosen": "3", "rejected": "4"}])
    for name, prompt in (("pairs", [("user", "Q1"), ("assistant", "A1"), ("user", "Hi?")]),
                         ("apairs", [("user", "Add\n1 and 2")])):
        [example] = load_datasets(data_cfg(folder, name), tokenizer, kind=PAIRWISE).train
        messages = [{"role": r, "content": c} for r, c in prompt]
        chosen, rejected = ("Hello!", "Go away.") if name == "pairs" else ("3", "4")
        want = encode_conversations(tokenizer, [
            Conversation([*messages, {"role": "assistant", "content": chosen}]),
            Conversation([*messages, {"role": "assistant", "content": rejected}])], cutoff_len=256)
        assert example == {"chosen_ids": want[0]["input_ids"], "rejected_ids": want[1]["input_ids"]}


def test_unusable_pairs_are_dropped_and_counted(tokenizer, tmp_path, caplog):
    good = sharegpt_pair("Hi?", "Hello!", "No.")
    ends_on_reply = {**good, "conversations": [*good["conversations"], gpt("extra")]}
    empty = sharegpt_pair("Hi?", " ", "No.")
    folder = preference_folder(tmp_path, [good, ends_on_reply, empty, good])
    assert len(load_datasets(data_cfg(folder, "pairs"), tokenizer, kind=PAIRWISE).train) == 2
    assert "dropped 2 of 4" in caplog.text and "does not end on a user turn" in caplog.text


@pytest.mark.parametrize("record, message", [
    ({**sharegpt_pair("Hi?", "a", "b"), "chosen": 5}, "message 0 is a number (5)"),
    ({**sharegpt_pair("Hi?", "a", "b"), "rejected": {"from": "human", "value": "x"}},
     "column 'rejected' is a 'human' message, not a reply ('gpt')"),
    ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": gpt("a")}, "lack the rejected column"),
    ({**sharegpt_pair("Hi?", "a", "b"), "conversations": "Hi"}, "column 'conversations' holds a string"),
])
def test_wrong_types_are_one_line(tokenizer, tmp_path, record, message):
    folder = preference_folder(tmp_path, [record])
    with pytest.raises(DataError) as caught:
        load_datasets(data_cfg(folder, "pairs"), tokenizer, kind=PAIRWISE)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_rm_refuses_data_without_ranking_and_sft_refuses_preference_data(tokenizer, tmp_path):
    folder = preference_folder(tmp_path, [sharegpt_pair("Hi?", "a", "b")])
    with pytest.raises(DataError, match="is not preference data .* set stage: sft"):
        get_stage("rm").encode(data_cfg(folder, "sft"), tokenizer, 0)
    with pytest.raises(DataError, match="it needs stage: rm or dpo; set stage: dpo \\(or rm\\), or pick an SFT"):
        get_stage("sft").encode(load_config(None, {"dataset": "pairs", "dataset_dir": str(folder)}).data,
                                tokenizer, 0)


@pytest.mark.parametrize("key", ["packing", "neat_packing"])
def test_rm_refuses_packing_at_load_time(key):
    with pytest.raises(ConfigError, match=f"config key '{key}' is true, but stage: rm scores whole"):
        load_config(None, {"stage": "rm", key: True})


def test_collator_puts_chosen_rows_first():
    batch = PairwiseCollator(0)([{"chosen_ids": [1, 2, 3], "rejected_ids": [4]},
                                 {"chosen_ids": [5], "rejected_ids": [6, 7]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0], [4, 0, 0], [6, 7, 0]]
    assert batch["attention_mask"].sum(-1).tolist() == [3, 1, 1, 2]


def test_objective_is_the_pairwise_loss_on_the_last_real_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    head = add_value_head(model)
    batch = PairwiseCollator(0)([{"chosen_ids": [5, 6, 7, 8], "rejected_ids": [9, 10]},
                                 {"chosen_ids": [11], "rejected_ids": [12, 13, 14]}])
    objective = get_stage("rm").objective(model, model, batch, None, None)
    loss_sum, n, metrics = objective.loss(model, batch)
    # oracle: each row alone, no padding, the last hidden state through the head
    alone = []
    for row, length in zip(batch["input_ids"], batch["attention_mask"].sum(-1)):
        hidden = model(input_ids=row[None, :length], output_hidden_states=True).hidden_states[-1]
        alone.append(head(hidden[0, -1]).squeeze())
    chosen, rejected = torch.stack(alone[:2]), torch.stack(alone[2:])
    assert n == 2 and objective.count(batch) == 2
    torch.testing.assert_close(loss_sum, -F.logsigmoid(chosen - rejected).sum(), rtol=1e-5, atol=1e-5)
    assert metrics["accuracy"] == int((chosen > rejected).sum())
    loss_sum.backward()
    assert head.summary.weight.grad is not None and head.summary.weight.grad.abs().sum() > 0


def test_value_head_file_has_llama_factory_keys_and_loads_back(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_value_head(model)
    path = save_value_head(model, tmp_path)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"v_head.summary.weight", "v_head.summary.bias"}
        assert f.metadata() == {"format": "pt"}
        assert tuple(f.get_tensor("v_head.summary.weight").shape) == (1, model.config.hidden_size)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_value_head(other, tmp_path)
    torch.testing.assert_close(other.v_head.summary.weight, model.v_head.summary.weight)


def test_damaged_value_heads_are_one_line(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    hidden = model.config.hidden_size
    cases = {
        "none": (None, "has no value_head.safetensors: it is not a reward model"),
        "key": ({"v_head.summary.weight": torch.zeros(1, hidden)}, "lacks v_head.summary.bias"),
        "shape": ({"v_head.summary.weight": torch.zeros(1, hidden + 1),
                   "v_head.summary.bias": torch.zeros(1)}, f"this model's hidden size is {hidden}"),
        "bytes": (b"not a safetensors file", "value head file"),
    }
    for name, (content, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        if isinstance(content, dict):
            save_file(content, str(folder / VALUE_HEAD_FILE))
        elif content is not None:
            (folder / VALUE_HEAD_FILE).write_bytes(content)
        with pytest.raises(CheckpointError) as caught:
            load_value_head(model, folder)
        assert message in str(caught.value) and "\n" not in str(caught.value), name


def rm_values(model_dir, data_dir, dataset, out, **overrides):
    values = {"stage": "rm", "model_name_or_path": str(model_dir), "dataset": dataset,
              "dataset_dir": str(data_dir), "cutoff_len": 96, "val_size": 0.1, "output_dir": str(out),
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
              "learning_rate": 1e-3, "max_steps": 30, "logging_steps": 5, "lora_rank": 8,
              "disable_tqdm": True, "bf16": False, "save_steps": 15}
    return load_config(None, {**values, **overrides})


def test_rm_on_dpo_en_demo_raises_held_out_accuracy(tiny_model_dir, shared_data_dir, tmp_path):
    """(Seeds 1, 2, 3 with lr 1e-3 x 60 steps or 3e-4 x 120 all raise it on the tiny model:
    0.33 -> 0.40, 0.37 -> 0.47, 0.33 -> 0.53, ...; a random value head starts below chance.)"""
    out = tmp_path / "rm"
    results = train(rm_values(tiny_model_dir, shared_data_dir, "dpo_en_demo", out, seed=1,
                              max_steps=60, save_steps=30))
    assert results["eval_accuracy"] > results["eval_accuracy_before"]
    assert results["eval_loss"] < results["eval_loss_before"]
    for where in (out, out / "checkpoint-30"):
        assert (where / VALUE_HEAD_FILE).is_file() and (where / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert {e["current_steps"] for e in log if "eval_accuracy" in e} == {0, 60}


def test_a_trained_reward_model_loads_back_and_scores_as_in_training(tiny_model_dir, tmp_path, tokenizer):
    """A learnable preference (polite replies over rude ones): held-out accuracy rises, and the
    reloaded base + adapter + value head ranks the held-out pairs exactly as the run's eval did."""
    polite = ["Thank you, here it is.", "Gladly, happy to help.", "Sure, with pleasure.", "Of course, friend."]
    rude = ["Go away now.", "Stop asking me.", "Leave me alone.", "Not my problem."]
    records = [sharegpt_pair(f"Question number {i}?", polite[i % 4], rude[i // 4 % 4]) for i in range(48)]
    folder = preference_folder(tmp_path, records)
    out = tmp_path / "rm"
    cfg = rm_values(tiny_model_dir, folder, "pairs", out, val_size=8, max_steps=20, learning_rate=3e-3)
    results = train(cfg)
    assert results["eval_accuracy"] > results["eval_accuracy_before"]
    model, tok = load_reward_model(out, model_name_or_path=str(tiny_model_dir))
    held_out = get_stage("rm").encode(cfg.data, load_tokenizer(tiny_model_dir), cfg.train.seed).eval
    pairs = PairwiseCollator(tok.pad_token_id)(held_out)
    scores = value_scores(model, model, pairs)
    assert (scores[:8] > scores[8:]).float().mean().item() == pytest.approx(results["eval_accuracy"])
    question = {"role": "user", "content": "Question number 3?"}
    good, bad = score(model, tok, [[question, {"role": "assistant", "content": polite[0]}],
                                   [question, {"role": "assistant", "content": rude[0]}]])
    assert good > bad


def test_full_fine_tuning_saves_the_model_without_its_value_head(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    records = [sharegpt_pair(f"Q{i}?", "Yes, gladly.", "No.") for i in range(8)]
    folder = preference_folder(tmp_path, records)
    out = tmp_path / "full"
    train(rm_values(tiny_model_dir, folder, "pairs", out, finetuning_type="full", val_size=0,
                    max_steps=2, save_strategy="no"))
    weights = load_file(str(out / "model.safetensors"))
    assert weights and not any(name.startswith("v_head") for name in weights)
    model, tok = load_reward_model(out)  # a full model folder: no base to name
    assert len(score(model, tok, [[{"role": "user", "content": "Q1?"},
                                   {"role": "assistant", "content": "Yes, gladly."}]])) == 1


def test_resuming_an_rm_run_restores_its_value_head(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    records = [sharegpt_pair(f"Q{i}?", "Yes, gladly.", "No.") for i in range(16)]
    folder = preference_folder(tmp_path, records)
    common = dict(val_size=0, max_steps=4, save_steps=2, lr_scheduler_type="constant")
    train(rm_values(tiny_model_dir, folder, "pairs", tmp_path / "whole", **common))
    train(rm_values(tiny_model_dir, folder, "pairs", tmp_path / "parts", **{**common, "max_steps": 2}))
    train(rm_values(tiny_model_dir, folder, "pairs", tmp_path / "parts", **common,
                    resume_from_checkpoint=True))
    whole, parts = (load_file(str(tmp_path / run / VALUE_HEAD_FILE)) for run in ("whole", "parts"))
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key])


@pytest.mark.parametrize("cutoff", [12, 24, 40])
def test_truncation_keeps_both_replies_and_one_prompt(tokenizer, tmp_path, cutoff):
    """LLaMA-Factory's rule: the budget is split between the prompt and the longer reply; both
    keep the same prompt start and as many reply tokens, so no pair becomes two equal rows."""
    history = [(f"Earlier question {i} " * 4, f"Earlier answer {i} " * 4) for i in range(3)]
    long_pair = sharegpt_pair("Final question? " * 6, "A long and careful answer. " * 8, "No. " * 3,
                              history=history)
    folder = preference_folder(tmp_path, [long_pair])
    [example] = load_datasets(data_cfg(folder, "pairs", cutoff_len=cutoff), tokenizer, kind=PAIRWISE).train
    chosen, rejected = example["chosen_ids"], example["rejected_ids"]
    assert len(chosen) <= cutoff and len(rejected) <= cutoff and chosen != rejected
    full = load_datasets(data_cfg(folder, "pairs", cutoff_len=4096), tokenizer, kind=PAIRWISE).train[0]
    full_chosen, full_rejected = full["chosen_ids"], full["rejected_ids"]
    prompt = first_difference(full_chosen, full_rejected)  # the replies differ from their first token
    kept = first_difference(chosen, rejected)
    assert 0 < kept <= prompt and chosen[:kept] == rejected[:kept] == full_chosen[:kept]
    assert chosen[kept:] == full_chosen[prompt:prompt + len(chosen) - kept]
    assert rejected[kept:] == full_rejected[prompt:prompt + len(rejected) - kept]
    assert len(chosen) - kept == min(len(full_chosen) - prompt, cutoff - kept)  # the longer reply


def first_difference(a, b):
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def test_dpo_en_demo_pairs_all_differ_within_a_short_cutoff(tokenizer, shared_data_dir):
    examples = get_stage("rm").encode(data_cfg(shared_data_dir, "dpo_en_demo", cutoff_len=128),
                                      tokenizer, 0).train
    assert len(examples) == 300
    assert all(e["chosen_ids"] != e["rejected_ids"] and len(e["chosen_ids"]) <= 128 for e in examples)
