"""`tuneforge convert-data`: records with other column names (question/answer JSON, a CSV of
prompts and replies, ...) written as LLaMA-Factory alpaca or sharegpt records, the conversion the
LLaMA-Factory tutorials do by hand, plus the `dataset_info.json` entry that names the result.

Alpaca keys: instruction, input, output, system, history (LLaMA-Factory's alpaca columns).
Sharegpt: a single-turn conversation from the instruction (+ input) and output columns, and a
system text. Nothing is overwritten: an existing output file, or a dataset name already in
`dataset_info.json`, is refused in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tuneforge.errors import DataError
from tuneforge.fileio import json_kind, quoted, read_csv_rows, read_json, read_json_lines, writing

KEYS = ("instruction", "input", "output", "system", "history")
# column names that usually hold each key, tried in order when --map does not name one
GUESSES = {
    "instruction": ("instruction", "question", "query", "prompt", "problem", "q"),
    "input": ("input", "context"),
    "output": ("output", "answer", "response", "completion", "solution", "target", "a"),
    "system": ("system", "system_prompt"),
    "history": ("history",),
}
READABLE = (".json", ".jsonl", ".csv")


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for each record of a .json (a list of objects), .jsonl or .csv file.
    Raises DataError (one line, naming the file and record) for anything else."""
    suffix = path.suffix.lower()
    if suffix not in READABLE:
        raise DataError(f"convert-data: {quoted(path)} is not {', '.join(READABLE)}; save it as one of those")
    if suffix == ".csv":
        return [(f"{quoted(path)} line {n}", row) for n, row in read_csv_rows(path, "input file")]
    if suffix == ".jsonl":
        rows = [(f"{quoted(path)} line {n}", value) for n, value in read_json_lines(path, "input file")]
    else:
        value = read_json(path, "input file")
        if not isinstance(value, list):
            raise DataError(f"convert-data: {quoted(path)} holds {json_kind(value)}, not a list of records")
        rows = [(f"{quoted(path)} record {i}", item) for i, item in enumerate(value)]
    for where, record in rows:
        if not isinstance(record, dict):
            raise DataError(f"convert-data: {where} is {json_kind(record)}, not an object with columns")
    return rows


def column_map(given: dict[str, str], columns: list[str]) -> dict[str, str]:
    """key -> column: the --map pairs, the rest guessed from common names among `columns`. Raises DataError for an unknown key, a column no record has, or no
    instruction or output column."""
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise DataError(f"convert-data: --map {unknown[0]}=...: the keys are {', '.join(KEYS)}")
    mapping = dict(given)
    taken = set(mapping.values())
    for key in KEYS:
        if key not in mapping:
            found = next((c for c in GUESSES[key] if c in columns and c not in taken), None)
            if found is not None:
                mapping[key] = found
                taken.add(found)
    for key in ("instruction", "output"):
        if key not in mapping:
            raise DataError(f"convert-data: no column for {key!r} among {', '.join(map(repr, columns)) or 'none'}; "
                            f"name it with --map {key}=<column>")
    return mapping


def _text(where: str, record: dict, key: str, column: str | None, required: bool) -> str:
    value = record.get(column) if column else None
    if value is None or value == "":
        if required:
            raise DataError(f"convert-data: {where} has no {column!r} text (the {key}); fill it or remove the record")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"convert-data: {where} column {column!r} holds {json_kind(value)}, not text")
    return value


