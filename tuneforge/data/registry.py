"""The dataset registry: a folder's `dataset_info.json`, in LLaMA-Factory's schema.

Each entry names a file and says how its records map to a conversation:
`file_name`, `formatting` (alpaca | sharegpt), `columns`, `tags`, `ranking`, `num_samples`, ...
Every value is checked for its type here, before any data file is read, and `file_name` must
stay inside the registry's folder (no absolute paths, no `..` or symbolic link leading out).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import DataError
from tuneforge.fileio import quoted, read_json

from .hf_files import hub_access
from .issues import describe_value

logger = logging.getLogger(__name__)

REGISTRY_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")
HUB_SCHEMES = {"hf_hub": "hf://datasets/", "ms_hub": "modelscope://"}  # how a hub dataset is named in messages
# LLaMA-Factory's entry keys; subset, split and folder only matter for hub datasets (LLaMA-Factory
# reads a file as its one "train" split).
ENTRY_KEYS = ("file_name", "formatting", "ranking", "columns", "tags", "num_samples",
              "subset", "split", "folder", "cloud_file_name", *HUB_KEYS)
# the datasets of LLaMA-Factory's data/ folder (its demo sets), which tuneforge does not ship but its
# examples name: a missing one is explained (`_not_shipped`) rather than only said to be missing
LF_DEMO_DATASETS = ("alpaca_en_demo", "alpaca_zh_demo", "glaive_toolcall_en_demo", "glaive_toolcall_zh_demo",
                    "mllm_demo", "mllm_audio_demo", "mllm_video_demo", "mllm_video_audio_demo", "dpo_en_demo",
                    "dpo_zh_demo", "kto_en_demo", "wiki_demo", "c4_demo")
LF_DATA = "https://github.com/hiyouga/LLaMA-Factory/tree/main/data"
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools",
               "images", "videos", "audios", "chosen", "rejected", "kto_tag")

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
ROLE_TAGS = ("user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
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
    num_samples: int | None = None  # LLaMA-Factory: sample this many records (repeating if more)
    load_from: str = "file"  # or hf_hub, ms_hub, om_hub, script, cloud_file (LLaMA-Factory's precedence)
    subset: str | None = None  # a hub dataset's configuration (datasets' `name`)
    split: str = "train"
    folder: str | None = None  # a folder inside the hub dataset (datasets' `data_dir`)

    @property
    def path(self) -> Path:
        return self.dataset_dir / (self.file_name or "")

    @property
    def source(self) -> str:
        """Where the records come from, for messages: the file, or the hub dataset."""
        if self.load_from in HUB_SCHEMES and self.hub_url:
            return f"{HUB_SCHEMES[self.load_from]}{self.hub_url}"
        return str(self.path)

    @property
    def registry(self) -> Path:
        return self.dataset_dir / REGISTRY_FILE

    def column(self, key: str) -> str | None:
        """The record key that holds `key` (prompt, response, messages, ...), or None if unmapped."""
        return self.columns.get(key)


BUNDLED_DATA = Path(__file__).resolve().parents[1] / "resources" / "data"  # the demo data tuneforge ships


def _not_shipped(names) -> str | None:
    """For datasets among `names` that are LLaMA-Factory's demo sets: what to do to read them, else None."""
    theirs = [name for name in dict.fromkeys(names) if name in LF_DEMO_DATASETS]
    if not theirs:
        return None
    which = f"{theirs[0]} is one of LLaMA-Factory's demo datasets" if len(theirs) == 1 else \
        f"{', '.join(theirs)} are LLaMA-Factory's demo datasets"
    return (f"{which}, which tuneforge does not ship: set dataset_dir to a copy of LLaMA-Factory's data/ "
            f"folder ({LF_DATA}; on the command line: dataset_dir=path/to/LLaMA-Factory/data)")


