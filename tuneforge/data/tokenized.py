"""`tokenized_path` (LLaMA-Factory's key): the tokenized train / eval examples saved with HF
datasets' `save_to_disk` and read back with `load_from_disk` on the next run instead of reading
and tokenizing the data again.

Beside the data, `tuneforge_tokenized.json` records what made the tokens: the record kind
(stage), a hash of the tokenizer (vocabulary, merges, special tokens) and of its chat template,
the template keys, cutoff_len and the data keys. A run whose values differ is refused in one
line naming them (LLaMA-Factory silently ignores them, which here would be a key without effect);
`overwrite_cache: true` tokenizes again and replaces the saved data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from tuneforge.errors import ConfigError, DataError
from tuneforge.fileio import quoted

from .hf_files import cause, quiet

logger = logging.getLogger(__name__)

STAMP = "tuneforge_tokenized.json"
SPLITS = ("train", "validation")  # LLaMA-Factory's names in the saved DatasetDict
# the data keys whose value is in the tokens (or picks the records)
DATA_KEYS = ("dataset", "eval_dataset", "template", "enable_thinking", "cutoff_len", "max_samples", "val_size",
             "train_on_prompt", "mask_history", "placeholders", "multitask")


def fingerprint(data_args, tokenizer, kind) -> dict:
    """What the tokens depend on, as JSON values (the chat template as set by apply_template);
    `kind` is the loader's RecordKind: its name and its tokenize function (rm's and dpo's pairs
    are one kind of record, tokenized into different examples)."""
    values = {"records": f"{kind.name} ({_describe(kind.tokenize)})", "tokenizer": _tokenizer_hash(tokenizer),
              "chat_template": _hash(str(getattr(tokenizer, "chat_template", None) or ""))}
    for key in DATA_KEYS:
        value = getattr(data_args, key, None)
        values[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
    if (getattr(data_args, "mix_strategy", None) or "concat") != "concat":  # recorded where it changes the data
        values.update(mix_strategy=data_args.mix_strategy, interleave_probs=getattr(data_args, "interleave_probs", None))
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def _describe(function) -> str:
    """'module.name' of a function; a functools.partial's with its keywords."""
    keywords = getattr(function, "keywords", None)
    inner = getattr(function, "func", function)
    name = f"{getattr(inner, '__module__', '')}.{getattr(inner, '__qualname__', type(inner).__name__)}"
    return name + (f"({', '.join(f'{k}={v!r}' for k, v in sorted(keywords.items()))})" if keywords else "")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole definition (vocab, merges, added tokens)
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return _hash(text + special)


def load_saved(path: Path, wanted: dict, overwrite: bool):
    """(train, eval or None) saved at `path` for the same `wanted` fingerprint; None when there
    is nothing to load (no folder, an empty one, or overwrite_cache). Raises ConfigError (one
    line) when the saved data was made with other settings or is not tuneforge's, DataError when
    it cannot be read."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    where = f"tokenized_path {quoted(path)}"
    if not path.is_dir():
        raise ConfigError(f"{where} is a file: tokenized_path must be a folder (new, empty, or written by an "
                          "earlier run); set it to another path")
    stamp = path / STAMP
    if not stamp.is_file():
        raise ConfigError(f"{where} is not empty and holds no {STAMP}, so it is not tokenized data tuneforge "
                          "saved (LLaMA-Factory's own is not read: its template rendering differs); set "
                          "tokenized_path to a new folder, or empty this one")
    if overwrite:
        logger.info("overwrite_cache: tokenizing the data again and replacing %s", path)
        return None
    try:
        saved = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: {STAMP} cannot be read ({type(exc).__name__}); delete the folder to tokenize "
                        "again") from None
    changed = [key for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]
    if changed:
        shown = ", ".join(_change(key, saved.get(key), wanted.get(key)) for key in changed)
        raise ConfigError(f"{where} was tokenized with other settings ({shown}); set overwrite_cache: true to "
                          "tokenize again into it, or set tokenized_path to a new folder")
    from datasets import load_from_disk

    try:
        with quiet():
            data = load_from_disk(str(path))
        train = data["train"].to_list()
        evaluation = data["validation"].to_list() if "validation" in data else None
    except Exception as exc:  # noqa: BLE001 - a damaged folder: pyarrow / datasets raise many kinds
        raise DataError(f"{where} cannot be read ({cause(exc)}); delete it (or set overwrite_cache: true) to "
                        "tokenize again") from None
    logger.info("loaded the tokenized data from %s (%d train, %d eval examples); the data files are not read",
                path, len(train), len(evaluation or []))
    return train, evaluation


def _change(key: str, old, new) -> str:
    if key in ("tokenizer", "chat_template"):
        return f"another {key.replace('_', ' ')}"
    return f"{key}: {json.dumps(old)} then, {json.dumps(new)} now"


def save(path: Path, stamp: dict, train: list[dict], evaluation: list[dict] | None) -> None:
    """Write the examples with save_to_disk and the fingerprint beside them; the folder appears
    whole (written next to it, then renamed)."""
    from datasets import Dataset, DatasetDict

    parts = {"train": Dataset.from_list(train)}
    if evaluation:
        parts["validation"] = Dataset.from_list(evaluation)
    partial = path.with_name(f"{path.name}.partial{os.getpid()}")
    try:
        with quiet():
            DatasetDict(parts).save_to_disk(str(partial))
        (partial / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True), encoding="utf-8")
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(partial, path)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"tokenized_path {quoted(path)} could not be written ({exc.strerror or exc}); free space "
                        "or set tokenized_path to a writable folder") from None
    logger.info("saved the tokenized data at %s; later runs with tokenized_path: %s read it instead of the "
                "data files", path, path)
