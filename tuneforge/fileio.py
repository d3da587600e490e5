"""The one reader (and writer guard) for user files: configs, dataset registries, data files,
benchmarks, checkpoints and models all come through here, so every decode, type and OS error
becomes one `TuneforgeError` line that names the file, the line and the fix.

Ground floor: imports only the standard library, PyYAML and `tuneforge.errors`.
"""

from __future__ import annotations

import codecs
import csv
import errno
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import yaml

from .errors import ConfigError, DataError, TuneforgeError

log = logging.getLogger("tuneforge")

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}


def human_size(n: float) -> str:
    """Bytes as people read them: 512 bytes, 4.4 MB, 7.5 TB (binary units, one decimal)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def describe_os_error(exc: OSError, action: str = "access") -> str:
    """One readable clause for an OSError: what happened to which file, and what to do.

    The clause never includes a traceback or errno number; `action` is a verb ("read", "write").
    """
    name = f" {quoted(exc.filename)}" if exc.filename else ""
    if exc.errno in _DISK_FULL:
        return f"the disk is full: could not {action}{name}; free some space and run again"
    if exc.errno in _NO_ACCESS:
        return f"permission denied: could not {action}{name}; fix its permissions or choose another path"
    if isinstance(exc, IsADirectoryError):
        return f"{name.strip()} is a folder, not a file; give the path of a file"
    if isinstance(exc, NotADirectoryError):
        return f"{name.strip()} lies under a file, not a folder; fix the path"
    if isinstance(exc, FileNotFoundError):
        return f"{name.strip()} does not exist; check the path"
    return f"could not {action}{name}: {exc.strerror or exc}"


def quoted(path: str | Path) -> str:
    """A path as messages show it: in quotes, repr-style, so a stray space or a control
    character in it is visible ('d.json ', 'a\\nb')."""
    return repr(str(path))


class Signature(NamedTuple):
    """What a file's first bytes say it is: `name` reads after "is"/"looks like"; `advice` says
    what to do when a text file was expected (None: give the right file); `binary`: not text."""

    name: str
    advice: str | None = None
    binary: bool = True


_DECOMPRESS, _UNPACK, _CONVERT = "decompress it first", "unpack it first", "convert it to JSON lines first"
_SIGNATURES = (  # (magic, what it is); checked in order, at the start of the file
    (b"\x1f\x8b", Signature("gzip-compressed data", _DECOMPRESS + " (gunzip)")),
    (b"\xfd7zXZ\x00", Signature("xz-compressed data", _DECOMPRESS + " (unxz)")),
    (b"(\xb5/\xfd", Signature("zstd-compressed data", _DECOMPRESS + " (unzstd)")),
    (b"PK\x03\x04", Signature("a zip archive", _UNPACK + " (unzip)")),
    (b"PK\x05\x06", Signature("an empty zip archive", _UNPACK + " (unzip)")),
    (b"7z\xbc\xaf\x27\x1c", Signature("a 7-Zip archive", _UNPACK)),
    (b"PAR1", Signature("a Parquet file", _CONVERT)),
    (b"ARROW1", Signature("an Arrow file", _CONVERT)),
    (b"\xff\xff\xff\xff", Signature("an Arrow stream (a datasets cache file?)", _CONVERT)),
    (b"GGUF", Signature("a GGUF file")),
    (b"\x93NUMPY", Signature("a NumPy array file")),
    (b"\x89HDF", Signature("an HDF5 file")),  # the rest of these magics holds a line break
    (b"SQLite format 3\x00", Signature("an SQLite database")),
    (b"\x7fELF", Signature("an executable (ELF) file")),
    (b"%PDF-", Signature("a PDF document")),
    (b"\x89PNG", Signature("a PNG image")),
    (b"\xff\xd8\xff", Signature("a JPEG image")),
    (b"version https://git-lfs", Signature("a Git LFS pointer (run `git lfs pull`)", binary=False)),
    (b"{", Signature("JSON text", binary=False)),
    (b"<", Signature("HTML or XML text", binary=False)),
)
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors library refuses larger headers too


def sniff(head: bytes, binary_only: bool = False) -> Signature | None:
    """What a file starting with `head` (its first 32 bytes or more) is, by its magic bytes:
    compressed data, an archive, a Parquet/Arrow/NumPy/HDF5/GGUF/safetensors file, a pickle, an
    executable, ...; with `binary_only` False also JSON, HTML and Git LFS pointer text. None when
    the bytes say nothing. (Text files are recognised by what fails to decode, not here.)"""
    for magic, signature in _SIGNATURES:
        if head.startswith(magic) and (signature.binary or not binary_only):
            return signature
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return Signature("bzip2-compressed data", _DECOMPRESS + " (bunzip2)")
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocols 2-5
        return Signature("a Python pickle")
    if head[8:10] in (b'{"', b"{}") and 0 < int.from_bytes(head[:8], "little") < SAFETENSORS_MAX_HEADER:
        return Signature("a safetensors file")
    return None


def _place(data: bytes, at: int, first_line: int) -> str:
    """'line L, column C' of byte `at` of `data`, which starts on line `first_line` of its file."""
    line = data.count(b"\n", 0, at) + first_line
    column = at - (data.rfind(b"\n", 0, at) + 1) + 1
    return f"line {line}, column {column}"


def _looks_utf16(data: bytes) -> bool:
    """NUL bytes in (nearly) every other byte, as ASCII text saved as UTF-16 has them."""
    sample = data[:4096]
    halves = (sample[0::2], sample[1::2])
    return any(len(half) and half.count(0) * 2 >= len(half) for half in halves)


def _looks_binary(data: bytes) -> bool:
    """Control bytes (besides tab, line ends and form feed) in one byte of twenty or more: a
    binary file. Text in any encoding has next to none (undecodable bytes are not counted: a
    Cyrillic or Greek file in a one-byte encoding is all of them), a stray NUL is one."""
    sample = data[:4096]
    controls = sum(1 for byte in sample if byte < 32 and byte not in b"\t\n\r\x0c") + sample.count(0x7F)
    return controls >= 4 and controls * 20 >= len(sample)


def _not_text(data: bytes, bad: int, first_line: int = 1) -> str:
    """Why `data` (the whole file, or one streamed line starting on line `first_line`) is not
    UTF-8 text, `bad` being its first undecodable or NUL byte: a clause after the file's name."""
    signature = sniff(data[:32], binary_only=True) if first_line == 1 else None
    if signature is not None:
        return f"is {signature.name}, not text: {signature.advice or 'give the text file it should be'}"
    nul = data.find(0, 0, bad + 1)  # a NUL before the bad byte is the better clue
    bad = bad if nul < 0 else nul
    if first_line == 1 and data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        guess = "it is UTF-16"
    elif nul >= 0 and _looks_utf16(data):
        guess = "it looks like UTF-16 without a byte-order mark"
    elif _all_cjk(data, "gb18030"):
        guess = "it looks like GBK/GB18030"
    elif _looks_binary(data):
        return (f"is not text (byte 0x{data[bad]:02x} at {_place(data, bad, first_line)}, among many "
                "control bytes: it looks like a binary file); give the text file it should be")
    elif nul >= 0:
        return (f"holds a NUL byte (0x00) at {_place(data, nul, first_line)}, which is not text: "
                "remove it (in JSON, write it as \\u0000)")
    else:
        guess = "it may be Latin-1 or Windows-1252"
    return f"is not UTF-8 text (byte 0x{data[bad]:02x} at {_place(data, bad, first_line)}; {guess}): re-save it as UTF-8"


