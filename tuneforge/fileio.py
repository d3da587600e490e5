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
from typing import Any, Iterator

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
    name = f" '{exc.filename}'" if exc.filename else ""
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


def _not_utf8(data: bytes, start: int, first_line: int = 1) -> str:
    """Where the first non-UTF-8 (or NUL) byte is, and what the file probably is instead.
    `data` starts on line `first_line` of the file (a streamed line, or the whole file)."""
    line = data.count(b"\n", 0, start) + first_line
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and first_line == 1:
        guess = "; it is UTF-16"
    elif data[start] == 0:
        guess = "; it looks like UTF-16 without a byte-order mark, or not text at all"
    elif _all_cjk(data, "gb18030"):
        guess = "; it looks like GBK/GB18030"
    else:
        guess = "; it may be Latin-1 or Windows-1252"
    return f"is not UTF-8 text (byte 0x{data[start]:02x} at line {line}, column {column}{guess}): re-save it as UTF-8"


def _decode(data: bytes, path: Path, what: str, error: type[TuneforgeError], first_line: int = 1) -> str:
    """UTF-8 text of `data` (a BOM dropped on the file's first line); a NUL byte, which no text
    file holds (UTF-16 without a BOM reads as UTF-8 with NULs), is refused like a bad byte."""
    try:
        text = data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        nul = data.find(0, 0, err.start)  # a NUL before the bad byte is the better clue
        raise error(f"{what} '{path}' {_not_utf8(data, err.start if nul < 0 else nul, first_line)}") from None
    if "\x00" in text:
        raise error(f"{what} '{path}' {_not_utf8(data, data.index(0), first_line)}")
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
            raise error(f"{what} '{path}' line 1: the header names {', '.join(map(repr, twice))} "
                        "more than once; give each column its own name")
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row:
                continue
            if len(row) > len(header):
                raise error(f"{what} '{path}' line {start}: {len(row)} fields but the header has "
                            f"{len(header)}; quote fields that hold commas (\"a, b\")")
            yield start, dict(zip(header, row + [None] * (len(header) - len(row))))
    except csv.Error as exc:
        raise error(f"{what} '{path}' line {end + 1}: not valid CSV ({exc}); fix the row that "
                    "starts there") from None


def parse_json(text: str, path: str | Path, what: str = "file",
               error: type[TuneforgeError] = DataError, line: int | None = None) -> Any:
    """`json.loads` whose failures name the file, line and column; nesting too deep for Python's
    parser (RecursionError) is one line as well. `line`: the file line `text` starts on, when
    it is one line of a JSON-lines file (messages then name that line and say "fix that line")."""
    first, scope = (1, "the file") if line is None else (line, "that line")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{what} '{path}': malformed JSON at line {err.lineno + first - 1}, column "
                    f"{err.colno}: {err.msg}; fix {scope}") from None
    except RecursionError:
        where = "" if line is None else f" at line {line}"
        raise error(f"{what} '{path}': JSON nested too deeply to read{where} (more than about "
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
    loader.source = f"{what} '{path}'"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{what} '{path}' is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"
                    ) from None
    except _BadKey as exc:
        raise error(f"{what} '{path}' {exc}") from None
    except RecursionError:
        raise error(f"{what} '{path}' is nested too deeply to read; flatten it") from None
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