def convert(rows: list[tuple[str, dict]], mapping: dict[str, str], to: str = "alpaca") -> list[dict]:
    """The records in LLaMA-Factory's `to` format ("alpaca" or "sharegpt")."""
    out = []
    for where, record in rows:
        text = {k: _text(where, record, k, mapping.get(k), k in ("instruction", "output"))
                for k in ("instruction", "input", "output", "system")}
        history = record.get(mapping["history"]) if "history" in mapping else None
        if to == "alpaca":
            item: dict[str, Any] = {k: text[k] for k in ("instruction", "input", "output")}
            if text["system"]:
                item["system"] = text["system"]
            if history:
                item["history"] = history
        else:
            user = "\n".join(t for t in (text["instruction"], text["input"]) if t)
            item = {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": text["output"]}]}
            if text["system"]:
                item["system"] = text["system"]
        out.append(item)
    return out


def entry_for(output: Path, to: str, records: list[dict]) -> dict:
    """The dataset_info.json entry for the written file: LLaMA-Factory's default column names,
    plus the system and history columns when records have them (they have no default)."""
    entry: dict[str, Any] = {"file_name": output.name}
    if to == "sharegpt":
        entry["formatting"] = "sharegpt"
    extra = [k for k in ("system", "history") if any(k in r for r in records)]
    if extra:
        base = {"prompt": "instruction", "query": "input", "response": "output"} if to == "alpaca" \
            else {"messages": "conversations"}
        entry["columns"] = {**base, **{k: k for k in extra}}
    return entry


def write_new(path: Path, text: str, what: str) -> None:
    """Write a file that must not exist yet, through a temporary name (never a half-written file)."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(what, DataError):
            temp.write_text(text, encoding="utf-8")
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def register(output: Path, name: str, entry: dict) -> Path:
    """Add `name` to the dataset_info.json beside `output` (made if absent). Raises DataError when
    the name is already there or the file is not a JSON object; the file is replaced whole."""
    info_path = output.parent / "dataset_info.json"
    info = read_json(info_path, "dataset_info.json") if info_path.exists() else {}
    if not isinstance(info, dict):
        raise DataError(f"convert-data: {quoted(info_path)} holds {json_kind(info)}, not an object of datasets")
    if name in info:
        raise DataError(f"convert-data: {quoted(info_path)} already has a dataset named {name!r}; pass --name")
    info[name] = entry
    temp = info_path.with_name(f".dataset_info.json.tmp-{os.getpid()}")
    try:
        with writing(str(info_path), DataError):
            temp.write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            os.replace(temp, info_path)
    finally:
        temp.unlink(missing_ok=True)
    return info_path


def convert_file(source: str | Path, output: str | Path, to: str = "alpaca", maps: list[str] | None = None,
                 name: str | None = None, add_to_info: bool = False) -> tuple[list[str], int]:
    """Convert `source` into `output` (.json or .jsonl) and maybe register it; (lines to print,
    records written). Raises DataError (one line) for any bad input; nothing is written then."""
    source, output = Path(source), Path(output)
    if to not in ("alpaca", "sharegpt"):
        raise DataError(f"convert-data: --to {to!r}: choose alpaca or sharegpt")
    if output.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"convert-data: the output {quoted(output)} must end in .json or .jsonl")
    if output.exists():
        raise DataError(f"convert-data: {quoted(output)} exists; choose another output name (nothing is overwritten)")
    given = {}
    for item in maps or []:
        key, sep, column = item.partition("=")
        if not sep or not key.strip() or not column.strip():
            raise DataError(f"convert-data: --map {item!r} must look like key=column, e.g. instruction=question")
        given[key.strip()] = column.strip()
    rows = read_rows(source)
    if not rows:
        raise DataError(f"convert-data: {quoted(source)} has no records")
    columns = list(dict.fromkeys(c for _, r in rows for c in r))  # every record's, in first-seen order
    mapping = column_map(given, columns)
    missing = [c for c in mapping.values() if all(c not in r for _, r in rows)]
    if missing:
        raise DataError(f"convert-data: no record has a column {missing[0]!r}; the columns are "
                        f"{', '.join(map(repr, columns))}")
    records = convert(rows, mapping, to)
    if output.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    write_new(output, text, str(output))
    name = name or output.stem
    entry = entry_for(output, to, records)
    lines = [", ".join(f"{k} <- {c!r}" for k, c in mapping.items()),
             f"wrote {len(records)} {to} records to {quoted(output)}"]
    if add_to_info:
        lines.append(f"added {name!r} to {quoted(register(output, name, entry))}; train with dataset: {name}")
    else:
        lines.append(f"dataset_info.json entry: {json.dumps({name: entry}, ensure_ascii=False)}")
    return lines, len(records)
