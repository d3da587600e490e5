"""Hub datasets honour the model section's hub keys as model loading does: hf_hub_token and
cache_dir reach datasets.load_dataset (and the offline cache look-up), use_modelscope_hub picks
ms_hub_url; offline and absent is still one line. The datasets / ModelScope calls are replaced by
recorders: no network in tests."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import datasets
import pytest

from tuneforge.data import load_datasets
from tuneforge.data.hf_files import dataset_hub, datasets_cache
from tuneforge.errors import DataError

EN = [{"instruction": f"Say {w}", "input": "", "output": w.title()} for w in ("one", "two", "three")]


def _keys(**values):
    return SimpleNamespace(**{"hf_hub_token": None, "cache_dir": None, "use_modelscope_hub": False, **values})


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"hf_hub_url": "org/demo", "ms_hub_url": "ms/demo"}}))
    return folder


@pytest.fixture
def load_calls(monkeypatch):
    """datasets.load_dataset recorded (online: HF_HUB_OFFLINE unset), returning the EN records."""
    calls = []

    def load_dataset(path, **kwargs):
        calls.append({"path": path, **kwargs})
        return datasets.Dataset.from_list(EN)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_token_and_cache_dir_reach_load_dataset(smol, make_args, data, load_calls, tmp_path):
    with dataset_hub(_keys(hf_hub_token="hf_secret", cache_dir=str(tmp_path / "cache"))):
        assert len(load_datasets(make_args(dataset="d", dataset_dir=str(data)), smol).train) == 3
    load_datasets(make_args(dataset="d", dataset_dir=str(data)), smol)  # outside: the defaults
    assert [(c["path"], c["token"], c["cache_dir"]) for c in load_calls] == [
        ("org/demo", "hf_secret", str(tmp_path / "cache")), ("org/demo", None, datasets_cache())]


def test_use_modelscope_hub_reads_ms_hub_url_with_cache_dir(smol, make_args, data, load_calls, monkeypatch, tmp_path):
    calls = []

    class MsDataset:
        @staticmethod
        def load(**kwargs):
            calls.append(kwargs)
            return datasets.Dataset.from_list(EN[:2])

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(MsDataset=MsDataset))
    with dataset_hub(_keys(use_modelscope_hub=True, cache_dir=str(tmp_path / "ms"))):
        assert len(load_datasets(make_args(dataset="d", dataset_dir=str(data)), smol).train) == 2
    assert [(c["dataset_name"], c["cache_dir"]) for c in calls] == [("ms/demo", str(tmp_path / "ms"))]
    assert not load_calls


def test_offline_reads_the_snapshot_in_cache_dir_and_absent_is_one_line(smol, make_args, data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    cache = tmp_path / "cache"
    with dataset_hub(_keys(cache_dir=str(cache))), pytest.raises(DataError) as err:
        load_datasets(make_args(dataset="d", dataset_dir=str(data)), smol)
    assert f"is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set" in str(err.value)
    assert "\n" not in str(err.value)
    snapshot = cache / "datasets--org--demo" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EN))
    (cache / "datasets--org--demo" / "refs").mkdir()
    (cache / "datasets--org--demo" / "refs" / "main").write_text("0" * 40)
    with dataset_hub(_keys(cache_dir=str(cache))):
        assert len(load_datasets(make_args(dataset="d", dataset_dir=str(data)), smol).train) == 3


def test_train_reads_hub_data_with_the_configs_keys(tiny_model_dir, data, load_calls, tmp_path):
    from tuneforge.config import load_config
    from tuneforge.workflows import train

    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "d", "dataset_dir": str(data),
                             "do_train": False, "tokenized_path": str(tmp_path / "tok"), "hf_hub_token": "hf_cfg",
                             "output_dir": str(tmp_path / "out")})
    assert train(cfg)["train_examples"] == 3
    assert [c["token"] for c in load_calls] == ["hf_cfg"]
