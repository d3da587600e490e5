"""Data read through Hugging Face `datasets`: Parquet and Arrow files (columnar, so their rows
are named "record N", counted from 0 in the file) and hub datasets (`hf_hub_url`, `ms_hub_url`).

Hub datasets honour the model section's hub keys as model loading does (tuneforge/hub.py) and as
LLaMA-Factory passes them to `load_dataset`: `hf_hub_token` (token=), `cache_dir` (cache_dir=; the
offline fallback looks for the snapshot in that hub cache too) and `use_modelscope_hub`
(ms_hub_url over hf_hub_url, as USE_MODELSCOPE_HUB=1). A run sets
them for the data it reads with `dataset_hub(model_args)` (workflows.train / evaluate).

JSON, JSON lines, CSV and plain text stay with tuneforge's own readers (readers.py): `datasets`
parses them with pyarrow, whose errors say "An error occurred while generating the dataset" (the
cause, "in row 1", counts rows of a block, not lines of the file), so a bad line could no longer
be named. Columnar files have no lines to name, and pyarrow reads them exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import DataError
from tuneforge.fileio import quoted

logger = logging.getLogger(__name__)

BUILDERS = {".parquet": ("parquet", "Parquet"), ".arrow": ("arrow", "Arrow")}


@dataclass(frozen=True)
class HubAccess:
    """The model section's hub keys, as hub datasets use them."""

    token: str | None = None
    cache_dir: str | None = None
    modelscope: bool = False


_ACCESS: contextvars.ContextVar[HubAccess] = contextvars.ContextVar("tuneforge_dataset_hub", default=HubAccess())


def hub_access() -> HubAccess:
    """The hub keys of the run reading data now (defaults outside `dataset_hub`)."""
    return _ACCESS.get()


@contextlib.contextmanager
def dataset_hub(model_args):
    """Within the block, hub datasets are read with model_args' hf_hub_token, cache_dir and
    use_modelscope_hub (ModelArguments, or anything with those attributes)."""
    token = _ACCESS.set(HubAccess(getattr(model_args, "hf_hub_token", None) or None,
                                  getattr(model_args, "cache_dir", None) or None,
                                  bool(getattr(model_args, "use_modelscope_hub", False))))
    try:
        yield
    finally:
        _ACCESS.reset(token)


def read_columnar(name: str, path: Path, limit: int | None) -> list[dict]:
    """The rows of a .parquet or .arrow file (the first `limit` of them when set), as dicts.

    Raises DataError (one line naming the dataset and file) when pyarrow cannot read it."""
    import datasets

    builder, kind = BUILDERS[path.suffix.lower()]
    try:
        with quiet():
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - pyarrow and datasets raise many kinds for a damaged file
        raise DataError(f"dataset {name!r} file {quoted(path)} cannot be read as {kind} ({cause(exc)}); "
                        f"check that it is a {kind} file (e.g. written by pandas or datasets), or convert it "
                        "to JSON lines") from None
    if limit is not None:
        table = table.select(range(min(max(limit, 0), len(table))))
    return table.to_list()


