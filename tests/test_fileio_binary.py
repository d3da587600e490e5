"""What the reader layer says about a file that is not text (tuneforge/fileio.py): a compressed
file, an archive or another binary format is named by its magic bytes (`sniff`, which the weight
file checks use too); a stray NUL byte in UTF-8 text is called that, not UTF-16; UTF-16 is
recognised by NULs in every other byte; paths in messages are quoted so stray spaces show."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import random
import zipfile

import pytest

from tuneforge import fileio
from tuneforge.errors import DataError

RECORDS = b'[{"instruction": "Say hi.", "output": "Hi!"}]'


def _zip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("d.json", data)
    return buf.getvalue()


BINARIES = [  # (file content, what it is called, what to do)
    (gzip.compress(RECORDS), "gzip-compressed data", "decompress it first (gunzip)"),
    (bz2.compress(RECORDS), "bzip2-compressed data", "decompress it first (bunzip2)"),
    (lzma.compress(RECORDS), "xz-compressed data", "decompress it first (unxz)"),
    (b"(\xb5/\xfd" + bytes(20), "zstd-compressed data", "decompress it first (unzstd)"),
    (_zip(RECORDS), "a zip archive", "unpack it first (unzip)"),
    (b"7z\xbc\xaf\x27\x1c" + bytes(20), "a 7-Zip archive", "unpack it first"),
    (b"PAR1" + bytes(range(30)) + b"PAR1", "a Parquet file", "convert it to JSON lines first"),
    (b"ARROW1\x00\x00" + bytes(20), "an Arrow file", "convert it to JSON lines first"),
    (pickle.dumps([{"a": 1}], protocol=2), "a Python pickle", "give the text file it should be"),
    (pickle.dumps([{"a": 1}], protocol=5), "a Python pickle", "give the text file it should be"),
    ((20).to_bytes(8, "little") + b'{"a":{"dtype":"F32"}}', "a safetensors file", "give the text file it should be"),
    (b"GGUF\x03\x00\x00\x00" + bytes(24), "a GGUF file", "give the text file it should be"),
    (b"\x7fELF\x02\x01\x01" + bytes(40), "an executable (ELF) file", "give the text file it should be"),
    (b"SQLite format 3\x00" + bytes(40), "an SQLite database", "give the text file it should be"),
    (b"\x89HDF\r\n\x1a\n" + bytes(20), "an HDF5 file", "give the text file it should be"),
    (b"\x93NUMPY\x01\x00" + bytes(20), "a NumPy array file", "give the text file it should be"),
]


@pytest.mark.parametrize("data,name,advice", BINARIES, ids=[b[1] for b in BINARIES])
def test_binary_files_are_named_by_their_magic_bytes(tmp_path, data, name, advice):
    path = tmp_path / "d.json"
    path.write_bytes(data)
    expected = f"dataset file '{path}' is {name}, not text: {advice}"
    for read in (fileio.read_text, fileio.read_json, lambda p, w: list(fileio.read_lines(p, w)),
                 lambda p, w: list(fileio.read_json_lines(p, w)), lambda p, w: list(fileio.read_csv_rows(p, w))):
        with pytest.raises(DataError) as err:
            read(path, "dataset file")
        assert str(err.value) == expected
    assert fileio.sniff(data[:32]).name == name


def test_sniff_tells_text_signatures_only_when_asked():
    for head, name in ((b'{"a": 1}', "JSON text"), (b"<!DOCTYPE html>", "HTML or XML text"),
                       (b"version https://git-lfs.github.com/spec/v1\n", "a Git LFS pointer (run `git lfs pull`)")):
        assert fileio.sniff(head).name == name and not fileio.sniff(head).binary
        assert fileio.sniff(head, binary_only=True) is None
    # text that merely starts like a magic number is not taken for one
    for head in (b"BZh is not bzip2 without its block magic", b"\x80 alone", b"PAR", b"plain text"):
        assert fileio.sniff(head, binary_only=True) is None


@pytest.mark.parametrize("data,line,column", [
    (b'[{"instruction": "hi", "output": "he\x00llo"}]', 1, 37),
    (b'[\n {"instruction": "hi",\n  "output": "he\x00llo"}\n]', 3, 16),
    (b'[{"a": "\x00"}, {"a": "\x00\x00"}]', 1, 9),  # a few NULs are still stray ones
])
def test_a_stray_nul_byte_in_utf8_text_is_named_as_such(tmp_path, data, line, column):
    path = tmp_path / "d.json"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        fileio.read_json(path, "dataset file")
    assert str(err.value) == (f"dataset file '{path}' holds a NUL byte (0x00) at line {line}, column {column}, "
                              "which is not text: remove it (in JSON, write it as \\u0000)")


@pytest.mark.parametrize("encoding,column", [("utf-16-le", 2), ("utf-16-be", 1)])
def test_utf16_without_a_bom_is_still_called_utf16(tmp_path, encoding, column):
    path = tmp_path / "d.json"
    path.write_bytes('[{"instruction": "hi", "output": "hello"}]\n'.encode(encoding))
    with pytest.raises(DataError) as err:
        fileio.read_json(path, "dataset file")
    assert str(err.value) == (f"dataset file '{path}' is not UTF-8 text (byte 0x00 at line 1, column {column}; "
                              "it looks like UTF-16 without a byte-order mark): re-save it as UTF-8")


def test_bytes_with_no_magic_that_are_not_text_are_called_binary(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "d.json"
    for seed_byte in (b"[", b"\x00"):  # with and without a NUL first
        path.write_bytes(seed_byte + bytes(rng.randrange(256) for _ in range(400)))
        with pytest.raises(DataError) as err:
            fileio.read_text(path, "dataset file")
        message = str(err.value)
        assert message.startswith(f"dataset file '{path}' is not text (byte 0x")
        assert message.endswith("it looks like a binary file); give the text file it should be")
    # text in a one-byte encoding is still text in another encoding, not "binary"
    for text, encoding in (("Quelle ville est en Norvège ? Ça dépend.", "latin-1"),
                           ("Привет, мир! Как дела? Хорошо, спасибо.", "cp1251"), ("Γειά σου κόσμε", "iso-8859-7")):
        path.write_bytes(text.encode(encoding))
        with pytest.raises(DataError, match=r"is not UTF-8 text \(byte 0x.. at line 1, column \d+; it may be"):
            fileio.read_text(path)


def test_paths_in_messages_are_quoted_so_stray_characters_show(tmp_path):
    assert fileio.quoted("data/d.json ") == "'data/d.json '"
    assert fileio.quoted(tmp_path / "a\nb") == repr(str(tmp_path / "a\nb"))
    path = tmp_path / "d.json "
    with pytest.raises(DataError) as err:
        fileio.read_text(path, "dataset file")
    assert str(err.value) == f"dataset file '{path}' does not exist; check the path"
