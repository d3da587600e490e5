"""stage: semi (self-training): the unlabelled examples whose top class probability reaches
pseudo_label_threshold join the labelled ones with their predicted class; each round trains anew from
the initial weights through the one loop; per-round counts, pseudo-label accuracy against gold labels
(reported only) and eval accuracy land in train_results.json."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.data.labels import NO_LABEL
from tuneforge.errors import ConfigError
from tuneforge.train.stages.semi import pseudo_label
from tuneforge.workflows import train

from test_cls import toy_records, write


class FirstTokenClassifier(torch.nn.Module):
    """Logits from each row's first token: a table lookup, so the probabilities are known."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_pseudo_labels_are_the_confident_predictions_and_gold_labels_only_count():
    # token 0: p(class 1) = sigmoid(2) ~ 0.88; token 1: p(class 0) ~ 0.62; token 2: p(class 1) ~ 0.98
    model = FirstTokenClassifier(torch.tensor([[0.0, 2.0], [0.5, 0.0], [0.0, 4.0]]))
    examples = [{"input_ids": [0, 5], "label": 1}, {"input_ids": [1], "label": 0},
                {"input_ids": [2, 5, 5], "label": 0}, {"input_ids": [0], "label": NO_LABEL}]
    chosen, gold, right = pseudo_label(model, examples, 9, threshold=0.8, batch_size=3)
    assert chosen == [{"input_ids": [0, 5], "label": 1}, {"input_ids": [2, 5, 5], "label": 1},
                      {"input_ids": [0], "label": 1}]
    assert (gold, right) == (2, 1)
    assert len(pseudo_label(model, examples, 9, threshold=0.5, batch_size=8)[0]) == 4
    assert model.training  # predicting leaves the mode as it was


def semi_cfg(model, data, out, **values):
    return load_config(None, {
        "stage": "semi", "model_name_or_path": str(model), "dataset": "few", "unlabeled_dataset": "pool",
        "eval_dataset": "test", "dataset_dir": str(data), "output_dir": str(out), "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 4, "max_steps": 3, "learning_rate": 5e-3,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "save_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "cutoff_len": 32, "semi_rounds": 2,
        "pseudo_label_threshold": 0.5, **values})


def test_rounds_run_the_loop_from_the_initial_weights_and_report_each_round(tiny_bert_dir, tmp_path):
    data = write(tmp_path / "d", "few", toy_records(8))
    write(data, "pool", [{"text": r["text"]} if i % 2 else r for i, r in enumerate(toy_records(24))])
    write(data, "test", toy_records(12))
    out = tmp_path / "out"
    results = train(semi_cfg(tiny_bert_dir, data, out))
    # threshold 0.5 with two classes: every unlabelled example is pseudo-labelled, every round
    assert results["round_0_pseudo_labelled"] == 0
    assert results["round_1_pseudo_labelled"] == results["round_2_pseudo_labelled"] == 24
    for k in (1, 2):  # half of the pool kept its gold label: the share the teacher got right
        assert 0.0 <= results[f"round_{k}_pseudo_accuracy"] <= 1.0
    assert results["round_2_eval_accuracy"] == results["eval_accuracy"]
    # round 0 and 1 logs in their folders, the last round and the adapter in output_dir
    assert (out / "round_0" / "trainer_log.jsonl").is_file() and (out / "round_1" / "trainer_log.jsonl").is_file()
    assert (out / "adapter_config.json").is_file() and (out / "labels.json").is_file()
    saved = json.loads((out / "train_results.json").read_text())
    assert saved["round_1_pseudo_labelled"] == 24
    # every round starts from the initial weights: the same eval before training
    first = [json.loads(line) for line in (out / "round_0" / "trainer_log.jsonl").read_text().splitlines()]
    last = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    before = [e["eval_loss"] for e in first if "eval_loss" in e][0]
    assert [e["eval_loss"] for e in last if "eval_loss" in e][0] == pytest.approx(before, rel=1e-5)


def bridged(n: int, words: list[list[str]], offset: int) -> list[dict]:
    """Sentiment records whose text holds one word of each list in `words` for its class."""
    kinds = {"pos": [["good", "fine"], ["great", "nice"]], "neg": [["bad", "poor"], ["awful", "sad"]]}
    out = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        text = " ".join(kinds[label][w][(i // 2) % 2] for w in words)
        out.append({"text": f"{text} item {(i + offset) % 7}", "label": label})
    return out


def test_pseudo_labels_teach_what_the_labelled_data_cannot(tiny_bert_dir, tmp_path):
    """The separable toy of self-training: the labelled examples hold only the first word kind
    (good / bad ...), the unlabelled ones both kinds (good great / bad awful ...), the held-out ones only
    the second kind (great / awful ...). Trained on the labelled data alone the classifier guesses on the
    held-out words; the unlabelled examples, labelled right by it through the words it knows, teach the
    next round the new words. (The unlabelled set keeps its gold labels, read for the report only.)"""
    gold = write(tmp_path / "g", "few", bridged(8, [0], 0))
    write(gold, "pool", bridged(64, [0, 1], 1))
    write(gold, "test", bridged(24, [1], 2))
    results = train(semi_cfg(tiny_bert_dir, gold, tmp_path / "out", finetuning_type="full", max_steps=40,
                             semi_rounds=1, pseudo_label_threshold=0.6))
    assert results["round_1_pseudo_labelled"] == 64 and results["round_1_pseudo_accuracy"] == 1.0
    assert results["round_1_eval_accuracy"] >= results["round_0_eval_accuracy"] + 0.25
    assert results["round_1_eval_accuracy"] >= 0.9


def test_semi_without_an_unlabeled_dataset_is_refused(tiny_bert_dir, tmp_path):
    data = write(tmp_path / "d", "few", toy_records(8))
    with pytest.raises(ConfigError, match="stage: semi needs unlabeled_dataset"):
        train(semi_cfg(tiny_bert_dir, data, tmp_path / "out", unlabeled_dataset=None, eval_dataset=None))
