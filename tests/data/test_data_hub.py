"""Hub datasets (hf_hub_url with subset / split / folder; ms_hub_url) through HF datasets, read
offline from a Hugging Face cache laid out on disk (no network in tests)."""

from __future__ import annotations

import json
import sys

import pytest

from tuneforge.data import load_datasets
from tuneforge.errors import DataError

EN = [{"instruction": f"Say {w}", "input": "", "output": w.title()} for w in ("one", "two", "three")]
EN_VAL = [{"instruction": "Say four", "input": "", "output": "Four"}]
ZH = [{"instruction": "说你好", "input": "", "output": "你好"}]
README = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train.jsonl
  - split: validation
    path: en/validation.jsonl
- config_name: zh
  data_files:
  - split: train
    path: zh/train.jsonl
---
"""


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An HF_HOME whose hub cache holds dataset org/demo (as `hf download --repo-type dataset` leaves it)."""
    home = tmp_path / "hf"
    repo = home / "hub" / "datasets--org--demo"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    _jsonl(snapshot / "en" / "train.jsonl", EN)
    _jsonl(snapshot / "en" / "validation.jsonl", EN_VAL)
    _jsonl(snapshot / "zh" / "train.jsonl", ZH)
    (snapshot / "README.md").write_text(README)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    for name in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "USE_MODELSCOPE_HUB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    data.mkdir()
    return data


def _register(folder, entries):
    (folder / "dataset_info.json").write_text(json.dumps(entries))


def _replies(tokenizer, examples):
    return sorted(tokenizer.decode([t for t in e["labels"] if t != -100]).removesuffix("<|im_end|>")
                  for e in examples)


def test_subsets_splits_and_folders_from_the_cache(smol, make_args, hub):
    _register(hub, {"en": {"hf_hub_url": "org/demo", "subset": "en"},
                    "en_val": {"hf_hub_url": "org/demo", "subset": "en", "split": "validation"},
                    "zh": {"hf_hub_url": "org/demo", "subset": "zh"},
                    "zh_folder": {"hf_hub_url": "org/demo", "folder": "zh"},
                    "ref": {"file_name": "ref.jsonl"}})
    _jsonl(hub / "ref.jsonl", EN)
    splits = load_datasets(make_args(dataset="en", eval_dataset="en_val", dataset_dir=str(hub)), smol)
    assert _replies(smol, splits.train) == ["One", "Three", "Two"] and _replies(smol, splits.eval) == ["Four"]
    assert splits.train == load_datasets(make_args(dataset="ref", dataset_dir=str(hub)), smol).train
    assert _replies(smol, load_datasets(make_args(dataset="zh", dataset_dir=str(hub)), smol).train) == ["你好"]
    assert _replies(smol, load_datasets(make_args(dataset="zh_folder", dataset_dir=str(hub)), smol).train) == ["你好"]
    assert len(load_datasets(make_args(dataset="en", dataset_dir=str(hub), max_samples=2), smol).train) == 2


def test_a_hub_url_wins_over_file_name_as_in_llamafactory(smol, make_args, hub):
    _jsonl(hub / "local.jsonl", ZH)
    _register(hub, {"d": {"hf_hub_url": "org/demo", "subset": "en", "file_name": "local.jsonl"}})
    assert _replies(smol, load_datasets(make_args(dataset="d", dataset_dir=str(hub)), smol).train) == \
        ["One", "Three", "Two"]


@pytest.mark.parametrize("entry,expected", [
    ({"hf_hub_url": "org/absent"},
     "dataset 'd' (hf_hub_url 'org/absent') is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
     "check hf_hub_url, load it once where there is network (`hf download org/absent --repo-type dataset`), or "
     "save it as a file in '{data}' and register it with file_name"),
    ({"hf_hub_url": "org/demo", "subset": "fr"},
     "dataset 'd' (hf://datasets/org/demo, subset 'fr', split 'train') could not be loaded (ValueError: "
     "BuilderConfig 'fr' not found. Available: ['en', 'zh']); check hf_hub_url, subset, split and folder in "
     "'{data}/dataset_info.json'"),
    ({"hf_hub_url": "org/demo", "subset": 3}, "dataset 'd' in '{data}/dataset_info.json': subset must be a "
     "non-empty name (a string), found a number (3)"),
    ({"file_name": "ref.jsonl", "split": "validation"}, "dataset 'd' in '{data}/dataset_info.json': split "
     "'validation' names a split of a hub dataset, and a file is read as its one \"train\" split"),
    ({"om_hub_url": "org/demo"}, "om_hub_url: LLaMA-Factory's Modelers (OpenMind) hub is not supported; convert"),
    ({"script_url": "demo"}, "script_url: dataset loading scripts are not supported"),
    ({"cloud_file_name": "s3://bucket/d.json"}, "cloud_file_name: LLaMA-Factory's S3 / GCS files are not supported"),
])
def test_hub_problems_are_one_line(smol, make_args, hub, entry, expected):
    _register(hub, {"d": entry})
    with pytest.raises(DataError) as caught:
        load_datasets(make_args(dataset="d", dataset_dir=str(hub)), smol)
    message = str(caught.value)
    assert expected.format(cache=hub.parent / "hf" / "hub", data=hub) in message and "\n" not in message


def test_modelscope_needs_its_package(smol, make_args, hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    _register(hub, {"d": {"hf_hub_url": "org/demo", "ms_hub_url": "org/demo", "subset": "en"}})
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    with pytest.raises(DataError, match=r"^dataset 'd' is read from ModelScope \(ms_hub_url 'org/demo'\), which "
                       r"needs the modelscope package: `pip install modelscope`"):
        load_datasets(make_args(dataset="d", dataset_dir=str(hub)), smol)
    monkeypatch.delenv("USE_MODELSCOPE_HUB")  # without it the hf_hub_url is read
    assert len(load_datasets(make_args(dataset="d", dataset_dir=str(hub)), smol).train) == 3
