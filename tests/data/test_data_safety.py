"""Datasets are read safely: every registry value is checked for its type, data files in any
text encoding problem or shape are one DataError line naming the dataset, file and line, and
file_name never leads outside dataset_dir (absolute, '..' or a symbolic link)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from tuneforge.data import load_datasets
from tuneforge.errors import DataError

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def write(folder: Path, files: dict[str, str | bytes], registry: dict | None = None) -> str:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    if registry is not None:
        (folder / "dataset_info.json").write_text(json.dumps(registry))
    return str(folder)


def error(smol, make_args, dataset_dir, dataset="d", **args) -> str:
    with pytest.raises(DataError) as err:
        load_datasets(make_args(dataset=dataset, dataset_dir=str(dataset_dir), **args), smol)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def count(smol, make_args, dataset_dir, dataset="d", **args) -> int:
    return len(load_datasets(make_args(dataset=dataset, dataset_dir=str(dataset_dir), **args), smol).train)


# --- text encodings -------------------------------------------------------------------------

ALPACA_ZH = {"instruction": "你好，请问候", "input": "", "output": "你好！"}
ALPACA_FR = {"instruction": "Dis bonjour, café", "input": "", "output": "Bonjour à tous"}


def _as(suffix: str, record: dict) -> str:
    if suffix == ".csv":
        return f"instruction,input,output\nSay hi,,Hi!\n{record['instruction']},,{record['output']}\n"
    if suffix == ".jsonl":
        return json.dumps(GOOD) + "\n" + json.dumps(record, ensure_ascii=False) + "\n"
    return json.dumps([GOOD, record], ensure_ascii=False, indent=1)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
@pytest.mark.parametrize("encoding,record,guess", [
    ("gbk", ALPACA_ZH, "it looks like GBK/GB18030"),
    ("gb18030", ALPACA_ZH, "it looks like GBK/GB18030"),
    ("latin-1", ALPACA_FR, "it may be Latin-1 or Windows-1252"),
    ("cp1252", ALPACA_FR, "it may be Latin-1 or Windows-1252"),
    ("utf-16", ALPACA_FR, "it is UTF-16"),
    ("utf-16-le", ALPACA_FR, "UTF-16 without a byte-order mark"),
])
def test_data_files_not_in_utf8(smol, make_args, tmp_path, suffix, encoding, record, guess):
    write(tmp_path, {f"d{suffix}": _as(suffix, record).encode(encoding)}, {"d": {"file_name": f"d{suffix}"}})
    message = error(smol, make_args, tmp_path)
    assert message.startswith(f"dataset 'd' file '{tmp_path / ('d' + suffix)}' is not UTF-8 text (byte 0x")
    assert guess in message and message.endswith("re-save it as UTF-8")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_a_utf8_bom_is_simply_read(smol, make_args, tmp_path, suffix):
    registry = json.dumps({"d": {"file_name": f"d{suffix}"}}).encode()
    write(tmp_path, {f"d{suffix}": b"\xef\xbb\xbf" + _as(suffix, ALPACA_ZH).encode(),
                     "dataset_info.json": b"\xef\xbb\xbf" + registry})
    assert count(smol, make_args, tmp_path) == 2


def test_registry_not_utf8_or_too_deep(smol, make_args, tmp_path):
    write(tmp_path, {"dataset_info.json": '{"d": {"file_name": "数据.json"}}'.encode("gbk")})
    assert "dataset registry" in error(smol, make_args, tmp_path) and "GBK" in error(smol, make_args, tmp_path)
    write(tmp_path, {"dataset_info.json": '{"d": ' * 50_000 + "1" + "}" * 50_000})
    assert "dataset_info.json': JSON nested too deeply to read" in error(smol, make_args, tmp_path)


@pytest.mark.parametrize("name,text,expected", [
    ("d.json", "[" * 50_000 + "]" * 50_000, "d.json': JSON nested too deeply to read (more than about"),
    ("d.jsonl", json.dumps(GOOD) + "\n" + '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}\n",
     "d.jsonl': JSON nested too deeply to read at line 2"),
    ("d.json", json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + '\n{"instruction": }\n',
     "d.json': malformed JSON at line 4, column 17"),  # JSON lines saved as .json
    ("d.json", '{\n "rows": []\n}', "expected a JSON list of records (or one JSON object per line), found an object"),
    ("d.json", json.dumps([GOOD, [1]]), "d.json' record 1): expected a JSON object, found a list"),
    ("d.jsonl", json.dumps(GOOD) + "\n\n7\n", "d.jsonl' line 3): expected a JSON object, found a number (7)"),
])
def test_malformed_or_nested_data_names_the_line(smol, make_args, tmp_path, name, text, expected):
    write(tmp_path, {name: text}, {"d": {"file_name": name}})
    assert expected in error(smol, make_args, tmp_path)


def test_max_samples_never_reads_past_the_lines_it_keeps(smol, make_args, tmp_path):
    write(tmp_path, {"d.jsonl": json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\nnot json\n"},
          {"d": {"file_name": "d.jsonl"}})
    assert count(smol, make_args, tmp_path, max_samples=2) == 2
    assert "line 3" in error(smol, make_args, tmp_path)


# --- registry values ------------------------------------------------------------------------

WRONG_TYPES = [5, 1.5, True, None, [], ["x"], {}, {"a": "b"}, ""]


@pytest.mark.parametrize("value", [v for v in WRONG_TYPES if v not in (None, "")])
def test_file_name_that_is_not_a_string(smol, make_args, tmp_path, value):
    write(tmp_path, {}, {"d": {"file_name": value}})
    message = error(smol, make_args, tmp_path)
    assert "dataset 'd' in " in message and "file_name must be a file or folder name (a string)" in message


@pytest.mark.parametrize("section,key", [("columns", "prompt"), ("columns", "response"), ("columns", "history"),
                                         ("tags", "role_tag"), ("tags", "user_tag"), ("tags", "system_tag")])
@pytest.mark.parametrize("value", WRONG_TYPES)
def test_columns_and_tags_values_must_be_names(smol, make_args, tmp_path, section, key, value):
    write(tmp_path, {"d.json": "[]"}, {"d": {"file_name": "d.json", "formatting": "sharegpt", section: {key: value}}})
    message = error(smol, make_args, tmp_path)
    assert f"dataset 'd' in '{tmp_path / 'dataset_info.json'}': {section}.{key} must be the name of a" in message


@pytest.mark.parametrize("entry,expected", [
    ({"columns": ["instruction"]}, "columns must be a JSON object"),
    ({"tags": "from"}, "tags must be a JSON object"),
    ({"formatting": ["alpaca"]}, 'formatting must be "alpaca" or "sharegpt", found a list'),
    ({"formatting": {"type": "alpaca"}}, "found an object"),
    ({"formatting": "Alpaca"}, "found a string ('Alpaca')"),
    ({"ranking": "false"}, "ranking must be true or false, found a string ('false')"),
    ({"ranking": 0}, "ranking must be true or false, found a number (0)"),
    ({"num_samples": "10"}, "num_samples must be a whole number"),
    ({"num_samples": 0}, "num_samples must be a whole number"),
    ({"num_samples": 2.5}, "num_samples must be a whole number"),
    ({"tags": {"user_tag": "gpt"}}, "tags.user_tag and tags.assistant_tag are both 'gpt'"),
    ({"tags": {"role_tag": "value"}}, "tags.role_tag and tags.content_tag are both 'value'"),
])
def test_registry_entry_values_of_the_wrong_type(smol, make_args, tmp_path, entry, expected):
    write(tmp_path, {"d.json": json.dumps([GOOD])}, {"d": {"file_name": "d.json", **entry}})
    assert expected in error(smol, make_args, tmp_path)


@pytest.mark.parametrize("registry,expected", [
    ([{"file_name": "d.json"}], "expected a JSON object mapping dataset names to entries, found a list"),
    ({"d": "d.json"}, "the entry must be a JSON object, found a string ('d.json')"),
    ({"d": ["d.json"]}, "the entry must be a JSON object, found a list"),
])
def test_registry_shape(smol, make_args, tmp_path, registry, expected):
    write(tmp_path, {}, registry)
    assert expected in error(smol, make_args, tmp_path)


def test_unknown_registry_keys_are_said_with_a_guess(smol, make_args, tmp_path, caplog):
    chat = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    write(tmp_path, {"d.json": json.dumps([{"conversations": chat, "output": "x", "instruction": "y"}])},
          {"d": {"file_name": "d.json", "fromatting": "sharegpt", "columns": {"respone": "output"}}})
    with caplog.at_level(logging.WARNING):
        count(smol, make_args, tmp_path)
    assert "unknown key 'fromatting' (did you mean 'formatting'?) ignored" in caplog.text
    assert "unknown columns key 'respone' (did you mean 'response'?) ignored" in caplog.text


# --- folders and files in the wrong place ---------------------------------------------------

def test_dataset_dir_is_a_file_or_missing(smol, make_args, tmp_path):
    file = tmp_path / "data.json"
    file.write_text("{}")
    assert f"dataset_dir '{file}' is a file, not a folder" in error(smol, make_args, file)
    assert "does not exist" in error(smol, make_args, tmp_path / "nowhere")


def test_registry_is_a_folder(smol, make_args, tmp_path):
    (tmp_path / "dataset_info.json").mkdir()
    assert "dataset_info.json' is a folder, not a file" in error(smol, make_args, tmp_path)


def test_data_file_is_an_empty_folder_or_under_a_file(smol, make_args, tmp_path):
    write(tmp_path, {"d.json": json.dumps([GOOD]), "e/.hidden": "x"},
          {"d": {"file_name": "d.json/inner.json"}, "e": {"file_name": "e"}})
    assert f"goes through '{tmp_path / 'd.json'}', which is a file, not a folder" in error(smol, make_args, tmp_path)
    assert "file_name names the folder" in error(smol, make_args, tmp_path, dataset="e")


# --- file_name stays inside dataset_dir -----------------------------------------------------

@pytest.fixture
def outside(tmp_path) -> Path:
    """data/ (the dataset_dir) and, beside it, a file and a folder that must never be read."""
    write(tmp_path, {"secret.json": json.dumps([GOOD]), "secrets/a.json": json.dumps([GOOD])})
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


@pytest.mark.parametrize("file_name", ["../secret.json", "../secrets", "sub/../../secret.json", "./../secret.json",
                                       "../data/../secret.json"])
def test_file_name_with_dotdot_leaving_dataset_dir(smol, make_args, outside, file_name):
    (outside / "sub").mkdir()
    write(outside, {}, {"d": {"file_name": file_name}})
    message = error(smol, make_args, outside)
    assert f"file_name {file_name!r} leads outside dataset_dir '{outside}'" in message


@pytest.mark.parametrize("file_name", ["/etc/hostname", "//etc/hostname"])
def test_absolute_file_name(smol, make_args, outside, file_name):
    write(outside, {}, {"d": {"file_name": file_name}})
    assert f"file_name {file_name!r} is an absolute path" in error(smol, make_args, outside)


def test_symbolic_links_leaving_dataset_dir(smol, make_args, outside):
    os.symlink(outside.parent / "secret.json", outside / "file_link.json")
    os.symlink("../secrets", outside / "folder_link")
    (outside / "parts").mkdir()
    (outside / "parts" / "a.json").write_text(json.dumps([GOOD]))
    os.symlink("../../secret.json", outside / "parts" / "b.json")
    os.symlink("../outside_link", outside / "chain")  # a link to a link that leads out
    os.symlink("secret.json", outside.parent / "outside_link")
    write(outside, {}, {name: {"file_name": name} for name in ("file_link.json", "folder_link", "parts", "chain")})
    for name in ("file_link.json", "folder_link", "chain"):
        assert "leads outside dataset_dir" in error(smol, make_args, outside, dataset=name)
    message = error(smol, make_args, outside, dataset="parts")
    assert f"'{outside / 'parts' / 'b.json'}' is a symbolic link leading outside dataset_dir" in message


def test_links_and_dotdot_that_stay_inside_are_fine(smol, make_args, outside, tmp_path):
    write(outside, {"real/d.json": json.dumps([GOOD, GOOD])})
    os.symlink("real/d.json", outside / "link.json")
    os.symlink("real", outside / "folder")
    write(outside, {}, {"a": {"file_name": "real/../real/d.json"}, "b": {"file_name": "link.json"},
                        "c": {"file_name": "folder"}})
    assert [count(smol, make_args, outside, dataset=n) for n in "abc"] == [2, 2, 2]
    # dataset_dir itself is the user's choice: a link to it, or an absolute path, is fine
    os.symlink(outside, tmp_path / "data_link")
    assert count(smol, make_args, tmp_path / "data_link", dataset="b") == 2
    assert count(smol, make_args, outside.resolve(), dataset="a") == 2