def default_dataset_dir() -> Path:
    """`./data` when it holds a dataset_info.json, else the demo data shipped with tuneforge."""
    local = Path("data")
    if (local / REGISTRY_FILE).is_file():
        return local.resolve()
    bundled = BUNDLED_DATA
    logger.info("dataset_dir is not set and ./data has no %s: reading the datasets bundled with tuneforge (%s) "
                "from %s", REGISTRY_FILE, ", ".join(sorted(json.loads((bundled / REGISTRY_FILE).read_text()))),
                bundled)
    return bundled


def resolve_dataset_dir(dataset_dir: str | Path | None) -> Path:
    """The folder to read datasets from: `dataset_dir` as the user gave it, or the default."""
    return default_dataset_dir() if dataset_dir in (None, "") else Path(dataset_dir).expanduser()


def load_registry(dataset_dir: Path, names=()) -> dict[str, dict]:
    """Read `dataset_dir/dataset_info.json` as a dict of raw entries; `names`: the datasets the
    config asks for (only for the message when there is no registry).

    Raises DataError (one line) when dataset_dir is missing or a file, when the registry is
    missing, a folder, not UTF-8, malformed or nested too deeply, or not a JSON object. When it
    is missing and `names` holds LLaMA-Factory's demo sets, the line says where to get them.
    """
    path = dataset_dir / REGISTRY_FILE
    fix = _not_shipped(names) or (f"set dataset_dir to the folder holding {REGISTRY_FILE} (or leave it unset "
                                  "to use ./data or the shipped demo data)")
    if not dataset_dir.is_dir():
        what = "is a file, not a folder" if dataset_dir.exists() else "does not exist"
        raise DataError(f"dataset_dir {quoted(dataset_dir)} {what}: {fix}")
    if path.is_dir():
        raise DataError(f"{quoted(path)} is a folder, not a file: {REGISTRY_FILE} must be the JSON file "
                        "that registers the datasets")
    if not path.exists():
        raise DataError(f"dataset_dir {quoted(dataset_dir)} has no {REGISTRY_FILE}: {fix}")
    registry = read_json(path, "dataset registry")
    if not isinstance(registry, dict):
        raise DataError(f"{quoted(path)}: expected a JSON object mapping dataset names to entries, found "
                        f"{describe_value(registry)}; write it as {{\"name\": {{\"file_name\": ...}}}}")
    return registry


def get_entry(dataset_dir: Path, registry: dict[str, dict], name: str,
              records: str = "conversations") -> DatasetEntry:
    """The entry for `name`, checked for the problems we can report before reading any file,
    for a stage that reads `records` (conversations, text or pairwise: train.stages.table).

    Raises DataError naming the entry and key for an unknown name, a value of the wrong type,
    a file_name that leaves dataset_dir, and data that stage does not train on (preference data
    but for pairwise, other data for pairwise, KTO, multimodal, hub-only).
    """
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.6)
        known = f"known: {', '.join(sorted(registry)[:12])}{', ...' if len(registry) > 12 else ''}"
        shipped = dataset_dir.resolve() == BUNDLED_DATA  # dataset_dir unset: tuneforge's own demo data
        if shipped and _not_shipped([name]):
            hint = f" ({known}); {_not_shipped([name])}"
        elif close:
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?"
        elif shipped:  # the installed package's folder is no place for the user's datasets
            hint = f" ({known}); set dataset_dir to the folder whose {REGISTRY_FILE} registers it"
        else:
            hint = f"; add it there ({known})"
        raise DataError(f"dataset {name!r} is not in {quoted(dataset_dir / REGISTRY_FILE)}{hint}")
    raw = registry[name]
    where = f"dataset {name!r} in {quoted(dataset_dir / REGISTRY_FILE)}"
    if not isinstance(raw, dict):
        raise DataError(f"{where}: the entry must be a JSON object, found {describe_value(raw)}; "
                        'write it as {"file_name": "<your file>"}')
    _warn_unknown(where, "", raw, ENTRY_KEYS)
    formatting = raw.get("formatting", "alpaca")
    if not isinstance(formatting, str) or formatting not in FORMATTINGS:
        raise DataError(f"{where}: formatting must be \"alpaca\" or \"sharegpt\", found "
                        f"{describe_value(formatting)}")
    ranking = raw.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: ranking must be true or false, found {describe_value(ranking)}")
    columns = _names_map(where, "columns", raw.get("columns"), COLUMN_KEYS)
    tags = _names_map(where, "tags", raw.get("tags"), tuple(DEFAULT_TAGS))
    entry = DatasetEntry(
        name=name,
        dataset_dir=dataset_dir,
        file_name=_file_name(where, dataset_dir, raw.get("file_name")),
        formatting=formatting,
        formatting_given="formatting" in raw,
        ranking=ranking,
        columns={**DEFAULT_COLUMNS[formatting], **columns},
        given_columns=frozenset(columns),
        tags={**DEFAULT_TAGS, **tags},
        num_samples=_num_samples(where, raw.get("num_samples")),
        **_source(where, raw),
    )
    _check_tags_distinct(where, entry.tags)
    _check_supported(entry, where, records)
    return entry


