"""Read a registered data file (or folder of files) into records (dicts) that remember where each
came from ("data/d.jsonl line 5", "data/d.json record 3"), for messages that name the record.
JSON, JSON lines, CSV and .txt are read here (their errors name the line); Parquet and Arrow
files through HF datasets (hf_files.py).

Every file goes through tuneforge.fileio, so bad bytes, malformed JSON or CSV, nesting too deep
and OS errors are one DataError line naming the dataset, the file and the line. Members of a
folder must stay inside dataset_dir (a symbolic link leading out is refused).
"""

from __future__ import annotations

import bisect
import json
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

from tuneforge.errors import DataError
from tuneforge.fileio import describe_os_error, parse_json, quoted, read_csv_rows, read_json_lines, read_text

from .hf_files import BUILDERS, read_columnar, read_hub, stream_columnar, stream_hub
from .issues import describe_value
from .registry import DatasetEntry, is_inside

READABLE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")
PRETRAIN_MESSAGE = (
    "is plain text for pretraining: pretraining datasets need stage: pt, "
    "not the supervised (sft) data loader; set stage: pt, or pick a dataset with instruction/response "
    "(alpaca) or conversations (sharegpt) records"
)
_JSON_SPACE = " \t\r\n"


class Records:
    """The records of one dataset, in file order, and where each one is."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self._starts: list[int] = []  # index of each file's first record
        self._files: list[tuple[str, array | None]] = []  # (path, line of each record or None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    def add(self, path: Path | str, records: list[dict], lines: array | None) -> None:
        self._starts.append(len(self.items))
        self._files.append((str(path), lines))
        self.items.extend(records)

    def where(self, index: int) -> str:
        """'data/d.jsonl line 5' (JSON lines, CSV) or 'data/d.json record 3' (a JSON list, from 0)."""
        file = bisect.bisect_right(self._starts, index) - 1
        path, lines = self._files[file]
        offset = index - self._starts[file]
        return f"{quoted(path)} line {lines[offset]}" if lines is not None else f"{quoted(path)} record {offset}"


def read_records(entry: DatasetEntry, max_samples: int | None = None, text_lines: bool = False) -> Records:
    """All records of `entry`'s file(s), the first `max_samples` of them when that is set.
    `text_lines`: plain text is wanted (stage: pt), so a .txt file is read too, each line a
    record {<the prompt column>: line} (LLaMA-Factory's reading of .txt).

    Raises DataError (one line naming the dataset and file, and the line or record) when the file
    is missing or unreadable, not UTF-8, malformed, not a list of JSON objects, of an unsupported
    type, or leads outside dataset_dir.
    """
    records = Records()
    if entry.load_from != "file":  # a hub dataset (registry._source), through HF datasets
        records.add(entry.source, read_hub(entry, max_samples), None)
        return records
    for file in _data_files(entry, text_lines):
        limit = None if max_samples is None else max_samples - len(records)
        items, lines = _read_file(entry, file, limit)
        records.add(file, items, lines)
        if max_samples is not None and len(records) >= max_samples:
            break
    return records


def iter_records(entry: DatasetEntry, text_lines: bool = False) -> Iterator[tuple[str, int | None, dict]]:
    """(source, line or None, record) of `entry`, read lazily (streaming: true): JSON lines, CSV
    and .txt line by line, Parquet / Arrow files and hub datasets through HF datasets' streaming;
    a JSON list is parsed whole. Raises DataError as read_records does, when the bad line is met."""
    if entry.load_from != "file":
        for record in stream_hub(entry):
            yield entry.source, None, record
        return
    for path in _data_files(entry, text_lines):
        what, suffix = f"dataset {entry.name!r} file", path.suffix.lower()
        if suffix in BUILDERS:
            rows = ((None, record) for record in stream_columnar(entry.name, path))
        elif suffix == ".jsonl":
            rows = read_json_lines(path, what)
        elif suffix == ".csv":
            rows = read_csv_rows(path, what)
        else:
            items, lines = _read_file(entry, path, None)
            rows = zip(lines if lines is not None else (None for _ in items), items)
        for line, record in rows:
            if not isinstance(record, dict):
                raise DataError(f"dataset {entry.name!r} ({quoted(path)} line {line}): expected a JSON object, "
                                f"found {describe_value(record)}; write one {{\"column\": value, ...}} per line")
            yield str(path), line, record


def _data_files(entry: DatasetEntry, text_lines: bool = False) -> list[Path]:
    """The file, or the visible files of the folder, that `entry` names."""
    path = entry.path
    if not path.exists():
        blocker = next((p for p in path.parents if p.is_file()), None)
        if blocker is not None:
            raise DataError(f"dataset {entry.name!r}: file_name {entry.file_name!r} goes through {quoted(blocker)}, "
                            f"which is a file, not a folder; fix file_name in {quoted(entry.registry)}")
        trimmed = entry.dataset_dir / (entry.file_name or "").strip()
        fix = (f"file_name has spaces around it, and {quoted(trimmed.name)} does exist: remove them"
               if trimmed != path and trimmed.exists() else "put the file there or fix file_name")
        raise DataError(
            f"dataset {entry.name!r}: file {quoted(path)} not found (file_name in {quoted(entry.registry)}); {fix}"
        )
    if path.is_dir():
        try:
            members = sorted(p for p in path.iterdir() if not p.name.startswith("."))
            files = [p for p in members if p.is_file()]
        except OSError as exc:
            raise DataError(f"dataset {entry.name!r} folder {describe_os_error(exc, 'read')}") from None
        for member in files:
            if not is_inside(member, entry.dataset_dir):
                raise DataError(
                    f"dataset {entry.name!r}: {quoted(member)} is a symbolic link leading outside dataset_dir "
                    f"{quoted(entry.dataset_dir)}; copy the file into {quoted(path)} instead"
                )
    else:
        files = [path]
    if not text_lines and any(f.suffix.lower() == ".txt" for f in files):
        raise DataError(f"dataset {entry.name!r} ({quoted(path.name)}) {PRETRAIN_MESSAGE}")
    readable = READABLE_SUFFIXES + ((".txt",) if text_lines else ())
    if not files:
        raise DataError(f"dataset {entry.name!r}: file_name names the folder {quoted(path)}, which holds no data "
                        f"files; put {', '.join(readable)} files in it or name a file")
    unreadable = [f.name for f in files if f.suffix.lower() not in readable]
    if unreadable:
        raise DataError(
            f"dataset {entry.name!r}: cannot read {', '.join(unreadable)}; "
            f"supported files are {', '.join(readable)} (convert other formats to JSON lines)"
        )
    return files


def _read_file(entry: DatasetEntry, path: Path, limit: int | None) -> tuple[list[dict], array | None]:
    what = f"dataset {entry.name!r} file"
    suffix = path.suffix.lower()
    if suffix in BUILDERS:  # columnar: through HF datasets, rows named "record N" (hf_files.py)
        return read_columnar(entry.name, path, limit), None
    if suffix == ".jsonl":
        return _numbered(entry, path, read_json_lines(path, what), limit)
    if suffix == ".csv":
        return _numbered(entry, path, read_csv_rows(path, what), limit)
    text = read_text(path, what)
    if suffix == ".txt":  # plain text (text_lines): one record per line
        column = entry.column("prompt")
        return _numbered(entry, path, ((n, {column: line}) for n, line in enumerate(text.splitlines(), 1)),
                         limit)
    if _first_line_is_object(text):  # JSON lines saved as .json: LLaMA-Factory reads them too
        lines = ((n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip(_JSON_SPACE))
        parsed = ((n, parse_json(line, path, what, line=n)) for n, line in lines)
        return _numbered(entry, path, parsed, limit)
    data = parse_json(text, path, what)
    if not isinstance(data, list):
        raise DataError(f"dataset {entry.name!r} file {quoted(path)}: expected a JSON list of records (or one "
                        f"JSON object per line), found {describe_value(data)}")
    data = data[:limit] if limit is not None else data
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"dataset {entry.name!r} ({quoted(path)} record {index}): expected a JSON object, "
                            f"found {describe_value(record)}; each record must be {{\"column\": value, ...}}")
    return data, None


def _numbered(entry: DatasetEntry, path: Path, rows: Iterable[tuple[int, object]],
              limit: int | None) -> tuple[list[dict], array]:
    """Records of a line-based file, and the line each starts on."""
    records, lines = [], array("q")
    if limit is not None and limit <= 0:
        return records, lines
    for number, record in rows:  # a line past the limit is never read, so never refused
        if not isinstance(record, dict):
            raise DataError(f"dataset {entry.name!r} ({quoted(path)} line {number}): expected a JSON object, "
                            f"found {describe_value(record)}; write one {{\"column\": value, ...}} per line")
        records.append(record)
        lines.append(number)
        if len(records) == limit:
            break
    return records, lines


def _first_line_is_object(text: str) -> bool:
    stripped = text.lstrip(_JSON_SPACE)
    if not stripped.startswith("{"):
        return False
    try:
        return isinstance(json.loads(stripped.split("\n", 1)[0]), dict)
    except (json.JSONDecodeError, RecursionError):
        return False
