"""Text that is not text: a lone surrogate escape ("\\ud800") that JSON lets through is refused
naming the record and field, wherever text goes in (alpaca columns, history, sharegpt messages,
tools); a compressed or binary data file is named for what it is; a data path in a message is
quoted, so a stray space in file_name shows (and is pointed out)."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pytest

from tuneforge.data import load_datasets
from tuneforge.errors import DataError

FIX = "fix its \\u escape: a character beyond \\uffff is written as a pair, like \\ud83d\\ude00"


def register(folder: Path, text: str, **entry) -> str:
    """Write `text` (raw JSON, so escapes stay as written) as d.json and register it as 'd'."""
    (folder / "d.json").write_text(text)
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", **entry}}))
    return str(folder)


def refused(smol, make_args, folder) -> str:
    with pytest.raises(DataError) as err:
        load_datasets(make_args(dataset="d", dataset_dir=folder), smol)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("text,entry,problem", [
    ('[{"instruction": "hi \\ud800 there", "output": "ok"}]', {},
     "column 'instruction' holds a lone surrogate \\ud800 (at character 3)"),
    ('[{"instruction": "hi", "input": "\\udfff", "output": "ok"}]', {},
     "column 'input' holds a lone surrogate \\udfff (at character 0)"),
    ('[{"instruction": "hi", "output": "ok \\ude00\\ud83d"}]', {},  # a pair in the wrong order is two halves
     "column 'output' holds a lone surrogate \\ude00 (at character 3)"),
    ('[{"instruction": "hi", "output": "ok", "system": "x\\udbff"}]', {"columns": {"system": "system"}},
     "column 'system' holds a lone surrogate \\udbff (at character 1)"),
    ('[{"instruction": "hi", "output": "ok", "history": [["a", "b\\ud800"]]}]', {"columns": {"history": "history"}},
     "column 'history' item 0 holds a lone surrogate \\ud800 (at character 1)"),
    ('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "\\udc00"}]}]',
     {"formatting": "sharegpt"}, "the 'value' of message 1 ('gpt') holds a lone surrogate \\udc00 (at character 0)"),
    ('[{"instruction": "hi", "output": "ok", "tools": [{"name": "f\\ud800"}]}]', {"columns": {"tools": "tools"}},
     "column 'tools' holds a lone surrogate \\ud800"),
])
def test_lone_surrogates_are_refused_naming_record_and_field(smol, make_args, tmp_path, text, entry, problem):
    folder = register(tmp_path, text, **entry)
    assert refused(smol, make_args, folder) == (
        f"dataset 'd' ('{tmp_path / 'd.json'}' record 0): {problem}, half of a character and not text; {FIX}")


def test_a_surrogate_pair_is_one_character_and_fine(smol, make_args, tmp_path):
    folder = register(tmp_path, '[{"instruction": "smile \\ud83d\\ude00", "output": "\\ud83d\\ude00"}]')
    assert len(load_datasets(make_args(dataset="d", dataset_dir=folder), smol).train) == 1


def test_a_compressed_data_file_is_called_compressed(smol, make_args, tmp_path):
    (tmp_path / "d.json").write_bytes(gzip.compress(b'[{"instruction": "hi", "output": "ok"}]'))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    assert refused(smol, make_args, str(tmp_path)) == (
        f"dataset 'd' file '{tmp_path / 'd.json'}' is gzip-compressed data, not text: decompress it first (gunzip)")
    with zipfile.ZipFile(tmp_path / "d.jsonl", "w") as archive:
        archive.writestr("d.jsonl", '{"instruction": "hi", "output": "ok"}\n')
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl"}}))
    assert refused(smol, make_args, str(tmp_path)) == (
        f"dataset 'd' file '{tmp_path / 'd.jsonl'}' is a zip archive, not text: unpack it first (unzip)")


@pytest.mark.parametrize("file_name,hint", [
    ("d.json ", "file_name has spaces around it, and 'd.json' does exist: remove them"),
    (" d.json", "file_name has spaces around it, and 'd.json' does exist: remove them"),
    ("e.json", "put the file there or fix file_name"),
])
def test_a_missing_file_is_quoted_and_stray_spaces_are_pointed_out(smol, make_args, tmp_path, file_name, hint):
    (tmp_path / "d.json").write_text('[{"instruction": "hi", "output": "ok"}]')
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": file_name}}))
    assert refused(smol, make_args, str(tmp_path)) == (
        f"dataset 'd': file '{tmp_path / file_name}' not found (file_name in "
        f"'{tmp_path / 'dataset_info.json'}'); {hint}")
