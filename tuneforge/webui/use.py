"""What the Chat, Evaluate and Export tabs share: a config from a few fields (checked as the CLI
checks it), the adapters and runs found under an output root, and errors as the CLI's line.
No gradio here."""

from __future__ import annotations

from pathlib import Path

from ..config import build_config
from ..errors import TuneforgeError
from ..fileio import describe_os_error
from . import command


def config_from(fields: dict):
    """(Config or None, error lines): fields {key: value} with empty values left out, built and
    validated by tuneforge.config.build_config (the CLI's check)."""
    values = {k: v for k, v in fields.items() if v not in (None, "", [])}
    for key in ("dataset", "eval_dataset", "adapter_name_or_path"):
        if isinstance(values.get(key), (list, tuple)):
            values[key] = ",".join(values[key])
    for key, value in list(values.items()):
        if isinstance(value, float) and value.is_integer() and key in ("max_new_tokens", "top_k", "max_samples",
                                                                        "cutoff_len"):
            values[key] = int(value)
    try:
        return build_config(values), []
    except TuneforgeError as exc:
        return None, [command.error_line(m) for m in getattr(exc, "messages", [str(exc)])]


def failure(exc: BaseException) -> str:
    """The CLI's one line for what a workflow raised (TuneforgeError, OSError, MemoryError)."""
    if isinstance(exc, OSError):
        return command.error_line(describe_os_error(exc))
    if isinstance(exc, MemoryError):
        return command.error_line("out of memory; use a smaller model")
    return "\n".join(command.error_line(m) for m in getattr(exc, "messages", [str(exc)]))


def adapter_dirs(root: str | Path = "saves", limit: int = 200) -> list[str]:
    """Folders under `root` (depth 3) holding an adapter (adapter_config.json), newest first;
    checkpoints are skipped."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found = [p.parent for pattern in ("*/adapter_config.json", "*/*/adapter_config.json", "*/*/*/adapter_config.json")
             for p in root.glob(pattern) if "checkpoint-" not in str(p.parent)]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p) for p in found[:limit]]