def _decode(data: bytes, path: Path, what: str, error: type[TuneforgeError], first_line: int = 1) -> str:
    """UTF-8 text of `data` (a BOM dropped on the file's first line); a NUL byte, which no text
    file holds (UTF-16 without a BOM reads as UTF-8 with NULs), is refused like a bad byte."""
    try:
        text = data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what} {quoted(path)} {_not_text(data, err.start, first_line)}") from None
    if "\x00" in text:
        raise error(f"{what} {quoted(path)} {_not_text(data, data.index(0), first_line)}")
    return text


def _all_cjk(data: bytes, encoding: str) -> bool:
    """Every non-ASCII character of `data` read as `encoding` is Chinese/Japanese text or CJK
    punctuation, and some come two or more in a row, as words do. (A Latin-1 file also decodes
    as GB18030: into nonsense from all over Unicode, or, for one accented letter before an
    ASCII one as in "Norv\xe8ge", into a single CJK character between Latin letters.)"""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        return False
    wide = [ch for ch in text if ord(ch) > 127]
    cjk = all(0x3000 <= ord(ch) <= 0x9FFF or 0xFF00 <= ord(ch) <= 0xFFEF for ch in wide)
    return bool(wide) and cjk and re.search(r"[^\x00-\x7f]{2}", text) is not None


