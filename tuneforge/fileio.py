"""The one reader (and writer guard) for user files: configs, dataset registries, data files,
benchmarks, checkpoints and models all come through here, so every decode, type and OS error
becomes one `TuneforgeError` line that names the file, the line and the fix.

Ground floor: imports only the standard library, PyYAML and `tuneforge.errors`.
"""

from __future__ import annotations

import codecs
import errno
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, DataError, TuneforgeError

log = logging.getLogger("tuneforge")

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}


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


def _not_utf8(data: bytes, err: UnicodeDecodeError) -> str:
    """Where the first non-UTF-8 byte is, and what the file probably is instead."""
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        guess = "; it is UTF-16"
    elif _all_cjk(data, "gb18030"):
        guess = "; it looks like GBK/GB18030"
    else:
        guess = "; it may be Latin-1 or Windows-1252"
    return f"is not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}, column {column}{guess}): re-save it as UTF-8"


def _all_cjk(data: bytes, encoding: str) -> bool:
    """Every non-ASCII character of `data` read as `encoding` is Chinese/Japanese text or CJK
    punctuation (a Latin-1 file also decodes as GB18030, into nonsense from all over Unicode)."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        return False
    wide = [ch for ch in text if ord(ch) > 127]
    return bool(wide) and all(0x3000 <= ord(ch) <= 0x9FFF or 0xFF00 <= ord(ch) <= 0xFFEF
                              for ch in wide)


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
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{what} '{path}' {_not_utf8(data, err)}") from None


def parse_json(text: str, path: str | Path, what: str = "file",
               error: type[TuneforgeError] = DataError) -> Any:
    """`json.loads` whose failures name the file, line and column; nesting too deep for Python's
    parser (RecursionError) is one line as well."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{what} '{path}': malformed JSON at line {err.lineno}, column {err.colno}: "
                    f"{err.msg}; fix the file") from None
    except RecursionError:
        raise error(f"{what} '{path}': JSON nested too deeply to read (more than about "
                    f"{_nesting_limit()} levels); flatten the file") from None


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
