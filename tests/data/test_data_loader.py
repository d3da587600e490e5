"""load_datasets on LLaMA-Factory's demo data (unchanged) and on tuneforge's shipped demo data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tuneforge.data import DatasetSplits, default_dataset_dir, load_datasets

PLACEHOLDERS = {"name": "Forge", "author": "Ada Labs"}


def decode_labels(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != -100])


def write_alpaca(folder: Path, name: str, count: int, prefix: str) -> None:
    records = [{"instruction": f"{prefix} question {i}", "input": "", "output": f"{prefix} answer {i}"}
               for i in range(count)]
    (folder / f"{name}.json").write_text(json.dumps(records))


@pytest.fixture
def two_datasets(tmp_path):
    write_alpaca(tmp_path, "a", 10, "alpha")
    write_alpaca(tmp_path, "b", 6, "beta")
    registry = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    return tmp_path


def test_alpaca_en_demo_loads_fast(smol, make_args, shared_data):
    start = time.perf_counter()
    splits = load_datasets(make_args(dataset="alpaca_en_demo", dataset_dir=str(shared_data)), smol)
    elapsed = time.perf_counter() - start
    assert isinstance(splits, DatasetSplits) and splits.eval is None
    assert len(splits.train) == 999 and elapsed < 20
    for example in splits.train[:50]:
        assert set(example) == {"input_ids", "labels"} and len(example["input_ids"]) == len(example["labels"])
        assert decode_labels(smol, example).endswith("<|im_end|>")


def test_identity_with_placeholders(smol, make_args, shared_data):
    splits = load_datasets(make_args(dataset="identity", dataset_dir=str(shared_data), placeholders=PLACEHOLDERS), smol)
    assert len(splits.train) == 91
    texts = [smol.decode(e["input_ids"]) for e in splits.train]
    assert not any("{{" in t for t in texts)
    assert sum("Forge" in t for t in texts) > 70 and any("Ada Labs" in t for t in texts)


def test_placeholders_missing_keys_are_left_alone(smol, make_args, shared_data):
    splits = load_datasets(make_args(dataset="identity", dataset_dir=str(shared_data), placeholders={"name": "Forge"}),
                           smol)
    texts = [smol.decode(e["input_ids"]) for e in splits.train]
    assert any("{{author}}" in t for t in texts) and not any("{{name}}" in t for t in texts)


def test_glaive_toolcall_with_function_calls_and_observations(smol, make_args, shared_data, spans):
    splits = load_datasets(make_args(dataset="glaive_toolcall_en_demo", dataset_dir=str(shared_data)), smol)
    assert len(splits.train) == 300
    calls = [e for e in splits.train if "<|im_start|>tool\n" in smol.decode(e["input_ids"])]
    assert calls
    example = calls[0]
    text = smol.decode(example["input_ids"])
    assert "You can call the following tools" in text.split("<|im_end|>")[0]  # tools described in the system turn
    replies = [smol.decode(s) for s in spans(example)]
    assert any(r.startswith('{"name": ') for r in replies)  # the function call is an assistant reply
    assert all("<|im_start|>" not in r for r in replies)  # observations and prompts are masked


def test_cutoff_len_and_max_samples(smol, make_args, shared_data):
    splits = load_datasets(make_args(dataset="alpaca_en_demo", dataset_dir=str(shared_data), cutoff_len=48,
                                     max_samples=40), smol)
    assert len(splits.train) == 40
    assert max(len(e["input_ids"]) for e in splits.train) == 48
    assert all(any(label != -100 for label in e["labels"]) for e in splits.train)


def test_val_size_fraction_and_count(smol, make_args, two_datasets):
    args = make_args(dataset="a,b", dataset_dir=str(two_datasets))
    fraction = load_datasets(make_args(**{**vars(args), "val_size": 0.25}), smol)
    assert (len(fraction.train), len(fraction.eval)) == (12, 4)
    count = load_datasets(make_args(**{**vars(args), "val_size": 5}), smol)
    assert (len(count.train), len(count.eval)) == (11, 5)
    all_ids = sorted(tuple(e["input_ids"]) for e in count.train + count.eval)
    assert all_ids == sorted(tuple(e["input_ids"]) for e in load_datasets(args, smol).train)


def test_mixing_is_concatenation_shuffled_by_seed(smol, make_args, two_datasets):
    args = make_args(dataset="a, b", dataset_dir=str(two_datasets))
    first = load_datasets(args, smol, seed=1).train
    answers = [decode_labels(smol, e) for e in first]
    assert len(first) == 16
    assert sum(a.startswith("alpha") for a in answers) == 10 and sum(a.startswith("beta") for a in answers) == 6
    assert answers[:10] != sorted(answers[:10]) or answers[10:] != sorted(answers[10:])  # shuffled, not stacked
    assert [e["input_ids"] for e in load_datasets(args, smol, seed=1).train] == [e["input_ids"] for e in first]
    assert [e["input_ids"] for e in load_datasets(args, smol, seed=2).train] != [e["input_ids"] for e in first]


def test_max_samples_applies_to_each_dataset(smol, make_args, two_datasets):
    splits = load_datasets(make_args(dataset="a,b", dataset_dir=str(two_datasets), max_samples=4), smol)
    answers = sorted(decode_labels(smol, e) for e in splits.train)
    assert [a.split("<")[0] for a in answers] == [f"alpha answer {i}" for i in range(4)] + [
        f"beta answer {i}" for i in range(4)]


def test_eval_dataset_replaces_val_size(smol, make_args, two_datasets):
    splits = load_datasets(make_args(dataset="a", eval_dataset="b", dataset_dir=str(two_datasets)), smol)
    assert len(splits.train) == 10 and len(splits.eval) == 6
    assert all(decode_labels(smol, e).startswith("beta") for e in splits.eval)


def test_named_template_through_load_datasets(smol, make_args, two_datasets):
    splits = load_datasets(make_args(dataset="a", dataset_dir=str(two_datasets), template="alpaca"), smol)
    text = smol.decode(splits.train[0]["input_ids"])
    assert text.startswith("Below is an instruction") and "### Response:\n" in text
    assert smol.chat_template.startswith("{%- set ns")  # chat will render with the same template


def test_jsonl_and_sharegpt_with_role_content_tags(smol, make_args, tmp_path, spans, caplog):
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "goodbye"}]
    # a conversation ending on a user turn is dropped whole, as LLaMA-Factory does, and said
    lines = [{"messages": chat}, {"messages": chat + [{"role": "user", "content": "dangling"}]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": {
        "file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    train = load_datasets(make_args(dataset="chat", dataset_dir=str(tmp_path)), smol).train
    assert len(train) == 1
    assert "dropped 1 of 2 examples of 'chat': 1 ending on a user turn with no reply (first: " in caplog.text
    assert "chat.jsonl' line 2)" in caplog.text
    example = train[0]
    text = smol.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>") and "dangling" not in text
    assert [smol.decode(s) for s in spans(example)] == ["hello<|im_end|>", "goodbye<|im_end|>"]


def test_alpaca_history_and_system_columns(smol, make_args, tmp_path, spans):
    record = {"q": "And 3+3?", "a": "6", "sys": "Math tutor.", "hist": [["2+2?", "4"]]}
    (tmp_path / "h.json").write_text(json.dumps([record]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"h": {
        "file_name": "h.json", "columns": {"prompt": "q", "response": "a", "system": "sys", "history": "hist"}}}))
    example = load_datasets(make_args(dataset="h", dataset_dir=str(tmp_path)), smol).train[0]
    expected_start = "<|im_start|>system\nMath tutor.<|im_end|>\n<|im_start|>user\n2+2?"
    assert smol.decode(example["input_ids"]).startswith(expected_start)
    assert [smol.decode(s) for s in spans(example)] == ["4<|im_end|>", "6<|im_end|>"]


def test_shipped_demo_data_loads(smol, make_args, spans):
    folder = default_dataset_dir()
    assert (folder / "dataset_info.json").is_file() and (folder / "README.md").is_file()
    registry = json.loads((folder / "dataset_info.json").read_text())
    assert {"identity", "general_demo", "chat_demo"} <= set(registry)
    splits = load_datasets(make_args(dataset="identity,general_demo,chat_demo", dataset_dir=str(folder),
                                     placeholders=PLACEHOLDERS, val_size=0.1), smol)
    assert len(splits.train) + len(splits.eval) == 76 + 51 + 10
    texts = [smol.decode(e["input_ids"]) for e in splits.train + splits.eval]
    assert not any("{{" in t for t in texts)
    identity = json.loads((folder / "identity.json").read_text())
    assert all("{{name}}" in r["output"] for r in identity)
    assert any(len(spans(e)) > 1 for e in splits.train + splits.eval)  # multi-turn sharegpt conversations


def test_default_dataset_dir_prefers_local_data(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="tuneforge"):
        assert default_dataset_dir().name == "data" and "resources" in default_dataset_dir().parts
    said = [r.getMessage() for r in caplog.records if "bundled with tuneforge" in r.getMessage()]
    assert said and "(chat_demo, general_demo, identity)" in said[0]  # not silently
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text("{}")
    caplog.clear()
    with caplog.at_level("INFO", logger="tuneforge"):
        assert default_dataset_dir() == (tmp_path / "data").resolve()
    assert not [r for r in caplog.records if "bundled" in r.getMessage()]


def test_field_names_match_the_config_dataclass(smol, two_datasets):
    config = pytest.importorskip("tuneforge.config")
    args = config.DataArguments(dataset="a", dataset_dir=str(two_datasets), val_size=0.2)
    splits = load_datasets(args, smol)
    assert (len(splits.train), len(splits.eval)) == (8, 2)


def test_csv_files_and_folders_of_files(smol, make_args, tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "1.csv").write_text("instruction,input,output\nSay hi,,Hi!\nSay bye,,Bye!\n")
    (tmp_path / "parts" / "2.jsonl").write_text(json.dumps({"instruction": "Count", "output": "1 2 3"}) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"parts": {"file_name": "parts"}}))
    train = load_datasets(make_args(dataset="parts", dataset_dir=str(tmp_path)), smol).train
    assert sorted(decode_labels(smol, e) for e in train) == ["1 2 3<|im_end|>", "Bye!<|im_end|>", "Hi!<|im_end|>"]
