"""Data read through Hugging Face `datasets`: Parquet and Arrow files (columnar, so their rows
are named "record N", counted from 0 in the file) and hub datasets (`hf_hub_url`, `ms_hub_url`).

JSON, JSON lines, CSV and plain text stay with tuneforge's own readers (readers.py): `datasets`
parses them with pyarrow, whose errors say "An error occurred while generating the dataset" (the
cause, "in row 1", counts rows of a block, not lines of the file), so a bad line could no longer
be named. Columnar files have no lines to name, and pyarrow reads them exactly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tuneforge.errors import DataError
from tuneforge.fileio import quoted

logger = logging.getLogger(__name__)

BUILDERS = {".parquet": ("parquet", "Parquet"), ".arrow": ("arrow", "Arrow")}


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
    while exc._cause__ is not None or exc.__context__ is not None:
        exc = exc._cause__ or exc.__context__
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
