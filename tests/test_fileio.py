"""The reader layer for user files (tuneforge/fileio.py): one line per failure, naming the file."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from tuneforge import fileio
from tuneforge.errors import CheckpointError, ConfigError, DataError


def test_utf8_bom_is_read(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_bytes(b"\xef\xbb\xbfoutput_dir: out\n")
    assert fileio.read_yaml(path) == {"output_dir": "out"}
    path.write_bytes(b"\xef\xbb\xbf[1, 2]")
    assert fileio.read_json(path) == [1, 2]


@pytest.mark.parametrize("text,encoding,guess", [
    ("数据集：你好", "gbk", "GBK/GB18030"),
    ("数据集", "gb18030", "GBK/GB18030"),
    ("café crème", "latin-1", "Latin-1 or Windows-1252"),
    ("“quoted” – dash", "cp1252", "Latin-1 or Windows-1252"),
    ("Quelle ville est en Norvège ?", "latin-1", "Latin-1 or Windows-1252"),  # è+g is valid GBK
])
def test_not_utf8_names_line_column_and_guess(tmp_path, text, encoding, guess):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n  "ok",\n  "' + text.encode(encoding) + b'"\n]')
    with pytest.raises(DataError) as err:
        fileio.read_json(path, "dataset file")
    message = str(err.value)
    assert message.startswith(f"dataset file '{path}' is not UTF-8 text")
    assert guess in message and "re-save it as UTF-8" in message and "\n" not in message
    assert "at line 3, column" in message


@pytest.mark.parametrize("encoding, read, match", [
    ("utf-16", fileio.read_json, r"\(byte 0xff at line 1, column 1; it is UTF-16\)"),
    # no BOM: read_text refuses the NUL bytes too
    ("utf-16-le", fileio.read_text, r"byte 0x00 at line 1, column 2; it looks like UTF-16 without"),
], ids=["with-bom", "without-bom"])
def test_utf16_file(tmp_path, encoding, read, match):
    path = tmp_path / "d.json"
    path.write_bytes('["a"]'.encode(encoding))
    with pytest.raises(DataError, match=match):
        read(path)


def test_json_too_deep_and_malformed(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        fileio.read_json(path)
    path.write_text('{"a": 1,}')
    with pytest.raises(DataError, match=r"malformed JSON at line 1, column 9"):
        fileio.read_json(path)


def test_folder_missing_and_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        fileio.read_text(tmp_path, "config file", ConfigError)
    with pytest.raises(DataError, match="does not exist"):
        fileio.read_text(tmp_path / "nope.json")
    with pytest.raises(DataError, match="lies under a file"):
        (tmp_path / "f").write_text("x")
        fileio.read_text(tmp_path / "f" / "g.json")


def test_yaml_duplicate_key_warns_and_last_wins(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 8\nlearning_rate: 1.0e-4\nlora_rank: 16\n")
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        assert fileio.read_yaml(path)["lora_rank"] == 16
    assert "sets 'lora_rank' twice (lines 1 and 3): the last one wins" in caplog.text


def test_json_duplicate_key_warns_once_and_last_wins(tmp_path, caplog):
    """D13: a dataset defined twice in dataset_info.json is named, not silently replaced."""
    path = tmp_path / "dataset_info.json"
    path.write_text('{"d": {"file_name": "a.json"}, "e": {}, "d": {"file_name": "b.json"}}')
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        assert fileio.read_json(path, "dataset registry")["d"] == {"file_name": "b.json"}
    assert caplog.text.count("sets 'd' twice in one object: the last one wins") == 1
    assert "dataset registry" in caplog.text and "'e'" not in caplog.text
    caplog.clear()
    # records of a JSON array repeating a key: one line per key, not one per record
    path.write_text(json.dumps([{"a": 1}] * 3).replace('{"a": 1}', '{"a": 1, "a": 2}'))
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        assert fileio.read_json(path) == [{"a": 2}] * 3
    assert caplog.text.count("twice") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        fileio.parse_json('{"x": 1}', path)
    assert not caplog.text


def test_yaml_merge_keys_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lora_rank: 8}\nrun:\n  <<: *b\n  lora_alpha: 16\n")
    assert fileio.read_yaml(path)["run"] == {"lora_rank": 8, "lora_alpha": 16}


def test_yaml_nested_non_string_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("placeholders:\n  name: x\n  3: y\n")
    with pytest.raises(ConfigError, match="line 3: the key 3 is not a name"):
        fileio.read_yaml(path)


def test_check_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir '.*file' is a file, not a folder"):
        fileio.check_output_dir(tmp_path / "file", "output_dir")
    with pytest.raises(ConfigError, match=r"lies under '.*file', which is a file"):
        fileio.check_output_dir(tmp_path / "file" / "a" / "b", "output_dir")
    assert fileio.check_output_dir(tmp_path / "new" / "deeper", "output_dir") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()


def test_writing_maps_disk_full_and_permissions():
    with pytest.raises(CheckpointError) as err:
        with fileio.writing("checkpoint-4", CheckpointError):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/checkpoint-4/optimizer.pt")
    assert str(err.value) == ("writing checkpoint-4: the disk is full: could not write "
                              "'/out/checkpoint-4/optimizer.pt'; free some space and run again")
    with pytest.raises(CheckpointError, match="permission denied"):
        with fileio.writing("x", CheckpointError):
            raise PermissionError(errno.EACCES, "Permission denied", "/x")
