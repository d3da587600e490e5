"""mix_strategy interleave_under / interleave_over with interleave_probs: the examples are the
records in the order (and with the repeats) datasets.interleave_datasets gives for the same
records and seed, map-style and streaming; bad probabilities are one ConfigError line."""

from __future__ import annotations

import json
import random

import pytest
from datasets import Dataset, interleave_datasets

from tuneforge.data import load_datasets
from tuneforge.data.mixing import probabilities
from tuneforge.errors import ConfigError

A = [{"instruction": f"Question a{i}", "input": "", "output": f"Item a{i}"} for i in range(7)]
B = [{"instruction": f"Question b{i}", "input": "", "output": f"Item b{i}"} for i in range(3)]
STOP = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}


@pytest.fixture
def two_datasets(tmp_path):
    for name, records in (("a", A), ("b", B)):
        (tmp_path / f"{name}.json").write_text(json.dumps(records))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"},
                                                            "b": {"file_name": "b.json"}}))
    return tmp_path


def _replies(tokenizer, examples) -> list[str]:
    return [tokenizer.decode([t for t in e["labels"] if t != -100]).split("<|im_end|>")[0] for e in examples]


@pytest.mark.parametrize("strategy", sorted(STOP))
def test_interleaved_as_datasets_interleaves(smol, make_args, two_datasets, strategy):
    args = make_args(dataset="a,b", dataset_dir=str(two_datasets), mix_strategy=strategy,
                     interleave_probs="0.6,0.4")
    train = load_datasets(args, smol, seed=5).train
    mixed = interleave_datasets([Dataset.from_list(A), Dataset.from_list(B)], probabilities=[0.6, 0.4], seed=5,
                                stopping_strategy=STOP[strategy])
    expected = list(mixed["output"])
    random.Random(5).shuffle(expected)  # the loader's shuffle of the training examples, as with concat
    assert _replies(smol, train) == expected
    counts = {k: sum(r.startswith(f"Item {k}") for r in expected) for k in "ab"}
    if strategy == "interleave_under":  # stops when one dataset runs out
        assert counts["a"] <= 7 and counts["b"] <= 3 and (counts["a"] == 7 or counts["b"] == 3)
    else:  # until both are seen whole, repeating
        assert counts["a"] >= 7 and counts["b"] >= 3


def test_interleaved_streams(smol, make_args, two_datasets):
    args = make_args(dataset="a,b", dataset_dir=str(two_datasets), mix_strategy="interleave_over",
                     interleave_probs="0.3,0.7", streaming=True, buffer_size=4)
    stream = load_datasets(args, smol, seed=2).train
    mixed = interleave_datasets([Dataset.from_list(A).to_iterable_dataset(),
                                 Dataset.from_list(B).to_iterable_dataset()],
                                probabilities=[0.3, 0.7], seed=2, stopping_strategy="all_exhausted")
    assert _replies(smol, stream.unshuffled()) == [row["output"] for row in mixed]
    assert sorted(_replies(smol, stream.epoch(0))) == sorted(row["output"] for row in mixed)  # then shuffled


@pytest.mark.parametrize("probs, strategy, wrong", [
    ("0.5,0.5", "concat", "set mix_strategy: interleave_under"),
    ("0.2,0.3,0.5", "interleave_under", "gives 3 probabilities for the 2 datasets"),
    ("0.5,0.3", "interleave_over", "sum to 1"),
    ("half,half", "interleave_over", "comma-separated numbers"),
    ("0,1", "interleave_over", "would never end"),
])
def test_bad_probabilities_one_line(make_args, probs, strategy, wrong):
    with pytest.raises(ConfigError) as err:
        probabilities(make_args(mix_strategy=strategy, interleave_probs=probs), ["a", "b"])
    assert wrong in str(err.value) and "\n" not in str(err.value)
    assert probabilities(make_args(mix_strategy="interleave_under", interleave_probs="0,1"), ["a", "b"]) == [0, 1]
