"""preprocessing_num_workers: tokenization through datasets.map(num_proc=N) gives the same
examples, in the same order, as one process; overwrite_cache reaches the map as
load_from_cache_file=False; what spans records (drops, pt blocks, kto's mismatched replies) stays
in the calling process."""

from __future__ import annotations

import json
import logging

import datasets
import pytest

from tuneforge.data import load_datasets
from tuneforge.data.kto import KTO
from tuneforge.data import workers
from tuneforge.data.text import TEXT

LONG = "word " * 60
RECORDS = [{"instruction": f"Name {i}" + (LONG if i % 3 == 0 else ""), "input": "", "output": f"Item {i}"}
           for i in range(9)]


@pytest.fixture
def mapped(monkeypatch):
    """The keyword arguments of each Dataset.map call."""
    calls, original = [], datasets.Dataset.map

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    monkeypatch.setattr(workers, "cpu_cores", lambda: 4)  # two workers on any machine
    return calls


def test_two_workers_give_the_one_process_examples(smol, make_args, tmp_path, mapped, caplog):
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    args = make_args(dataset="d", dataset_dir=str(tmp_path), cutoff_len=8)
    with caplog.at_level(logging.WARNING):
        alone = load_datasets(args, smol).train
    assert not mapped
    warned = caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        split = load_datasets(make_args(**{**vars(args), "preprocessing_num_workers": 2, "overwrite_cache": True}),
                              smol).train
    assert split == alone and len(alone) == 6  # the three long prompts leave no reply token: dropped
    assert [(c["num_proc"], c["load_from_cache_file"]) for c in mapped] == [(2, False)]
    assert caplog.text.count("dropped 3 of 9") == 1 and warned.count("dropped 3 of 9") == 1


@pytest.mark.parametrize("kind, name", [(TEXT, "c4_demo"), (KTO, "kto_en_demo")])
def test_cross_record_steps_stay_whole(smol, make_args, shared_data, mapped, kind, name):
    args = make_args(dataset=name, dataset_dir=str(shared_data), max_samples=7, cutoff_len=64)
    alone = load_datasets(args, smol, kind=kind).train
    split = load_datasets(make_args(**{**vars(args), "preprocessing_num_workers": 2}), smol, kind=kind).train
    assert split == alone and [c["num_proc"] for c in mapped] == [2]


def test_no_more_workers_than_cores(make_args, monkeypatch):
    monkeypatch.setattr(workers, "cpu_cores", lambda: 2)
    assert [workers.workers(make_args(preprocessing_num_workers=n)) for n in (None, 1, 2, 16)] == [1, 1, 2, 2]
