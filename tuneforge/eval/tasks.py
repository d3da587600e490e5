"""LLaMA-Factory's `task: <benchmark>_<split>` on local files: task_dir/<benchmark>/ holds the
split folders of CSV files (MMLU: data/test, data/val, data/dev; C-Eval and CMMLU: test, val, dev),
or a <benchmark>.zip with them, which is unpacked once into tuneforge's cache. An optional
mapping.json ({subject: {"name", "category"}}) adds per-category accuracy and the subjects'
display names (the Chinese ones for lang: zh). Nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError

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
    mapping = json.loads(mapping_file.read_text(encoding="utf-8")) if mapping_file.is_file() else {}
    return Task(name, split, questions, _find(bases, SPLIT_FOLDERS["dev"]), mapping)


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
    """Unpack once per archive content; members that would land outside the folder are refused."""
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / f"{archive.stem}-{key}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                dest = (tmp / member).resolve()
                if not dest.is_relative_to(tmp.resolve()):
                    raise DataError(f"{archive}: member {member!r} points outside the archive; not unpacked")
            zf.extractall(tmp)
        tmp.rename(target)
    except zipfile.BadZipFile:
        raise DataError(f"{archive} is not a readable zip file") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def category_accuracy(rows: list[dict], choices: list[str], mapping: dict) -> dict[str, float]:
    """Accuracy over every question of each category in mapping.json (as LLaMA-Factory reports)."""
    hits = defaultdict(list)
    for row, choice in zip(rows, choices):
        category = (mapping.get(row["subject"]) or {}).get("category")
        if category:
            hits[category].append(choice == str(row["answer"]).strip().upper())
    return {c: round(100 * sum(v) / len(v), 4) for c, v in sorted(hits.items())}
