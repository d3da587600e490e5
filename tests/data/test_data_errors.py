"""Bad input: each problem is one DataError line that names the file/line/field and what to do."""

from __future__ import annotations

import json

import pytest

from tuneforge.data import load_datasets
from tuneforge.errors import ConfigError, DataError

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


@pytest.fixture
def folder(tmp_path):
    def make(files: dict[str, str], registry: dict | None = None):
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        if registry is not None:
            (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
        return str(tmp_path)
    return make


def load_error(smol, make_args, exc=DataError, **args) -> str:
    with pytest.raises(exc) as err:
        load_datasets(make_args(**args), smol)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_dataset_file(smol, make_args, folder):
    where = folder({}, {"mine": {"file_name": "mine.json"}})
    message = load_error(smol, make_args, dataset="mine", dataset_dir=where)
    assert "mine.json' not found" in message and "file_name" in message


def test_unknown_dataset_name_suggests_close_names(smol, make_args, folder):
    where = folder({"x.json": json.dumps([GOOD])}, {"alpaca_mine": {"file_name": "x.json"}})
    message = load_error(smol, make_args, dataset="alpaca_mien", dataset_dir=where)
    assert "'alpaca_mien' is not in" in message and "dataset_info.json" in message and "alpaca_mine" in message


def test_missing_dataset_info(smol, make_args, tmp_path):
    message = load_error(smol, make_args, dataset="x", dataset_dir=str(tmp_path))
    assert "has no dataset_info.json" in message and "dataset_dir" in message
    message = load_error(smol, make_args, dataset="x", dataset_dir=str(tmp_path / "nowhere"))
    assert "does not exist" in message


def test_a_demo_set_of_llama_factory_says_where_to_get_it(smol, make_args, tmp_path, monkeypatch):
    """The examples' datasets (dpo_en_demo, alpaca_en_demo, ...) are LLaMA-Factory's: a dataset_dir
    that is not there, or none (tuneforge's own demo data), says where they are, not "add it there"."""
    monkeypatch.chdir(tmp_path)  # no ./data here: dataset_dir unset reads the demo data tuneforge ships
    where = "set dataset_dir to a copy of LLaMA-Factory's data/ folder ("
    message = load_error(smol, make_args, dataset="dpo_en_demo")
    assert "'dpo_en_demo' is not in" in message and "dpo_en_demo is one of LLaMA-Factory's demo datasets" in message
    assert where in message and "dataset_dir=path/to/LLaMA-Factory/data" in message and "add it there" not in message
    message = load_error(smol, make_args, dataset="identity,alpaca_en_demo", dataset_dir="data")
    assert message.startswith("dataset_dir 'data' does not exist: alpaca_en_demo is one of LLaMA-Factory's")
    assert where in message
    message = load_error(smol, make_args, dataset="mine")  # not theirs: a folder of the user's
    assert "set dataset_dir to the folder whose dataset_info.json registers it" in message
    message = load_error(smol, make_args, dataset="mine", dataset_dir="data")
    assert "set dataset_dir to the folder holding dataset_info.json" in message


def test_malformed_json_reports_line_and_column(smol, make_args, folder):
    where = folder({"bad.json": '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]'},
                   {"bad": {"file_name": "bad.json"}})
    message = load_error(smol, make_args, dataset="bad", dataset_dir=where)
    assert "bad.json" in message and "line 3, column 23" in message


def test_malformed_dataset_info(smol, make_args, tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "a.json",}\n}')
    message = load_error(smol, make_args, dataset="a", dataset_dir=str(tmp_path))
    assert "dataset_info.json" in message and "line 2, column 31" in message


def test_malformed_jsonl_reports_the_line(smol, make_args, folder):
    lines = [json.dumps(GOOD)] * 4 + ['{"instruction": "oops"'] + [json.dumps(GOOD)]
    where = folder({"d.jsonl": "\n".join(lines)}, {"d": {"file_name": "d.jsonl"}})
    message = load_error(smol, make_args, dataset="d", dataset_dir=where)
    assert "d.jsonl': malformed JSON at line 5, column 23" in message and "fix that line" in message


def test_json_lines_in_a_json_file_are_accepted(smol, make_args, folder):
    where = folder({"d.json": "\n".join([json.dumps(GOOD)] * 3)}, {"d": {"file_name": "d.json"}})
    assert len(load_datasets(make_args(dataset="d", dataset_dir=where), smol).train) == 3


def test_missing_columns_reports_count_and_first_index(smol, make_args, folder):
    records = [GOOD, GOOD, {"instruction": "no answer"}, GOOD, {"instruction": "none"}, {"prompt": "x"}]
    where = folder({"d.json": json.dumps(records)}, {"d": {"file_name": "d.json"}})
    message = load_error(smol, make_args, dataset="d", dataset_dir=where)
    assert "2 of 6 records lack the response column 'output'" not in message  # prompt is checked first
    assert "1 of 6 records lack the prompt column 'instruction' (first: " in message and "d.json' record 5)" in message
    where = folder({"e.json": json.dumps(records[:5])}, {"e": {"file_name": "e.json"}})
    message = load_error(smol, make_args, dataset="e", dataset_dir=where)
    assert "2 of 5 records lack the response column 'output' (first: " in message and "e.json' record 2)" in message
    assert "columns" in message


