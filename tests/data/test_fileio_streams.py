"""The streamed readers added to tuneforge/fileio.py for data files: lines, JSON lines and CSV
rows, each named by its line; NUL bytes (UTF-16 without a BOM) refused like any bad byte."""

from __future__ import annotations

import pytest

from tuneforge import fileio
from tuneforge.errors import ConfigError, DataError


def test_read_lines_numbers_lines_and_drops_a_bom_once(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\r\n\xef\xbb\xbfsecond\nthird")
    # only the file's own BOM goes; one inside the text stays as the character it is
    assert list(fileio.read_lines(path)) == [(1, "first\r\n"), (2, "\ufeffsecond\n"), (3, "third")]


@pytest.mark.parametrize("raw,line,column,guess", [
    (b"ok\nok\ncaf\xe9\n", 3, 4, "Latin-1 or Windows-1252"),
    ("ok\n数据\n".encode("gbk"), 2, 1, "GBK/GB18030"),
    ("ok".encode("utf-16"), 1, 1, "it is UTF-16"),
    ("ok\nok".encode("utf-16-le"), 1, 2, "UTF-16 without a byte-order mark"),
])
def test_read_lines_names_the_bad_line(tmp_path, raw, line, column, guess):
    path = tmp_path / "d.jsonl"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as err:
        list(fileio.read_lines(path, "dataset file", ConfigError))
    message = str(err.value)
    assert message.startswith(f"dataset file '{path}' is not UTF-8 text (byte ")
    assert f"at line {line}, column {column}" in message and guess in message and "\n" not in message


def test_read_lines_names_a_stray_nul_byte_without_calling_it_an_encoding(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"ok\nbin\x00ary\n")
    with pytest.raises(DataError) as err:
        list(fileio.read_lines(path, "dataset file"))
    assert str(err.value) == (f"dataset file '{path}' holds a NUL byte (0x00) at line 2, column 4, which "
                              "is not text: remove it (in JSON, write it as \\u0000)")


def test_read_json_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\r\n\n  \n[2]\n"x"\n')
    assert list(fileio.read_json_lines(path)) == [(1, {"a": 1}), (4, [2]), (5, "x")]
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3,}\n')
    with pytest.raises(DataError, match=r"malformed JSON at line 3, column 9: .*; fix that line$"):
        list(fileio.read_json_lines(path))
    path.write_text('{"a": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"nested too deeply to read at line 2 .*flatten that line$"):
        list(fileio.read_json_lines(path))


def test_read_json_lines_stops_reading_where_the_caller_stops(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\nnot json\n')
    rows = fileio.read_json_lines(path)
    assert [next(rows), next(rows)] == [(1, {"a": 1}), (2, {"a": 2})]
    rows.close()  # the third line is never parsed, so never refused


def test_parse_json_line_offset():
    with pytest.raises(DataError, match=r"'x.jsonl': malformed JSON at line 7, column 2"):
        fileio.parse_json("[,]", "x.jsonl", line=7)


def test_read_csv_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbfq,a\r\n1,2\r\n\r\n"multi\nline",3\r\nshort\r\n')
    assert list(fileio.read_csv_rows(path)) == [
        (2, {"q": "1", "a": "2"}), (4, {"q": "multi\nline", "a": "3"}), (6, {"q": "short", "a": None})]
    path.write_text("")
    assert list(fileio.read_csv_rows(path)) == []


@pytest.mark.parametrize("text,match", [
    ("q,a\n1,2\n1,2,3\n", r"d.csv' line 3: 3 fields but the header has 2; quote fields"),
    ("q,a,q\n1,2,3\n", r"d.csv' line 1: the header names 'q' more than once"),
    # an unclosed quote would swallow every later line into one field
    ('q,a\n1,2\n"open,3\n4,5\n6,7\n', r"d.csv' line 3: not valid CSV \(unexpected end of data\); fix the row"),
    ('q,a\n"ab"c,1\n', r"d.csv' line 2: not valid CSV \(',' expected after '\"'\)"),
])
def test_read_csv_rows_refuses_with_the_line(tmp_path, text, match):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        list(fileio.read_csv_rows(path))


def test_read_csv_rows_takes_long_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("q,a\n" + "x" * 300_000 + ",y\n")  # over csv's default 128 KiB field limit
    assert len(next(fileio.read_csv_rows(path))[1]["q"]) == 300_000


def test_streams_report_a_folder_and_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="is a folder, not a file"):
        list(fileio.read_json_lines(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        list(fileio.read_csv_rows(tmp_path / "none.csv"))
