"""LLaMA-Factory's `task: <benchmark>_<split>` on local files: task_dir/<benchmark>/ holds the
split folders of CSV files (MMLU: data/test, data/val, data/dev; C-Eval and CMMLU: test, val, dev),
or a <benchmark>.zip with them, which is unpacked once into tuneforge's cache. An optional
mapping.json ({subject: {"name", "category"}}) adds per-category accuracy and the subjects'
display names (the Chinese ones for lang: zh). Nothing is downloaded."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError
from ..fileio import json_kind, one_line, read_json

# a split's folder names; "train" is the few-shot (dev) split, as in LLaMA-Factory's loaders
SPLIT_FOLDERS = {"test": ("test",), "validation": ("val", "validation"), "val": ("val", "validation"),
                 "train": ("dev", "train"), "dev": ("dev", "train")}


@dataclass
class Task:
    name: str
    split: str
    questions: Path
    shots: Path | None
    mapping: dict = field(default_factory=dict)


def parse_task(task: str) -> tuple[str, str]:
    name, _, split = task.rpartition("_")
    if not name or split not in SPLIT_FOLDERS:
        raise ConfigError(f"config key 'task' must be <benchmark>_<split> with split one of "
                          f"{', '.join(SPLIT_FOLDERS)} (e.g. mmlu_test, ceval_validation); got {task!r}")
    return name, split


def resolve_task(task: str, task_dir: str | Path, cache: Path) -> Task:
    name, split = parse_task(task)
    root = Path(task_dir) / name
    if not root.is_dir():
        raise DataError(f"task {task!r}: no folder '{root}'; set task_dir to the folder holding "
                        f"{name}/ (LLaMA-Factory's evaluation/ folder has this layout)")
    bases = _bases(root, name, cache)
    questions = _find(bases, SPLIT_FOLDERS[split])
    if questions is None:
        raise DataError(f"task {task!r}: no '{SPLIT_FOLDERS[split][0]}' folder of CSV files in "
                        f"'{root}' (nor in data/ or {name}.zip there)")
    mapping_file = root / "mapping.json"
    mapping = read_mapping(mapping_file) if mapping_file.exists() else {}
    return Task(name, split, questions, _find(bases, SPLIT_FOLDERS["dev"]), mapping)


def read_mapping(path: Path) -> dict:
    """mapping.json: {subject: {"name": display name, "category": category}}. Raises DataError
    (one line naming the file and subject) when it is unreadable, malformed or of other shapes."""
    data = read_json(path, "task mapping file", DataError)
    if not isinstance(data, dict):
        raise DataError(f"task mapping file '{path}' must hold a JSON object {{subject: {{\"name\": ..., "
                        f"\"category\": ...}}}}, not {json_kind(data)}")
    for subject, entry in data.items():
        if not isinstance(entry, dict):
            raise DataError(f"task mapping file '{path}': subject '{subject}' must map to an object "
                            f"with name and category, not {json_kind(entry)}")
        for key in ("name", "category"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise DataError(f"task mapping file '{path}': '{key}' of subject '{subject}' must be "
                                f"text, not {json_kind(entry[key])}")
    return data


def _bases(root: Path, name: str, cache: Path) -> list[Path]:
    bases = [root, root / "data"]
    archive = root / f"{name}.zip"
    if archive.is_file():
        unpacked = _unpack(archive, cache)
        bases += [unpacked, unpacked / "data", unpacked / name, unpacked / name / "data"]
    return bases


def _find(bases: list[Path], folders: tuple[str, ...]) -> Path | None:
    for base in bases:
        for folder in folders:
            path = base / folder
            if path.is_dir() and any(p.suffix == ".csv" for p in path.iterdir()):
                return path
    return None


def _unpack(archive: Path, cache: Path) -> Path:
    """Unpack once per archive content; an archive that is not a readable zip, or with members
    that would land outside the folder, is refused (DataError) before the cache is touched."""
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / f"{archive.stem}-{key}"
    if target.is_dir():
        return target
    unreadable = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                parts = Path(member).parts
                if Path(member).is_absolute() or ".." in parts:
                    raise DataError(f"{archive}: member {member!r} points outside the archive; not unpacked")
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
            try:
                zf.extractall(tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except unreadable as exc:  # damaged, truncated, encrypted or of a compression Python lacks
        raise DataError(f"task archive '{archive}' {_zip_trouble(archive, exc)}; download or copy "
                        "it again") from None
    return target


def _zip_trouble(archive: Path, exc: Exception) -> str:
    if not isinstance(exc, zipfile.BadZipFile) or "not a zip file" not in str(exc):
        return f"is damaged ({one_line(exc, 160)})"
    with open(archive, "rb") as fh:
        zip_start = fh.read(4) == b"PK\x03\x04"
    return ("is truncated or damaged (its zip directory is missing)" if zip_start
            else "is not a zip file")


def category_accuracy(rows: list[dict], choices: list[str], mapping: dict) -> dict[str, float]:
    """Accuracy over every question of each category in mapping.json (as LLaMA-Factory reports)."""
    hits = defaultdict(list)
    for row, choice in zip(rows, choices):
        category = (mapping.get(row["subject"]) or {}).get("category")
        if category:
            hits[category].append(choice == str(row["answer"]).strip().upper())
    return {c: round(100 * sum(v) / len(v), 4) for c, v in sorted(hits.items())}
