"""multitask: true: every example carries the index of its dataset in `dataset:` (its task), and the
padding and packing collators carry it per token as `task_ids`, never as a model input."""

from __future__ import annotations

import json

import pytest

from tuneforge.data import PackingCollator, PaddingCollator, load_datasets
from tuneforge.errors import ConfigError
from tuneforge.train.token_loss import model_inputs


def _write(folder, name, count, prefix):
    records = [{"instruction": f"{prefix} question {i}", "input": "", "output": f"{prefix} answer {i}"}
               for i in range(count)]
    (folder / f"{name}.json").write_text(json.dumps(records))


@pytest.fixture
def tasks_dir(tmp_path):
    _write(tmp_path, "a", 5, "alpha")
    _write(tmp_path, "b", 3, "beta")
    registry = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    return tmp_path


def test_examples_carry_their_dataset_index(smol, make_args, tasks_dir):
    args = make_args(dataset="b,a", dataset_dir=str(tasks_dir), multitask=True, eval_dataset="a")
    splits = load_datasets(args, smol)
    for example in splits.train:  # b is task 0, a is task 1 (the order of dataset:)
        text = smol.decode(example["input_ids"])
        assert example["task_id"] == (0 if "beta" in text else 1)
    assert sorted(e["task_id"] for e in splits.train) == [0] * 3 + [1] * 5
    assert [e["task_id"] for e in splits.eval] == [1] * 5  # eval examples take their training task's id
    plain = load_datasets(make_args(dataset="b,a", dataset_dir=str(tasks_dir)), smol)
    assert all("task_id" not in e for e in plain.train)


def test_collators_carry_task_ids_per_token():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "task_id": 1},
                {"input_ids": [8, 9], "labels": [8, 9], "task_id": 0}]
    padded = PaddingCollator(0)(examples)
    assert padded["task_ids"].tolist() == [[1, 1, 1], [0, 0, 0]]
    packed = PackingCollator()(examples)
    assert packed["task_ids"].tolist() == [[1, 1, 1, 0, 0]]
    assert "task_ids" not in model_inputs(packed) and "task_ids" not in model_inputs(padded)
    assert "task_ids" not in PaddingCollator(0)([{"input_ids": [1], "labels": [1]}])


@pytest.mark.parametrize("overrides, error", [
    ({"dataset": "a"}, "needs two or more datasets"),
    ({"dataset": "a,a"}, "lists a twice"),
    ({"dataset": "a,b", "eval_dataset": "c"}, "'eval_dataset' names c, which is not in dataset"),
])
def test_bad_task_lists_are_refused(smol, make_args, tasks_dir, overrides, error):
    with pytest.raises(ConfigError, match=error):
        load_datasets(make_args(dataset_dir=str(tasks_dir), multitask=True, **overrides), smol)
