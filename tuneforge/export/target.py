"""Where an export goes, and how it gets there without destroying anything.

`check_export_dir` refuses, before anything is loaded, merged or written, an `export_dir` that
is a file or lies under one, is not writable, is (or lies inside) a folder the export reads,
is a mount point, or is a non-empty folder that a tuneforge export did not write. A folder a
previous export wrote is recognised by its manifest (`tuneforge_export.json`: every file it
wrote, with its size and, for small files, a SHA-256); it may be replaced only while it holds
exactly those files, unchanged.

`staged` builds the new export in a hidden folder beside `export_dir` and renames it into place
only once it is complete (manifest last), so a failure (a full disk, an interrupt) leaves the
previous export as it was, or nothing, and no temporary folder; the failure is one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Iterator

from ..errors import CheckpointError, ConfigError
from ..fileio import (check_output_dir, check_outside, describe_os_error, human_size,
                      replace_folder)

log = logging.getLogger("tuneforge")

MANIFEST = "tuneforge_export.json"
_HASHED_UP_TO = 16 * 2**20  # bytes: configs, tokenizers, Modelfiles are hashed; weights by size
_STAGING = "tuneforge-staging"  # .<name>.tuneforge-staging-<host>-<pid>-XXXX beside export_dir


@dataclass(frozen=True)
class ExportTarget:
    shown: Path      # export_dir as the user wrote it (for messages)
    real: Path       # symlinks resolved: the folder that is (re)placed
    replaces: bool   # a previous tuneforge export is there and will be replaced


def _names(paths: list[str], limit: int = 3) -> str:
    listed = ", ".join(paths[:limit])
    return listed + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_export_dir(export_dir: str | None, sources: list[tuple[str, Path]]) -> ExportTarget:
    """Everything about `export_dir` that can be refused, checked before any work is done.

    `sources` are (config key, folder) pairs the export reads: it never writes into, inside or
    over them (symlinks resolved). Raises ConfigError, one line naming export_dir and the fix.
    """
    if not export_dir:
        raise ConfigError("config key 'export_dir' is required for `tuneforge export`")
    shown = Path(export_dir).expanduser()
    check_output_dir(shown, "export_dir")  # a file, under a file, not writable
    check_outside(shown, "export_dir", sources, "the export")  # never writes what it reads
    real = shown.resolve()
    if not real.exists():
        return ExportTarget(shown, real, replaces=False)
    if os.path.ismount(real):
        raise ConfigError(f"export_dir '{shown}' is a mount point, which cannot be replaced in one "
                          f"step; export into a new folder inside it, such as '{shown / 'model'}'")
    if not os.access(real.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"export_dir '{shown}' cannot be replaced: its parent folder "
                          f"'{real.parent}' is read-only; choose another folder or fix its permissions")
    if not any(real.iterdir()):
        return ExportTarget(shown, real, replaces=False)
    verify_previous_export(real, shown)
    return ExportTarget(shown, real, replaces=True)


def verify_previous_export(real: Path, shown: Path) -> None:
    """Raise ConfigError (one line) unless `real` holds only files its manifest lists, each as
    it was written (size; SHA-256 for small files). A listed file since deleted is fine."""
    manifest = real / MANIFEST
    present = sorted(str(p.relative_to(real)) for p in real.rglob("*"))
    if not manifest.is_file() or manifest.is_symlink():
        raise ConfigError(f"export_dir '{shown}' is not empty and has no {MANIFEST}, so no "
                          f"tuneforge export wrote it (it holds {_names(present)}); choose an empty "
                          "or new folder")
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        records = {str(rel): (int(rec["size"]), rec.get("sha256")) for rel, rec in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"export_dir '{shown}' is not empty and its {MANIFEST} is unreadable, so "
                          "tuneforge cannot tell its files from yours; choose an empty or new "
                          "folder") from None
    ours = {MANIFEST, *records}
    ours |= {str(parent) for rel in records for parent in Path(rel).parents if str(parent) != "."}
    extra = [p for p in present if p not in ours]
    if extra:
        raise ConfigError(f"export_dir '{shown}' holds files the previous tuneforge export did not "
                          f"write ({_names(extra)}); move them away or choose another folder")
    for rel, (size, digest) in sorted(records.items()):
        path = real / rel
        if not path.exists() and not path.is_symlink():
            continue  # deleted since: nothing of the user's to keep
        if (path.is_symlink() or not path.is_file() or path.stat().st_size != size
                or (digest is not None and _sha256(path) != digest)):
            raise ConfigError(f"export_dir '{shown}': {rel} was changed after tuneforge exported "
                              "it; move it away (or the whole folder) or choose another folder")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, export_format: str) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            size = path.stat().st_size
            record: dict = {"size": size}
            if size <= _HASHED_UP_TO:
                record["sha256"] = _sha256(path)
            files[str(path.relative_to(folder))] = record
    text = json.dumps({"written_by": "tuneforge export", "export_format": export_format,
                       "files": files}, indent=2)
    (folder / MANIFEST).write_text(text + "\n", encoding="utf-8")


def check_free_space(target: ExportTarget, needed: int) -> None:
    """Refuse (ConfigError) when the disk that will hold export_dir has less than `needed` bytes
    free; a previous export stays until the new one is complete, so it does not count as free."""
    probe = target.real
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ConfigError(f"export_dir '{target.shown}': the export needs about {human_size(needed)} "
                          f"and its disk has {human_size(free)} free; free some space or choose "
                          "another disk")


def _staging_prefix(real: Path) -> str:
    return f".{real.name}.{_STAGING}-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40]


def _remove_stale_staging(real: Path) -> None:
    """Staging folders an export of this folder on this machine left when it was killed."""
    prefix = _staging_prefix(real) + _host() + "-"
    for leftover in real.parent.glob(glob_escape(prefix) + "*"):
        pid = leftover.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or leftover.name.endswith("-old"):
            continue  # "-old": a previous export moved aside; it is data, kept
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
            log.info("removed '%s', left by an export that was killed", leftover)
        except OSError:
            continue  # its process runs (as another user)


def _missing_parents(real: Path) -> list[Path]:
    """The folders above `real` that do not exist yet, deepest first."""
    missing = []
    for parent in real.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _readable_like_new_files(folder: Path) -> None:
    """mkdtemp makes a private folder (and some writers private files); an export is meant to be
    shared (e.g. with an inference server running as another user), so apply the umask as a
    plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _os_error_of(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or safetensors' error, which only names the os error."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"os error (\d+)", str(exc))
    if found and type(exc).__name__ == "SafetensorError":
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextmanager
def staged(target: ExportTarget, export_format: str) -> Iterator[Path]:
    """Yield an empty folder beside export_dir to write the export into. When the block ends
    normally the manifest is added and the folder replaces export_dir (whose contents are checked
    once more first); when it raises, the folder (and any parent folder made for it) is removed.
    An OSError (disk full, permission denied) becomes one CheckpointError line."""
    real = target.real
    made = _missing_parents(real)
    staging = None
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(real)
        prefix = f"{_staging_prefix(real)}{_host()}-{os.getpid()}-"
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=real.parent))
        yield staging
        _write_manifest(staging, export_format)
        _readable_like_new_files(staging)
        if real.exists() and any(real.iterdir()):
            verify_previous_export(real, target.shown)  # nothing of the user's arrived meanwhile
        replace_folder(staging, real)
        staging = None
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                continue  # never made, or something else is in it now
        os_error = _os_error_of(exc)
        if os_error is None:
            raise
        kept = "the previous export is kept" if target.replaces else "nothing was written"
        raise CheckpointError(f"writing export_dir '{target.shown}' failed ({kept}): "
                              f"{_describe(os_error, target)}") from None


def _describe(exc: OSError, target: ExportTarget) -> str:
    """describe_os_error, with a staging file's name shown as the file it would have become."""
    name = exc.filename
    if name:
        path = Path(name)
        staging = next((p for p in [path, *path.parents] if p.name.startswith(_staging_prefix(target.real))), None)
        if staging is not None:
            exc = OSError(exc.errno, exc.strerror, str(target.shown / path.relative_to(staging)))
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) and not exc.filename:
        return "the disk is full; free some space and run again"
    return describe_os_error(exc, "write")
