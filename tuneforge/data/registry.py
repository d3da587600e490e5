"""The dataset registry: a folder's `dataset_info.json`, in LLaMA-Factory's schema.

Each entry names a file and says how its records map to a conversation:
`file_name`, `formatting` (alpaca | sharegpt), `columns`, `tags`, `ranking`, ...
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import DataError

REGISTRY_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")

# LLaMA-Factory's defaults, so a user's existing dataset_info.json means the same here.
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
}
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
MEDIA_COLUMNS = ("images", "videos", "audios")


@dataclass
class DatasetEntry:
    """One registered dataset, with LLaMA-Factory's defaults filled in."""

    name: str
    dataset_dir: Path
    file_name: str | None = None
    formatting: str = "alpaca"
    formatting_given: bool = False  # an entry without `formatting` may be plain pretraining text
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    given_columns: frozenset[str] = frozenset()  # the keys the entry set itself, before defaults
    tags: dict[str, str] = field(default_factory=dict)
    hub_url: str | None = None

    @property
    def path(self) -> Path:
        return self.dataset_dir / (self.file_name or "")

    def column(self, key: str) -> str | None:
        """The record key that holds `key` (prompt, response, messages, ...), or None if unmapped."""
        return self.columns.get(key)


def default_dataset_dir() -> Path:
    """`./data` when it holds a dataset_info.json, else the demo data shipped with tuneforge."""
    local = Path("data")
    if (local / REGISTRY_FILE).is_file():
        return local.resolve()
    return Path(__file__).resolve().parents[1] / "resources" / "data"


def resolve_dataset_dir(dataset_dir: str | Path | None) -> Path:
    return default_dataset_dir() if dataset_dir in (None, "") else Path(dataset_dir).expanduser()


def load_registry(dataset_dir: Path) -> dict[str, dict]:
    """Read `dataset_dir/dataset_info.json` as a dict of raw entries."""
    path = dataset_dir / REGISTRY_FILE
    if not path.is_file():
        where = "does not exist" if not dataset_dir.is_dir() else f"has no {REGISTRY_FILE}"
        raise DataError(
            f"dataset_dir {dataset_dir} {where}: set dataset_dir to the folder holding "
            f"{REGISTRY_FILE} (or leave it unset to use ./data or the shipped demo data)"
        )
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix the file"
        ) from None
    if not isinstance(registry, dict):
        raise DataError(f"{path}: expected a JSON object mapping dataset names to entries")
    return registry


def get_entry(dataset_dir: Path, registry: dict[str, dict], name: str) -> DatasetEntry:
    """The entry for `name`, checked for the problems we can report before reading any file."""
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
            f"; add it there (known: {', '.join(sorted(registry)[:12])}{', ...' if len(registry) > 12 else ''})"
        )
        raise DataError(f"dataset {name!r} is not in {dataset_dir / REGISTRY_FILE}{hint}")
    raw = registry[name]
    where = f"dataset {name!r} in {dataset_dir / REGISTRY_FILE}"
    if not isinstance(raw, dict):
        raise DataError(f"{where}: the entry must be a JSON object")
    formatting = raw.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    columns, tags = raw.get("columns") or {}, raw.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataError(f"{where}: 'columns' and 'tags' must be JSON objects")
    entry = DatasetEntry(
        name=name,
        dataset_dir=dataset_dir,
        file_name=raw.get("file_name"),
        formatting=formatting,
        formatting_given="formatting" in raw,
        ranking=bool(raw.get("ranking", False)),
        columns={**DEFAULT_COLUMNS[formatting], **columns},
        given_columns=frozenset(columns),
        tags={**DEFAULT_TAGS, **tags},
        hub_url=next((raw[k] for k in HUB_KEYS if raw.get(k)), None),
    )
    _check_supported(entry, where)
    return entry


def _check_supported(entry: DatasetEntry, where: str) -> None:
    """Reject, with the reason, entries this loader cannot turn into SFT conversations."""
    if entry.ranking:
        raise DataError(
            f"{where} is preference data (ranking: true): it needs stage: rm or dpo, "
            "which tuneforge does not support yet; pick an SFT dataset"
        )
    if entry.column("kto_tag"):
        raise DataError(
            f"{where} is KTO data (a kto_tag column): it needs stage: kto, "
            "which tuneforge does not support yet; pick an SFT dataset"
        )
    media = [c for c in MEDIA_COLUMNS if entry.column(c)]
    if media:
        raise DataError(f"{where} has {', '.join(media)} columns: multimodal datasets are not supported yet")
    if not entry.file_name:
        if entry.hub_url:
            raise DataError(
                f"{where} lives on a hub ({entry.hub_url}) and tuneforge works offline: download it, "
                f"save it as .json or .jsonl in {entry.dataset_dir}, and register it with file_name"
            )
        raise DataError(f"{where} has no file_name: add the data file's name relative to {entry.dataset_dir}")
