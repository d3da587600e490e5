"""The dataset picker: names in dataset_dir/dataset_info.json and a preview of a dataset's first
records with its count, read by tuneforge's own data code (data/registry.py, data/readers.py),
so the page shows what a run would read. No gradio here."""

from __future__ import annotations

from ..data.readers import read_records
from ..data.registry import get_entry, load_registry, resolve_dataset_dir
from ..errors import TuneforgeError
from ..train.stages import STAGES


def dataset_names(dataset_dir: str | None) -> list[str]:
    """The registered names ([] when the folder or its registry cannot be read)."""
    try:
        return sorted(load_registry(resolve_dataset_dir(dataset_dir or None)))
    except (TuneforgeError, OSError):
        return []


def preview(dataset_dir: str | None, name: str, stage: str = "sft", count: int = 5) -> tuple[int | None, list[dict]]:
    """(number of records, the first `count` records as read from the file) of dataset `name`
    for a run of `stage`. Raises DataError (one line naming the entry or file) as that run would
    for an unknown, missing or malformed dataset. A hub dataset is not downloaded: (None, [])."""
    records_kind = STAGES[stage].records if stage in STAGES else "conversations"
    folder = resolve_dataset_dir(dataset_dir or None)
    entry = get_entry(folder, load_registry(folder), name, records_kind)
    if entry.load_from != "file":
        return None, []
    records = read_records(entry, None, text_lines=records_kind == "text")
    return len(records), [records[i] for i in range(min(count, len(records)))]


def check_datasets(dataset_dir: str | None, names, stage: str = "sft") -> list[str]:
    """The DataError messages a run of `stage` would stop with for the datasets `names` (a comma
    string or list): an unreadable registry, an unknown name, an entry the stage cannot train on.
    The files themselves are read by the run."""
    if isinstance(names, str):
        names = names.split(",")
    if not any(n.strip() for n in names or []):  # the run's own refusal (data/loader.py)
        return ["no dataset given: set dataset: to one or more names from dataset_info.json, e.g. identity"]
    records_kind = STAGES[stage].records if stage in STAGES else "conversations"
    try:
        folder = resolve_dataset_dir(dataset_dir or None)
        registry = load_registry(folder)
        for name in (n.strip() for n in names or [] if n.strip()):
            get_entry(folder, registry, name, records_kind)
    except TuneforgeError as exc:
        return [str(exc)]
    return []