def cause(exc: BaseException) -> str:
    """The innermost error's first line: datasets wraps pyarrow's in DatasetGenerationError."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class quiet:
    """datasets' progress bars and log lines for a local file are noise in a training log."""

    def __enter__(self):
        import datasets

        self._was = datasets.utils.logging.is_progress_bar_enabled()
        self._level = datasets.utils.logging.get_verbosity()
        datasets.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity(logging.CRITICAL)  # its errors come back as ours, in one line
        return self

    def __exit__(self, *exc):
        import datasets

        datasets.utils.logging.set_verbosity(self._level)
        if self._was:
            datasets.utils.logging.enable_progress_bar()
        return False


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def datasets_cache() -> str:
    """HF datasets' cache of prepared data, read when used (as tuneforge.hub reads the hub cache):
    $HF_DATASETS_CACHE, else $HF_HOME/datasets, else ~/.cache/huggingface/datasets."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return str(Path(os.environ["HF_DATASETS_CACHE"]).expanduser())
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return str(Path(home).expanduser() / "datasets")


def read_hub(entry, limit: int | None) -> list[dict]:
    """The rows of a hub dataset (hf_hub_url or ms_hub_url, with subset, split and folder), the
    first `limit` of them when set. Hugging Face: with HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1)
    from the local hub cache only; online through datasets.load_dataset (with hub_access()'s token
    and cache_dir), falling back to the cache when the hub cannot be reached. Raises
    DataError (one line naming the dataset) otherwise."""
    if entry.load_from == "ms_hub":
        table = _modelscope(entry)
    elif offline():
        table = _from_snapshot(entry, _snapshot(entry), "HF_HUB_OFFLINE is set")
    else:
        import datasets

        access = hub_access()
        try:
            with quiet():
                table = datasets.load_dataset(entry.hub_url, name=entry.subset, data_dir=entry.folder,
                                              split=entry.split, cache_dir=access.cache_dir or datasets_cache(),
                                              token=access.token)
        except Exception as exc:  # noqa: BLE001 - unreachable, not found, gated, a bad subset, ...
            folder = _snapshot(entry)
            if folder is not None:
                logger.warning("dataset %r: not loaded from the hub (%s); reading the copy in the Hugging Face "
                               "cache", entry.name, cause(exc))
            table = _from_snapshot(entry, folder, f"the hub gave {cause(exc)} (a private or gated dataset needs "
                                   "hf_hub_token, HF_TOKEN or `hf auth login`)")
    if limit is not None:
        table = table.select(range(min(max(limit, 0), len(table))))
    return table.to_list()


def _snapshot(entry) -> str | None:
    """The dataset's snapshot folder in the local Hugging Face hub cache (datasets--org--name), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from tuneforge.hub import hub_cache

    try:
        return snapshot_download(entry.hub_url, repo_type="dataset", cache_dir=str(hub_cache(hub_access().cache_dir)),
                                 local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _from_snapshot(entry, folder: str | None, why: str):
    import datasets

    from tuneforge.hub import hub_cache

    if folder is None:
        raise DataError(f"dataset {entry.name!r} (hf_hub_url {entry.hub_url!r}) is not in the Hugging Face cache "
                        f"({hub_cache(hub_access().cache_dir)}) and {why}: check hf_hub_url, load it once where there is network "
                        f"(`hf download {entry.hub_url} --repo-type dataset`), or save it as a file in "
                        f"{quoted(entry.dataset_dir)} and register it with file_name")
    try:
        with quiet():
            return datasets.load_dataset(folder, name=entry.subset, data_dir=entry.folder, split=entry.split,
                                         cache_dir=hub_access().cache_dir or datasets_cache())
    except Exception as exc:  # noqa: BLE001
        raise _failed(entry, exc) from None


def _failed(entry, exc: BaseException) -> DataError:
    chosen = ", ".join(f"{k} {v!r}" for k, v in (("subset", entry.subset), ("split", entry.split),
                                                 ("folder", entry.folder)) if v)
    return DataError(f"dataset {entry.name!r} ({entry.source}, {chosen}) could not be loaded ({cause(exc)}); "
                     f"check hf_hub_url, subset, split and folder in {quoted(entry.registry)}")


def _modelscope(entry):
    try:
        from modelscope import MsDataset
    except ImportError:
        raise DataError(f"dataset {entry.name!r} is read from ModelScope (ms_hub_url {entry.hub_url!r}), which "
                        "needs the modelscope package: `pip install modelscope`, or give an hf_hub_url (and unset "
                        "USE_MODELSCOPE_HUB)") from None
    try:  # LLaMA-Factory: cache_dir or ModelScope's own cache; its ms_hub_token is not a tuneforge key
        extra = {"cache_dir": hub_access().cache_dir} if hub_access().cache_dir else {}
        table = MsDataset.load(dataset_name=entry.hub_url, subset_name=entry.subset, data_dir=entry.folder,
                               split=entry.split, **extra)
        return table.to_hf_dataset() if isinstance(table, MsDataset) else table
    except Exception as exc:  # noqa: BLE001 - ModelScope's errors have no stable classes
        raise _failed(entry, exc) from None


def stream_columnar(name: str, path: Path):
    """The rows of a .parquet or .arrow file, read lazily (datasets' streaming)."""
    import datasets

    builder, kind = BUILDERS[path.suffix.lower()]
    try:
        with quiet():
            rows = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        yield from rows
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"dataset {name!r} file {quoted(path)} cannot be read as {kind} ({cause(exc)}); "
                        f"check that it is a {kind} file, or convert it to JSON lines") from None


def stream_hub(entry):
    """The rows of a hub dataset, read lazily: online through datasets' streaming, offline (or
    when the hub cannot be reached) from the snapshot in the hub cache."""
    import datasets

    if entry.load_from == "ms_hub":
        yield from _modelscope(entry)
        return
    folder = _snapshot(entry) if offline() else None
    if offline() and folder is None:
        _from_snapshot(entry, None, "HF_HUB_OFFLINE is set")  # raises the one line
    try:
        with quiet():
            rows = datasets.load_dataset(folder or entry.hub_url, name=entry.subset, data_dir=entry.folder,
                                         split=entry.split, streaming=True, token=hub_access().token)
        yield from rows
    except Exception as exc:  # noqa: BLE001 - not found, unreachable, a bad subset, ...
        raise _failed(entry, exc) from None
