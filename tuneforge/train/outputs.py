"""The output folder of a run: checked before anything is loaded (a file, under a file, not
writable), its checkpoint-N folders listed by the number in their names, written so that a
kill at any moment leaves either the old or the new version of each thing (temporary `.tmp-*`
names renamed into place, deletions renamed to `.trash-*` first), and a full or read-only disk
reported as one line instead of a traceback from deep inside torch or safetensors.

Beside the project's reader/writer layer (fileio.py): its output-folder check is used as it is;
the disk-fault mapping here adds what a checkpoint needs (errors without an errno from Rust and
C++ writers, the free and needed space, how to resume)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from .. import fileio
from ..errors import CheckpointError

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
CHECKPOINT_PREFIX = "checkpoint-"
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}
# torch, safetensors and tokenizers report a failed write without an errno; with less than
# this left on the disk right after the failure, the disk was full
LOW_SPACE = 1 << 20


def step_of(path: Path) -> int | None:
    """The step number in a checkpoint-N folder's name (None for other names)."""
    match = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every checkpoint-N folder, by the number in its name, oldest first, whole or damaged
    (integrity.py tells which; it also refuses a name that disagrees with the step inside)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(step_of(child), child) for child in root.iterdir()]
    return [path for step, path in sorted((s, p) for s, p in found if s is not None)
            if path.is_dir()]


def check_output_dir(path: str | Path) -> None:
    """Refuse an output_dir that cannot hold a run, before the model is loaded.

    Raises CheckpointError when it is a file, lies under a file, or cannot be written: the
    project's check (fileio.check_output_dir: what the kernel's access() says), then, where the
    folder exists, a probe file created and removed in it (what access() cannot know: e.g. a
    read-only network share seen as writable)."""
    path = fileio.check_output_dir(path, "output_dir", CheckpointError)
    if path.is_dir():
        probe = path / f"{TMP_PREFIX}probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(f"output_dir '{path}' is not writable ({_reason(exc)}); "
                                  "choose a writable folder or fix its permissions") from None


def _reason(exc: OSError) -> str:
    if exc.errno in DISK_FULL:
        return "the disk is full"
    return NOT_WRITABLE.get(exc.errno, exc.strerror or type(exc).__name__)


def free_bytes(folder: str | Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def tree_size(path: str | Path) -> int:
    """Bytes in the files under path (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def disk_fault(exc: BaseException, folder: str | Path, errno_only: bool = False) -> str | None:
    """"full", or why the folder cannot be written, when a failed write was the disk's fault;
    None otherwise. Writers in Rust and C++ (tokenizers, safetensors, torch) raise plain
    exceptions without an errno: unless `errno_only`, any failure counts as a full disk when
    almost nothing is left free, so ask before removing what was partly written."""
    filename = getattr(exc, "filename", None)
    if filename and not _inside(filename, folder):
        return None  # another folder's trouble: not this one to explain
    code = getattr(exc, "errno", None)
    if code in NOT_WRITABLE:
        return NOT_WRITABLE[code]
    if code in DISK_FULL or os.strerror(errno.ENOSPC) in str(exc):
        return "full"
    if errno_only:
        return None
    free = free_bytes(folder)
    return "full" if free is not None and free < LOW_SPACE else None


def _inside(path, folder) -> bool:
    try:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
    except (TypeError, ValueError):
        return False


def disk_error(fault: str, folder: str | Path, what: str,
               needed: int | None = None) -> CheckpointError:
    """The one line for a `disk_fault`; the free space is measured now (after cleaning up).
    The advice is only what can help: checkpoints older than the newest (which a resume needs)
    can go, and save_total_limit: 1 keeps them from piling up again; with none such, only
    freeing space elsewhere helps (the old checkpoint goes only once the new one is written)."""
    if fault != "full":
        return CheckpointError(f"cannot write {what} in '{folder}' ({fault}); make the folder "
                               "writable or choose another output_dir")
    free = free_bytes(folder)
    need = f", it needs about {fileio.human_size(needed)}" if needed else ""
    have = f" ({fileio.human_size(free)} free{need})" if free is not None else ""
    advice = _older_checkpoints(folder)
    return CheckpointError(f"disk full while writing {what} in '{folder}'{have}; free some "
                           f"space{advice} and run the same command again to resume")


def _older_checkpoints(folder: str | Path) -> str:
    """The advice on the checkpoints older than the newest, e.g. ' (checkpoint-1, older than
    checkpoint-2, takes 3.7 MB and is not needed to resume; ...)'; '' when there are none (or
    they cannot be listed)."""
    try:
        found = list_checkpoints(folder)
        older = found[:-1]
        size = fileio.human_size(sum(tree_size(p) for p in older))
    except OSError:
        return ""
    if not older:
        return ""
    which = (f"{older[0].name}, older than {found[-1].name}, takes {size} and is" if
             len(older) == 1 else f"the {len(older)} checkpoints older than {found[-1].name} "
             f"({older[0].name} .. {older[-1].name}) take {size} and are")
    return f" ({which} not needed to resume; save_total_limit: 1 keeps only the newest)"


@contextmanager
def disk_errors(folder: str | Path, what: str, errno_only: bool = True):
    """Turn a full or read-only disk met inside the block into one CheckpointError line
    (errno_only=False also for torch / safetensors writers, see `disk_fault`)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - only disk faults are converted, others re-raised
        fault = disk_fault(exc, folder, errno_only)
        if fault is None:
            raise
        raise disk_error(fault, folder, what) from None


def discard(path: str | Path) -> None:
    """Delete a file or folder so that readers see it whole or gone: renamed to a `.trash-`
    name first (atomic), then removed; a kill in between leaves only the trash, which
    `remove_leftovers` clears at the next start."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(output_dir: str | Path) -> None:
    """What a killed run left half-written (`.tmp-*`) or half-deleted (`.trash-*`)."""
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                _remove(child)


def is_leftover(name: str) -> bool:
    return name.startswith((TMP_PREFIX, TRASH_PREFIX))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file whole or not at all (temporary name, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(stage: Path, root: Path) -> None:
    """Move everything in the finished staging folder `stage` into `root`, each entry replacing
    its old version by one rename (a folder's old version is discarded first)."""
    for child in sorted(stage.iterdir()):
        target = root / child.name
        if child.is_dir() and target.exists():
            discard(target)
        os.replace(child, target)
    stage.rmdir()


def fsync_tree(path: Path) -> None:
    """Flush a folder's files and the folder itself (so a rename after it is durable)."""
    for child in [*path.iterdir(), path] if path.is_dir() else []:
        try:
            fd = os.open(child, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