def read_text(path: str | Path, what: str = "file", error: type[TuneforgeError] = DataError) -> str:
    """The text of a user file, decoded as UTF-8 (a UTF-8 byte-order mark is dropped).

    `what` names the file's role in messages ("config file", "dataset file", ...).
    Raises `error` (one line) when the file is missing, is a folder, cannot be read or is not UTF-8.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{what} {describe_os_error(exc, 'read')}") from None
    return _decode(data, path, what, error)


def read_lines(path: str | Path, what: str = "file",
               error: type[TuneforgeError] = DataError) -> Iterator[tuple[int, str]]:
    """Stream a UTF-8 user file as (line number from 1, line with its ending) pairs, so a large
    file is not held in memory and a bad byte is named by its line. Raises `error` as read_text."""
    path = Path(path)
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise error(f"{what} {describe_os_error(exc, 'read')}") from None
    with stream:
        try:
            for number, raw in enumerate(stream, start=1):
                yield number, _decode(raw, path, what, error, first_line=number)
        except OSError as exc:
            exc.filename = exc.filename or str(path)
            raise error(f"{what} {describe_os_error(exc, 'read')}") from None


def read_json_lines(path: str | Path, what: str = "file",
                    error: type[TuneforgeError] = DataError) -> Iterator[tuple[int, Any]]:
    """Stream a JSON-lines user file as (line number, parsed value), skipping blank lines.
    Raises `error` naming the line for bad bytes, malformed JSON or nesting too deep."""
    for number, line in read_lines(path, what, error):
        if line.strip(_JSON_SPACE):  # the line ending goes, so an error is placed on this line
            yield number, parse_json(line.rstrip("\r\n"), path, what, error, line=number)


_JSON_SPACE = " \t\r\n"


def read_csv_rows(path: str | Path, what: str = "file",
                  error: type[TuneforgeError] = DataError) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream a CSV user file whose first line is the header, as (line number where the row
    starts, {column: text}); a short row's missing fields are None, blank lines are skipped.
    Raises `error` naming the line for bad bytes, CSV syntax errors, a header naming a column
    twice, and a row with more fields than the header."""
    csv.field_size_limit(2**31 - 1)  # long documents are fine; the default 128 KiB is not a rule
    lines = read_lines(path, what, error)
    # strict: an unclosed quote is an error, not a field that swallows the rest of the file
    reader = csv.reader((text for _, text in lines), strict=True)
    end = 0  # the last line read so far; a row starts on the next one
    try:
        header = next(reader, None)
        if header is None:
            return
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise error(f"{what} {quoted(path)} line 1: the header names {', '.join(map(repr, twice))} "
                        "more than once; give each column its own name")
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row:
                continue
            if len(row) > len(header):
                raise error(f"{what} {quoted(path)} line {start}: {len(row)} fields but the header has "
                            f"{len(header)}; quote fields that hold commas (\"a, b\")")
            yield start, dict(zip(header, row + [None] * (len(header) - len(row))))
    except csv.Error as exc:
        raise error(f"{what} {quoted(path)} line {end + 1}: not valid CSV ({exc}); fix the row that "
                    "starts there") from None


def parse_json(text: str, path: str | Path, what: str = "file",
               error: type[TuneforgeError] = DataError, line: int | None = None) -> Any:
    """`json.loads` whose failures name the file, line and column; nesting too deep for Python's
    parser (RecursionError) is one line as well; a key set twice in one object is warned (the last
    wins, as in every JSON reader). `line`: the file line `text` starts on, when
    it is one line of a JSON-lines file (messages then name that line and say "fix that line")."""
    first, scope = (1, "the file") if line is None else (line, "that line")
    warned: set[str] = set()

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) < len(items):
            keys = [key for key, _ in items]
            for key in sorted({k for k in keys if keys.count(k) > 1} - warned):
                warned.add(key)
                log.warning("%s %s sets '%s' twice in one object: the last one wins", what,
                            quoted(path) if line is None else f"{quoted(path)} line {line}", key)
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as err:
        raise error(f"{what} {quoted(path)}: malformed JSON at line {err.lineno + first - 1}, column "
                    f"{err.colno}: {err.msg}; fix {scope}") from None
    except RecursionError:
        where = "" if line is None else f" at line {line}"
        raise error(f"{what} {quoted(path)}: JSON nested too deeply to read{where} (more than about "
                    f"{_nesting_limit()} levels); flatten {scope}") from None


