"""Records -> conversations: alpaca and sharegpt records become lists of chat messages.

A message is `{"role": "system" | "user" | "assistant" | "tool", "content": str}`.
Function calls become assistant turns whose content is the call text; observations become `tool` turns.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from tuneforge.errors import DataError

from .readers import PRETRAIN_MESSAGE
from .registry import DatasetEntry

logger = logging.getLogger(__name__)


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    tools: list[dict] | None = None
    source: str = ""  # "dataset[index]", for error messages


def to_conversations(entry: DatasetEntry, records: list[dict]) -> list[Conversation]:
    """Convert every record; records that are not a usable SFT conversation are dropped and counted."""
    if entry.formatting == "alpaca":
        _check_alpaca_columns(entry, records)
        converted = [_from_alpaca(entry, record, index) for index, record in enumerate(records)]
    else:
        _check_columns(entry, records, ["messages"])
        converted = [_from_sharegpt(entry, record, index) for index, record in enumerate(records)]
    kept = [c for c in converted if c is not None]
    if len(kept) < len(converted):
        logger.warning(
            "dataset %r: dropped %d of %d records that are not a user turn followed by an assistant reply",
            entry.name, len(converted) - len(kept), len(converted),
        )
    return kept


def fill_placeholders(conversations: list[Conversation], placeholders: dict[str, str] | None) -> None:
    """Replace `{{key}}` with its value in every message (in place); unknown keys stay as they are."""
    if not placeholders:
        return
    pattern = re.compile("|".join(re.escape("{{" + str(key) + "}}") for key in placeholders))
    values = {"{{" + str(key) + "}}": str(value) for key, value in placeholders.items()}
    for conversation in conversations:
        for message in conversation.messages:
            message["content"] = pattern.sub(lambda m: values[m.group(0)], message["content"])


def _check_alpaca_columns(entry: DatasetEntry, records: list[dict]) -> None:
    prompt, response = entry.column("prompt"), entry.column("response")
    no_response = bool(records) and all(response not in r for r in records)
    # LLaMA-Factory registers pretraining text as {"columns": {"prompt": "text"}} and nothing else
    only_prompt_mapped = entry.given_columns == {"prompt"} and not entry.formatting_given
    bare_text = all(prompt not in r and "text" in r for r in records)
    if no_response and (only_prompt_mapped or bare_text):
        raise DataError(f"dataset {entry.name!r} ({entry.file_name}) {PRETRAIN_MESSAGE}")
    _check_columns(entry, records, ["prompt", "response"])


def _check_columns(entry: DatasetEntry, records: list[dict], keys: list[str]) -> None:
    """Every record must hold the required columns; say how many do not and where the first is."""
    for key in keys:
        column = entry.column(key)
        missing = [i for i, record in enumerate(records) if column not in record]
        if missing:
            raise DataError(
                f"dataset {entry.name!r} ({entry.file_name}): {len(missing)} of {len(records)} records lack "
                f"the {key} column {column!r} (first: record {missing[0]}); fix the records or map the column "
                f'in dataset_info.json "columns": {{"{key}": "<your column>"}}'
            )


def _text(entry: DatasetEntry, record: dict, key: str, index: int) -> str:
    """The string in the column mapped to `key`; missing or null means empty."""
    column = entry.column(key)
    value = record.get(column) if column else None
    if value is None:
        return ""
    if isinstance(value, (str, int, float)):
        return str(value)
    raise DataError(
        f"dataset {entry.name!r} ({entry.file_name}) record {index}: column {column!r} holds a "
        f"{type(value).__name__}, expected text"
    )


def _tools(entry: DatasetEntry, record: dict, index: int) -> list[dict] | None:
    """The tools column as a list of JSON objects (it is usually a JSON string)."""
    column = entry.column("tools")
    value = record.get(column) if column else None
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(
                f"dataset {entry.name!r} ({entry.file_name}) record {index}: column {column!r} is not valid "
                f"JSON (column {err.colno}: {err.msg}); it must be a JSON list of tool descriptions"
            ) from None
    tools = [value] if isinstance(value, dict) else value
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(
            f"dataset {entry.name!r} ({entry.file_name}) record {index}: column {column!r} must be a list "
            "of JSON objects describing tools"
        )
    return tools or None


def _from_alpaca(entry: DatasetEntry, record: dict, index: int) -> Conversation | None:
    messages = []
    system = _text(entry, record, "system", index)
    if system:
        messages.append({"role": "system", "content": system})
    history_column = entry.column("history")
    history = record.get(history_column) if history_column else None
    for turn in history or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(
                f"dataset {entry.name!r} ({entry.file_name}) record {index}: column {history_column!r} must be "
                'a list of [user, assistant] string pairs, like [["Hi", "Hello!"]]'
            )
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt, query = _text(entry, record, "prompt", index), _text(entry, record, "query", index)
    user = "\n".join(part for part in (prompt, query) if part)
    response = _text(entry, record, "response", index)
    if not user or not response:
        return None
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return Conversation(messages, _tools(entry, record, index), f"{entry.name}[{index}]")


def _from_sharegpt(entry: DatasetEntry, record: dict, index: int) -> Conversation | None:
    tags = entry.tags
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["function_tag"]: "assistant",
        tags["observation_tag"]: "tool",
        tags["system_tag"]: "system",
    }
    where = f"dataset {entry.name!r} ({entry.file_name}) record {index}"
    raw_messages = record[entry.column("messages")]
    if not isinstance(raw_messages, list):
        raise DataError(f"{where}: column {entry.column('messages')!r} must be a list of messages")
    messages = []
    for raw in raw_messages:
        if not isinstance(raw, dict) or tags["role_tag"] not in raw or tags["content_tag"] not in raw:
            raise DataError(
                f"{where}: each message needs the keys {tags['role_tag']!r} and {tags['content_tag']!r}; "
                'set "tags": {"role_tag": ..., "content_tag": ...} in dataset_info.json to match your data'
            )
        role = roles.get(raw[tags["role_tag"]])
        if role is None:
            raise DataError(
                f"{where}: role {raw[tags['role_tag']]!r} is not one of the tags "
                f"{', '.join(repr(t) for t in roles)}; set user_tag/assistant_tag/... in dataset_info.json"
            )
        content = raw[tags["content_tag"]]
        messages.append({"role": role, "content": "" if content is None else str(content)})
    system = _text(entry, record, "system", index)
    if messages and messages[0]["role"] == "system":
        system = system or messages[0]["content"]
        messages = messages[1:]
    messages = _trim_to_last_assistant(messages)
    if messages is None:
        return None
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Conversation(messages, _tools(entry, record, index), f"{entry.name}[{index}]")


def _trim_to_last_assistant(messages: list[dict]) -> list[dict] | None:
    """Drop turns after the last assistant turn; None when there is nothing to learn from."""
    if not messages or messages[0]["role"] != "user":
        return None
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return None if last is None else messages[: last + 1]