def _source(where: str, raw: dict) -> dict:
    """Where LLaMA-Factory reads the entry from: a hub URL wins over file_name (ms_hub_url over
    hf_hub_url with USE_MODELSCOPE_HUB=1 or use_modelscope_hub: true, or when it is the only one, om_hub_url likewise with
    USE_OPENMIND_HUB=1), then script_url, cloud_file_name, file_name."""
    texts = {}
    for key in (*HUB_KEYS, "cloud_file_name", "subset", "split", "folder"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{where}: {key} must be a non-empty name (a string), found {describe_value(value)}")
        texts[key] = value.strip() if isinstance(value, str) else None
    hf, ms, om = texts["hf_hub_url"], texts["ms_hub_url"], texts["om_hub_url"]
    if ms and (_env_flag("USE_MODELSCOPE_HUB") or hub_access().modelscope or not hf):
        load_from, url = "ms_hub", ms
    elif om and (_env_flag("USE_OPENMIND_HUB") or not hf):
        load_from, url = "om_hub", om
    elif hf:
        load_from, url = "hf_hub", hf
    elif texts["script_url"]:
        load_from, url = "script", texts["script_url"]
    elif texts["cloud_file_name"]:
        load_from, url = "cloud_file", texts["cloud_file_name"]
    else:
        load_from, url = "file", None
    return {"load_from": load_from, "hub_url": url, "subset": texts["subset"], "split": texts["split"] or "train",
            "folder": texts["folder"]}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn_unknown(where: str, section: str, given: dict, known: tuple[str, ...]) -> None:
    """Keys LLaMA-Factory does not know are ignored, as there, but said (a typo would otherwise
    silently fall back to a default)."""
    unknown = [key for key in given if key not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    logger.warning("%s: unknown %skey%s %s ignored; known: %s", where, section,
                   "s" if len(unknown) > 1 else "", ", ".join(hints), ", ".join(known))


def _names_map(where: str, section: str, value, known: tuple[str, ...]) -> dict[str, str]:
    """`columns` or `tags`: a JSON object whose values are non-empty names (strings)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: {section} must be a JSON object like {{\"{known[0]}\": \"<name>\"}}, "
                        f"found {describe_value(value)}")
    for key, name in value.items():
        if not isinstance(name, str) or not name.strip():
            what = "column of your records" if section == "columns" else "key or role in your messages"
            raise DataError(f"{where}: {section}.{key} must be the name of a {what} (a string), "
                            f"found {describe_value(name)}")
    _warn_unknown(where, f"{section} ", value, known)
    return {key: name for key, name in value.items() if key in known}


def _check_tags_distinct(where: str, tags: dict[str, str]) -> None:
    """Two roles with one tag would silently turn one into the other."""
    seen: dict[str, str] = {}
    for key in ROLE_TAGS:
        if tags[key] in seen:
            raise DataError(f"{where}: tags.{seen[tags[key]]} and tags.{key} are both "
                            f"{tags[key]!r}; give each role its own tag")
        seen[tags[key]] = key
    if tags["role_tag"] == tags["content_tag"]:
        raise DataError(f"{where}: tags.role_tag and tags.content_tag are both "
                        f"{tags['role_tag']!r}; they name two different keys of a message")


def _file_name(where: str, dataset_dir: Path, value) -> str | None:
    """file_name: a path relative to dataset_dir that stays inside it, symbolic links resolved."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: file_name must be a file or folder name (a string) relative to "
                        f"{quoted(dataset_dir)}, found {describe_value(value)}")
    if not value.strip():
        return None
    fix = f"copy the data into {quoted(dataset_dir)} and give its path relative to that folder"
    if "\x00" in value:
        raise DataError(f"{where}: file_name {value!r} holds a NUL character; fix the name")
    if Path(value).is_absolute():
        raise DataError(f"{where}: file_name {value!r} is an absolute path; {fix}")
    if not is_inside(dataset_dir / value, dataset_dir):
        raise DataError(f"{where}: file_name {value!r} leads outside dataset_dir {quoted(dataset_dir)} "
                        f"(through '..' or a symbolic link); {fix}")
    return value


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every symbolic link and '..' resolved, lies in `folder` (resolved too)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop or a NUL leads nowhere safe
        return False


def _num_samples(where: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{where}: num_samples must be a whole number of records of 1 or more, "
                        f"found {describe_value(value)}")
    return value


OTHER_DATASET = {"conversations": "an SFT dataset", "text": "a plain-text dataset",
                 "kto": "KTO data (replies tagged desirable or not: a kto_tag column, e.g. kto_en_demo)"}


def _check_supported(entry: DatasetEntry, where: str, records: str) -> None:
    """Reject, with the reason, entries a stage reading `records` cannot train on."""
    if entry.ranking and records != "pairwise":
        raise DataError(
            f"{where} is preference data (ranking: true): it needs stage: rm or dpo; set stage: "
            f"dpo (or rm), or pick {OTHER_DATASET.get(records, 'another dataset')}"
        )
    if entry.column("kto_tag") and records != "kto":
        raise DataError(
            f"{where} is KTO data (a kto_tag column): it needs stage: kto; set stage: kto, or pick "
            f"{OTHER_DATASET.get(records, 'a preference dataset (ranking: true)')}"
        )
    if records == "kto" and not entry.column("kto_tag"):
        raise DataError(
            f"{where} is not KTO data (no kto_tag in its columns): stage: kto needs conversations with "
            'a true/false tag on the last reply; map it as "columns": {"kto_tag": "<column>"} or pick '
            "such a dataset (e.g. kto_en_demo)"
        )
    if records == "pairwise" and not entry.ranking:
        raise DataError(
            f"{where} is not preference data (no \"ranking\": true): this stage needs records with a "
            "chosen and a rejected reply; pick such a dataset (e.g. dpo_en_demo) or set stage: sft"
        )
    media = [c for c in MEDIA_COLUMNS if entry.column(c)]
    if media:
        raise DataError(f"{where} has {', '.join(media)} columns: multimodal datasets are not supported yet")
    refused = {
        "om_hub": "om_hub_url: LLaMA-Factory's Modelers (OpenMind) hub is not supported",
        "script": "script_url: dataset loading scripts are not supported (HF datasets 4 dropped them)",
        "cloud_file": "cloud_file_name: LLaMA-Factory's S3 / GCS files are not supported",
    }
    if entry.load_from in refused:
        raise DataError(f"{where}: {refused[entry.load_from]}; convert the data to a file in "
                        f"{quoted(entry.dataset_dir)} and register it with file_name, or give an hf_hub_url")
    if entry.load_from == "file" and entry.split != "train":  # LLaMA-Factory: "Unknown split" from datasets
        raise DataError(f"{where}: split {entry.split!r} names a split of a hub dataset, and a file is read as its "
                        "one \"train\" split; remove split, or register each split's file as its own dataset")
    if entry.load_from == "file" and (entry.subset or entry.folder):
        logger.warning("%s: %s only apply to hub datasets (hf_hub_url); a file is read whole", where,
                       " and ".join(k for k in ("subset", "folder") if getattr(entry, k)))
    if entry.load_from == "file" and not entry.file_name:
        raise DataError(f"{where} has no file_name: add the data file's name relative to {quoted(entry.dataset_dir)}")
