"""stage: semi (self-training): the unlabelled examples whose top class probability reaches
pseudo_label_threshold join the labelled ones with their predicted class; each round trains anew from
the initial weights through the one loop; per-round counts, pseudo-label accuracy against gold labels
(reported only) and eval accuracy land in train_results.json."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train.kill_at import ROUND_MOMENTS
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.data.labels import NO_LABEL
from tuneforge.errors import CheckpointError, ConfigError
from tuneforge.train.stages.semi import as_examples, gold_counts, pseudo_label
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
    pseudo = pseudo_label(model, examples, 9, threshold=0.8, batch_size=3)
    assert [(p["index"], p["label"], p["gold"]) for p in pseudo] == [(0, 1, 1), (2, 1, 0), (3, 1, None)]
    assert [p["confidence"] for p in pseudo] == pytest.approx([torch.sigmoid(torch.tensor(x)).item()
                                                               for x in (2.0, 4.0, 2.0)])
    assert as_examples(pseudo, examples) == [{"input_ids": [0, 5], "label": 1}, {"input_ids": [2, 5, 5], "label": 1},
                                             {"input_ids": [0], "label": 1}]
    assert gold_counts(pseudo) == (2, 1)
    assert len(pseudo_label(model, examples, 9, threshold=0.5, batch_size=8)) == 4
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


# kill -9 at a moment of a semi run (tests/train/kill_at.py ROUND_MOMENTS), the same command again: it resumes
# from the newest checkpoint across the rounds' folders and ends where the uninterrupted run ends
RESUMES_FROM = {"writing round 0's first checkpoint": None,  # only early files: it starts afresh
                "renaming round 1's pseudo-labels into place": "round_0/checkpoint-6",
                "writing round 1's second checkpoint": "round_1/checkpoint-2",
                "writing the last round's second checkpoint": "checkpoint-2"}
ROUND_NUMBERS = [f"round_{k}_{what}" for k in range(3) for what in ("pseudo_labelled", "pseudo_accuracy",
                                                                     "eval_accuracy")]


def write_semi_config(path: Path, model, data, out) -> Path:
    path.write_text(yaml.safe_dump({
        "stage": "semi", "model_name_or_path": str(model), "dataset": "few", "unlabeled_dataset": "pool",
        "eval_dataset": "test", "dataset_dir": str(data), "output_dir": str(out), "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 4, "lora_dropout": 0.1, "max_steps": 6, "save_steps": 2,
        "learning_rate": 5e-3, "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none",
        "disable_tqdm": True, "cutoff_len": 32, "semi_rounds": 2, "pseudo_label_threshold": 0.5,
        "bf16": False}))
    return path


@pytest.fixture(scope="module")
def semi_reference(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("semi-whole")
    data = write(root / "d", "few", toy_records(8))
    write(data, "pool", [{"text": r["text"]} if i % 2 else r for i, r in enumerate(toy_records(16))])
    write(data, "test", toy_records(8))
    assert main(["train", str(write_semi_config(root / "cfg.yaml", tiny_bert_dir, data, root / "run"))]) == 0
    return root


@pytest.mark.parametrize("moment", ROUND_MOMENTS)
def test_semi_resumes_after_kill_9_and_ends_as_the_uninterrupted_run(semi_reference, tiny_bert_dir, tmp_path,
                                                                     moment, capsys):
    out = tmp_path / "run"
    cfg = write_semi_config(tmp_path / "cfg.yaml", tiny_bert_dir, semi_reference / "d", out)
    victim = subprocess.run([sys.executable, str(Path(__file__).with_name("kill_at.py")), moment, "train", str(cfg)],
                            capture_output=True, text=True)
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    assert not (out / "adapter_model.safetensors").exists()

    assert main(["train", str(cfg)]) == 0
    printed = capsys.readouterr().out
    if RESUMES_FROM[moment] is None:
        assert "resumed from" not in printed
    else:
        assert f"resumed from {out / RESUMES_FROM[moment]} at step" in printed
    whole = semi_reference / "run"
    want, got = load_file(str(whole / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    # every round's numbers, the earlier ones read back from their folders
    then, now = (json.loads((run / "train_results.json").read_text()) for run in (whole, out))
    assert {k: now[k] for k in ROUND_NUMBERS} == pytest.approx({k: then[k] for k in ROUND_NUMBERS}, abs=1e-6)
    assert (out / "round_1" / "pseudo_labels.json").read_text() == (whole / "round_1" / "pseudo_labels.json").read_text()
    for folder in (out, out / "round_0", out / "round_1"):
        assert not [p.name for p in folder.iterdir() if p.name.startswith((".tmp", ".trash"))], folder
    # the resumed round's log: its steps once each
    steps = [e["current_steps"] for e in map(json.loads, (out / "round_1" / "trainer_log.jsonl").read_text().splitlines())
             if "loss" in e]
    assert steps == list(range(1, 7))


def test_semi_resume_checks_the_rounds_pseudo_labels_and_folders(semi_reference, tiny_bert_dir, tmp_path, caplog):
    """A resumed round's pseudo-labels are refused, one line naming the file, when they are another round's,
    and an explicit checkpoint must be one of the run's; nothing is written then."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(semi_reference / "run", out)
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_results.json"):
        (out / name).unlink()
    cfg = write_semi_config(tmp_path / "cfg.yaml", tiny_bert_dir, semi_reference / "d", out)
    args = (out / "training_args.yaml").read_bytes()
    data = yaml.safe_load(cfg.read_text())
    # round 2 of 2 in output_dir, resumed as if semi_rounds were 3: output_dir would be round 3
    cfg.write_text(yaml.safe_dump({**data, "semi_rounds": 3}))
    with pytest.raises(CheckpointError, match=r"pseudo_labels.json' holds round 2's pseudo-labels, but with this "
                                              r"semi_rounds that folder is round 3"):
        train(load_config(str(cfg)))
    assert "finished earlier" not in caplog.text and "missing" not in caplog.text  # the refusal comes first
    elsewhere = tmp_path / "other" / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", elsewhere)
    cfg.write_text(yaml.safe_dump({**data, "resume_from_checkpoint": str(elsewhere)}))
    with pytest.raises(CheckpointError, match="is not a checkpoint of this run: a stage that trains in rounds"):
        train(load_config(str(cfg)))
    assert (out / "training_args.yaml").read_bytes() == args
    # a changed threshold: the resumed round keeps the labels it trained on, and says so
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):  # round 1's last checkpoint is the newest
        shutil.rmtree(out / name)
    cfg.write_text(yaml.safe_dump({**data, "pseudo_label_threshold": 0.6}))
    assert main(["train", str(cfg)]) == 0
    assert "semi round 1 resumes on pseudo-labels made at pseudo_label_threshold 0.5" in caplog.text
    assert "0.6 applies from round 2 on" in caplog.text
    assert json.loads((out / "pseudo_labels.json").read_text())["pseudo_label_threshold"] == 0.6
    # starting over clears the earlier attempt's rounds with output_dir's checkpoints
    cfg.write_text(yaml.safe_dump({**data, "overwrite_output_dir": True, "max_steps": 2}))
    assert main(["train", str(cfg)]) == 0
    for folder in (out, out / "round_0", out / "round_1"):
        assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2"], folder