def test_sharegpt_missing_messages_column(smol, make_args, folder):
    where = folder({"s.json": json.dumps([{"conversations": []}, {"messages": []}])},
                   {"s": {"file_name": "s.json", "formatting": "sharegpt"}})
    message = load_error(smol, make_args, dataset="s", dataset_dir=where)
    assert "1 of 2 records lack the messages column 'conversations' (first: " in message
    assert "s.json' record 1)" in message


def test_sharegpt_unknown_role_names_the_record_and_tags(smol, make_args, folder):
    convo = {"conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    where = folder({"s.json": json.dumps([convo])}, {"s": {"file_name": "s.json", "formatting": "sharegpt"}})
    message = load_error(smol, make_args, dataset="s", dataset_dir=where)
    assert "record 0" in message and "'user'" in message and "user_tag" in message


def test_malformed_tools_column(smol, make_args, folder):
    convo = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "tools": "[{oops"}
    where = folder({"s.json": json.dumps([convo])},
                   {"s": {"file_name": "s.json", "formatting": "sharegpt", "columns": {"tools": "tools"}}})
    message = load_error(smol, make_args, dataset="s", dataset_dir=where)
    assert "record 0" in message and "'tools'" in message and "JSON" in message


def test_empty_file(smol, make_args, folder):
    where = folder({"d.json": "[]"}, {"d": {"file_name": "d.json"}})
    assert "has no records" in load_error(smol, make_args, dataset="d", dataset_dir=where)


def test_empty_after_filtering(smol, make_args, folder):
    where = folder({"d.json": json.dumps([{"instruction": "q", "output": ""}] * 3)}, {"d": {"file_name": "d.json"}})
    message = load_error(smol, make_args, dataset="d", dataset_dir=where)
    assert "none of its 3 records is a usable conversation" in message


def test_empty_after_cutoff(smol, make_args, folder):
    where = folder({"d.json": json.dumps([GOOD] * 2)}, {"d": {"file_name": "d.json"}})
    message = load_error(smol, make_args, dataset="d", dataset_dir=where, cutoff_len=1)
    assert "cutoff_len=1" in message and "raise cutoff_len" in message


def test_hub_only_entries_offline_and_absent(smol, make_args, shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    message = load_error(smol, make_args, dataset="alpaca_en", dataset_dir=str(shared_data))
    assert message.startswith("dataset 'alpaca_en' (hf_hub_url 'llamafactory/alpaca_en') is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in message and "file_name" in message


def test_preference_and_kto_data_need_other_stages(smol, make_args, shared_data):
    assert "stage: rm or dpo" in load_error(smol, make_args, dataset="dpo_en_demo", dataset_dir=str(shared_data))
    assert "stage: kto" in load_error(smol, make_args, dataset="kto_en_demo", dataset_dir=str(shared_data))


@pytest.mark.parametrize("name", ["c4_demo", "wiki_demo"])
def test_pretraining_text_needs_stage_pt(smol, make_args, shared_data, name):
    assert "pretraining datasets need stage: pt" in load_error(smol, make_args, dataset=name,
                                                              dataset_dir=str(shared_data))


def test_no_dataset_given(smol, make_args):
    assert "set dataset:" in load_error(smol, make_args, dataset=None)


def test_val_size_that_leaves_nothing_to_train(smol, make_args, folder):
    where = folder({"d.json": json.dumps([GOOD] * 3)}, {"d": {"file_name": "d.json"}})
    assert "lower val_size" in load_error(smol, make_args, dataset="d", dataset_dir=where, val_size=3)


def test_eval_dataset_and_val_size_conflict(smol, make_args, folder):
    where = folder({"d.json": json.dumps([GOOD] * 3)}, {"d": {"file_name": "d.json"}})
    load_error(smol, make_args, ConfigError, dataset="d", eval_dataset="d", val_size=0.5, dataset_dir=where)


def test_unknown_template_in_load_datasets(smol, make_args, folder):
    where = folder({"d.json": json.dumps([GOOD])}, {"d": {"file_name": "d.json"}})
    message = load_error(smol, make_args, ConfigError, dataset="d", dataset_dir=where, template="nope")
    assert "alpaca" in message and "chatml" in message


def test_bare_text_records_are_pretraining(smol, make_args, folder):
    where = folder({"t.jsonl": '{"text": "Once upon a time."}\n'}, {"t": {"file_name": "t.jsonl"}})
    assert "need stage: pt" in load_error(smol, make_args, dataset="t", dataset_dir=where)


def test_wrong_column_names_are_not_mistaken_for_pretraining(smol, make_args, folder):
    where = folder({"d.json": json.dumps([{"instruction": "q", "answer": "a"}])}, {"d": {"file_name": "d.json"}})
    message = load_error(smol, make_args, dataset="d", dataset_dir=where)
    assert "lack the response column 'output' (first: " in message and "d.json' record 0)" in message
