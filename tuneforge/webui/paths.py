"""Where the page may read and write its arguments files, and whether it is served beyond this
machine. A page bound to another address than 127.0.0.1 lets whoever reaches it read and write
files wherever the server's user can (model, data and output paths are typed in the page): the
server logs a warning line then, and Save / Load arguments stay inside the current directory and
the output root (its symlinks resolved, so no `..` or link leads out). A page on 127.0.0.1 serves
the user of this machine, who has a shell anyway: its Save / Load take any path. No gradio here."""

from __future__ import annotations

from pathlib import Path

OUTPUT_ROOT = "saves"  # where runs, adapters and arguments go by default (the Runs tab's root)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def allowed_roots(output_root: str | Path = OUTPUT_ROOT) -> tuple[Path, ...]:
    """The folders Save / Load arguments may use: the current directory and the output root, both
    resolved (an output root that is a link to another disk counts as that disk's folder; one
    inside the current directory is not listed twice)."""
    cwd, root = Path.cwd().resolve(), Path(output_root).expanduser().resolve()
    return (cwd,) if root.is_relative_to(cwd) else (cwd, root)


def inside(path: str | Path, roots) -> bool:
    """Whether `path` (relative: to the current directory), with `..` and symlinks resolved, lies
    inside one of `roots`."""
    resolved = Path(path).expanduser().resolve()
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


def exposed(host: str | None) -> bool:
    """Whether serving on `host` reaches beyond this machine (empty: 127.0.0.1, not exposed)."""
    return bool(host) and host.strip().lower() not in LOCAL_HOSTS


EXPOSED_WARNING = ("the web UI is served on {host}, beyond this machine: whoever reaches it can read and write "
                   "files wherever this server's user can (model, data and output paths; Save / Load arguments stay "
                   "inside {roots}); serve it on 127.0.0.1 unless the network is trusted")
