"""streaming: true: examples read and tokenized lazily, shuffled in a buffer, held out by count;
what cannot stream refused in one line; a short training run on a tiny model."""

from __future__ import annotations

import json

import pytest

from tuneforge.data import load_datasets
from tuneforge.data import streaming as streaming_module
from tuneforge.errors import ConfigError, DataError
from tuneforge.train.batches import StreamBatches

RECORDS = [{"instruction": f"Count to {i}", "input": "", "output": " ".join(str(n) for n in range(1, i + 2))}
           for i in range(12)]


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:7]))
    (folder / "b.json").write_text(json.dumps(RECORDS[7:]))
    (folder / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b.json"}}))
    return folder


def _key(example):
    return tuple(example["input_ids"])


def test_the_stream_holds_the_same_examples_and_holds_out_by_count(smol, make_args, data_dir):
    whole = load_datasets(make_args(dataset="a,b", dataset_dir=str(data_dir)), smol).train
    splits = load_datasets(make_args(dataset="a,b", dataset_dir=str(data_dir), streaming=True, buffer_size=4,
                                     val_size=3), smol)
    held = [_key(e) for e in splits.eval]
    first_pass = [_key(e) for e in splits.train.epoch(0)]
    assert sorted(held + first_pass) == sorted(_key(e) for e in whole)
    in_order = [_key(e) for e in load_datasets(make_args(dataset="a", dataset_dir=str(data_dir), cutoff_len=2048),
                                               smol).train]
    assert set(held) <= set(in_order) and not set(held) & set(first_pass)  # the first 3 of a, never trained on
    assert [_key(e) for e in splits.train.epoch(0)] == first_pass  # seeded
    assert [_key(e) for e in splits.train.epoch(1)] != first_pass  # each pass reshuffled


def test_records_are_read_lazily_and_a_bad_line_is_named_when_met(smol, make_args, data_dir, monkeypatch):
    monkeypatch.setattr(streaming_module, "CHUNK", 2)
    (data_dir / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2) + "[1, 2]\n")
    stream = load_datasets(make_args(dataset="a", dataset_dir=str(data_dir), streaming=True, buffer_size=1),
                           smol).train
    examples = iter(stream.epoch(0))
    assert len([next(examples) for _ in range(4)]) == 4  # read before the bad line is reached
    with pytest.raises(DataError, match=r"a.jsonl' line 25\): expected a JSON object, found a list"):
        list(examples)


def test_batches_replay_the_same_stream_when_resumed(smol, make_args, data_dir):
    stream = load_datasets(make_args(dataset="a,b", dataset_dir=str(data_dir), streaming=True, buffer_size=3),
                           smol).train

    def collate(examples):
        return [_key(e) for e in examples]

    batches = StreamBatches(stream, 5, collate)
    run = [batches.get(j) for j in range(5)]  # 25 examples: past the 12 of one pass
    assert StreamBatches(stream, 5, collate).get(3) == run[3] and batches.get(1) == run[1]
    assert batches.epoch_of(0) >= 0 and len({e for b in run[:2] for e in b}) == 10


@pytest.mark.parametrize("values,message", [
    ({"val_size": 0.1}, "val_size must be a number of examples (1 or more), not a fraction (got 0.1)"),
    ({"max_samples": 5}, "max_samples does not apply with streaming: true"),
    ({"tokenized_path": "tok"}, "tokenized_path saves the whole tokenized data set"),
    ({"max_steps": -1}, "streaming: true needs max_steps"),
])
def test_what_cannot_stream_is_refused_in_one_line(values, message):
    from tuneforge.config import load_config

    with pytest.raises(ConfigError) as caught:
        load_config(None, {"dataset": "identity", "streaming": True, "max_steps": 5, **values})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_short_streaming_training_run(tiny_model_dir, data_dir, tmp_path):
    from tuneforge.config import load_config
    from tuneforge.workflows import train

    out = tmp_path / "out"
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "a,b",
                             "dataset_dir": str(data_dir), "output_dir": str(out), "streaming": True,
                             "buffer_size": 4, "max_steps": 3, "per_device_train_batch_size": 2,
                             "gradient_accumulation_steps": 1, "val_size": 2, "cutoff_len": 64,
                             "logging_steps": 1, "eval_on_start": False, "save_steps": 2})
    results = train(cfg)
    assert results["global_step"] == 3 and results["train_loss"] > 0
    assert (out / "adapter_model.safetensors").is_file()
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["data"]["examples"].startswith("stream-")
