"""Read a registered data file (or folder of files) into a list of records (dicts)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tuneforge.errors import DataError

from .registry import DatasetEntry

READABLE_SUFFIXES = (".json", ".jsonl", ".csv")
PRETRAIN_MESSAGE = (
    "is plain text for pretraining: pretraining datasets need stage: pt, "
    "which the supervised (sft) data loader does not handle; pick a dataset with instruction/response "
    "(alpaca) or conversations (sharegpt) records"
)


def read_records(entry: DatasetEntry, max_samples: int | None = None) -> list[dict]:
    """All records of `entry`'s file(s), the first `max_samples` of them when that is set."""
    path = entry.path
    if not path.exists():
        raise DataError(
            f"dataset {entry.name!r}: file {path} not found (file_name in "
            f"{entry.dataset_dir / 'dataset_info.json'}); put the file there or fix file_name"
        )
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    if any(f.suffix == ".txt" for f in files):
        raise DataError(f"dataset {entry.name!r} ({path.name}) {PRETRAIN_MESSAGE}")
    unreadable = [f.name for f in files if f.suffix not in READABLE_SUFFIXES]
    if unreadable or not files:
        raise DataError(
            f"dataset {entry.name!r}: cannot read {', '.join(unreadable) or f'empty folder {path}'}; "
            f"supported files are {', '.join(READABLE_SUFFIXES)} (convert other formats to JSON lines)"
        )
    records: list[dict] = []
    for file in files:
        records.extend(_read_file(file, None if max_samples is None else max_samples - len(records)))
        if max_samples is not None and len(records) >= max_samples:
            break
    return records


def _read_file(path: Path, limit: int | None) -> list[dict]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, limit)
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return rows[:limit] if limit is not None else rows
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # Like `datasets`, accept JSON lines saved with a .json suffix.
        if err.msg == "Extra data" and _first_line_is_object(text):
            return _read_jsonl(path, limit)
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix the file"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records at the top level, found a {type(data).__name__}")
    data = data[:limit] if limit is not None else data
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is a {type(record).__name__}, expected a JSON object")
    return data


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path} line {line_number}: malformed JSON at column {err.colno}: {err.msg}; fix that line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {line_number}: expected a JSON object, found a {type(record).__name__}")
            records.append(record)
    return records


def _first_line_is_object(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False
