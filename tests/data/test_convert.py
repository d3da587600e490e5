"""`tuneforge convert-data`: other column names -> LLaMA-Factory alpaca / sharegpt records that the
data loader reads, the dataset_info.json entry, and nothing overwritten."""

from __future__ import annotations

import json

import pytest

from tuneforge.cli import main
from tuneforge.data.formats import to_conversations
from tuneforge.data.readers import read_records
from tuneforge.data.registry import get_entry, load_registry

QA = [{"question": "What is 2+2?", "answer": "4"},
      {"question": "Capital of France?", "answer": "Paris", "context": "geography", "system": "Be brief."}]


def _loaded(folder, name):
    entry = get_entry(folder, load_registry(folder), name)
    return [c.messages for c in to_conversations(entry, read_records(entry))]


@pytest.mark.parametrize("to", ["alpaca", "sharegpt"])
def test_question_answer_json_becomes_records_the_loader_reads(tmp_path, capsys, to):
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    assert main(["convert-data", str(tmp_path / "qa.json"), str(tmp_path / "out.json"), "--to", to,
                 "--register"]) == 0
    out = capsys.readouterr().out
    assert "instruction <- 'question', input <- 'context', output <- 'answer', system <- 'system'" in out
    assert "wrote 2" in out and "dataset: out" in out
    messages = _loaded(tmp_path, "out")
    assert messages[0] == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert messages[1] == [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Capital of France?\ngeography"},
                           {"role": "assistant", "content": "Paris"}]


def test_csv_with_named_columns_to_jsonl(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("prompt_text,reply\nhi,hello\n\"a, b\",c\n")
    assert main(["convert-data", str(tmp_path / "pairs.csv"), str(tmp_path / "p.jsonl"),
                 "--map", "instruction=prompt_text", "--map", "output=reply"]) == 0
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line)["instruction"] for line in lines] == ["hi", "a, b"]
    assert 'dataset_info.json entry: {"p": {"file_name": "p.jsonl"}}' in capsys.readouterr().out


@pytest.mark.parametrize("setup, argv, message", [
    ("exists", ["qa.json", "out.json"], "'out.json' exists; choose another output name"),
    ("", ["qa.json", "out.txt"], "must end in .json or .jsonl"),
    ("", ["qa.json", "out.json", "--map", "prompt=question"], "--map prompt=...: the keys are"),
    ("", ["qa.json", "out.json", "--map", "output=reply"], "no record has a column 'reply'"),
    ("", ["qa.json", "out.json", "--map", "output"], "must look like key=column"),
    ("noanswer", ["qa.json", "out.json"], "no column for 'output' among 'question'"),
    ("blank", ["qa.json", "out.json"], "record 1 has no 'answer' text (the output)"),
    ("registered", ["qa.json", "out.json", "--register"], "already has a dataset named 'out'; pass --name"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys, monkeypatch, setup, argv, message):
    monkeypatch.chdir(tmp_path)
    records = {"noanswer": [{"question": "q"}], "blank": [QA[0], {"question": "x", "answer": ""}]}.get(setup, QA)
    (tmp_path / "qa.json").write_text(json.dumps(records))
    if setup == "exists":
        (tmp_path / "out.json").write_text("keep me")
    if setup == "registered":
        (tmp_path / "dataset_info.json").write_text('{"out": {"file_name": "other.json"}}')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["convert-data", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if setup == "registered":  # the records were written; the index was left as it was
        assert after.pop("out.json") and after == before
    else:
        assert after == before