def read_json(path: str | Path, what: str = "file", error: type[TuneforgeError] = DataError) -> Any:
    """Read and parse a JSON user file; every failure is one `error` line naming the file."""
    return parse_json(read_text(path, what, error), path, what, error)


def _nesting_limit() -> int:
    import sys

    return sys.getrecursionlimit()


class _BadKey(Exception):
    pass


class _UserYamlLoader(yaml.SafeLoader):
    """safe_load, plus: keys must be strings, and a key set twice is reported (the last wins,
    as every YAML reader does, so a file LLaMA-Factory reads means the same here)."""

    source = "YAML file"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # `<<: *base` merges first, as safe_load does
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise _BadKey(f"line {line}: the key {key!r} is not a name; write keys as names "
                              "such as lora_rank")
            if key in seen:
                log.warning("%s sets '%s' twice (lines %d and %d): the last one wins",
                            self.source, key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str = "config file",
              error: type[TuneforgeError] = ConfigError) -> Any:
    """Parse a YAML user file with `yaml.safe_load` rules. Raises `error` (one line, with line
    and column) for unreadable files, non-UTF-8 text, invalid YAML, non-string keys and nesting
    too deep to read; warns when a key is set twice."""
    text = read_text(path, what, error)
    loader = _UserYamlLoader(text)
    loader.source = f"{what} {quoted(path)}"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{what} {quoted(path)} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"
                    ) from None
    except _BadKey as exc:
        raise error(f"{what} {quoted(path)} {exc}") from None
    except RecursionError:
        raise error(f"{what} {quoted(path)} is nested too deeply to read; flatten it") from None
    finally:
        loader.dispose()


def check_output_dir(path: str | Path, key: str, error: type[TuneforgeError] = ConfigError) -> Path:
    """Refuse, before anything is written, an output folder that cannot be one: a file, a path
    under a file, or a place this process may not write. Creates nothing. Returns the Path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{key} '{path}' is a file, not a folder; choose a folder path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise error(f"{key} '{path}' lies under '{probe}', which is a file; choose a folder path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise error(f"{key} '{path}' is not writable ('{probe}' is read-only); choose a writable "
                    "folder or fix its permissions")
    return path


def check_outside(path: str | Path, key: str, sources: list[tuple[str, Path]], reader: str,
                  error: type[TuneforgeError] = ConfigError) -> None:
    """Refuse an output folder `path` (config key `key`) that is, or lies inside, a folder that
    `reader` ("the export", "training") reads: `sources` are (config key, folder) pairs, e.g. the
    model's and each adapter's folder. Symlinks are resolved on both sides; nothing needs to
    exist. Raises `error`, one line naming both keys."""
    real = Path(path).expanduser().resolve()
    for source_key, source in sources:
        source = Path(source).expanduser().resolve()
        if real == source:
            raise error(f"{key} '{path}' is the folder of {source_key}, which {reader} reads; "
                        "choose another folder")
        if source in real.parents:
            raise error(f"{key} '{path}' lies inside the folder of {source_key}, which {reader} "
                        "reads; choose a folder outside it")


@contextmanager
def writing(what: str, error: type[TuneforgeError] = TuneforgeError):
    """Turn an OSError raised inside the block (disk full, permission denied, ...) into one
    `error` line saying what was being written. Clean-up is the caller's job (`finally`)."""
    try:
        yield
    except OSError as exc:
        raise error(f"writing {what}: {describe_os_error(exc, 'write')}") from None


def json_kind(value: Any) -> str:
    """A parsed JSON value's type in the words of a JSON file: 'an object', 'a list', 'a string',
    'a number', 'true/false' or 'null' (for messages such as "must be a list, not a string")."""
    if isinstance(value, bool):
        return "true/false"
    kinds = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A library exception's message as one line (its lines joined), at most `limit` characters."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def replace_folder(new: Path, place: Path) -> None:
    """Rename the complete folder `new` to `place`, in the same parent. An existing `place` is
    renamed aside first (to `<new>-old`) and removed only once `new` is in; if the rename fails,
    it is put back. Raises the OSError of a rename that failed."""
    aside = None
    if place.exists():
        aside = new.with_name(new.name + "-old")
        place.rename(aside)
    try:
        new.rename(place)
    except OSError:
        if aside is not None:
            aside.rename(place)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
