"""Records -> conversations: alpaca and sharegpt records become lists of chat messages.

A message is `{"role": "system" | "user" | "assistant" | "tool", "content": str}`.
Function calls become assistant turns whose content is the call text, marked `"function_call": True`;
observations become `tool` turns.

As in LLaMA-Factory, a record that is not a complete conversation (roles out of order, a last
user turn with no reply, an empty reply or user turn, no messages) is dropped; here the drops are
counted and said in one warning line per dataset (see issues.py). A value of the wrong type (a
number, list, object or null where text is expected, a history that is not [user, reply] pairs,
a role the tags do not name) is refused with one DataError line naming the record and column.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tuneforge.errors import DataError
from tuneforge.fileio import quoted

from .issues import Drops, describe_value
from .readers import PRETRAIN_MESSAGE, Records
from .registry import DatasetEntry

USABLE = "a user turn followed by a non-empty assistant reply"


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    tools: list[dict] | None = None
    where: str = "the conversation"  # "data/d.json record 3", for messages
    dataset: str = ""  # the registry name it came from

    @property
    def source(self) -> str:
        return f"dataset {self.dataset!r} ({self.where})" if self.dataset else self.where


class _Dropped(Exception):
    """A well-typed record that is not a usable conversation; `reason` reads after a count."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_conversations(entry: DatasetEntry, records: Records, indices: list[int] | None = None) -> list[Conversation]:
    """Convert the records (those at `indices`, in that order, when given) to conversations.

    Incomplete conversations are dropped and counted in one warning line. Raises DataError for
    a missing column, a value of the wrong type, or when no record is a usable conversation.
    """
    return convert_records(entry, records, indices, conversation_converter(entry, records),
                           f"conversation ({USABLE})")


def conversation_converter(entry: DatasetEntry, records: Records):
    """The function that turns one record of `entry` into a Conversation (alpaca or sharegpt),
    after checking that the records have its columns (DataError naming the missing one)."""
    if entry.formatting == "alpaca":
        _check_alpaca_columns(entry, records)
        return _from_alpaca
    _check_columns(entry, records, ["messages"])
    return _from_sharegpt


def convert_records(entry: DatasetEntry, records: Records, indices, convert, usable: str) -> list:
    """`convert(entry, record, where)` on each record (those at `indices` when given); records it
    drops are counted in one warning line. Raises DataError when none is usable ("none of its N
    records is a usable <usable>")."""
    indices = range(len(records)) if indices is None else indices
    drops, kept = Drops(entry.name), []
    for index in indices:
        where = records.where(index)
        try:
            kept.append(convert(entry, records[index], where))
        except _Dropped as dropped:
            drops.add(dropped.reason, where)
    drops.report(len(indices), f"none of its {len(indices)} records is a usable {usable}",
                 "fix or remove those records (or check columns/tags in dataset_info.json)")
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


def _check_alpaca_columns(entry: DatasetEntry, records: Records) -> None:
    prompt, response = entry.column("prompt"), entry.column("response")
    items = records.items
    no_response = bool(items) and all(response not in r for r in items)
    # LLaMA-Factory registers pretraining text as {"columns": {"prompt": "text"}} and nothing else
    only_prompt_mapped = entry.given_columns == {"prompt"} and not entry.formatting_given
    bare_text = all(prompt not in r and "text" in r for r in items)
    if no_response and (only_prompt_mapped or bare_text):
        raise DataError(f"dataset {entry.name!r} ({quoted(entry.file_name)}) {PRETRAIN_MESSAGE}")
    _check_columns(entry, records, ["prompt", "response"])


def _check_columns(entry: DatasetEntry, records: Records, keys: list[str]) -> None:
    """Every record must hold the required columns; say how many do not and where the first is."""
    for key in keys:
        column = entry.column(key)
        missing = [i for i, record in enumerate(records.items) if column not in record]
        if missing:
            raise DataError(
                f"dataset {entry.name!r}: {len(missing)} of {len(records)} records lack the {key} column "
                f"{column!r} (first: {records.where(missing[0])}); fix the records or map the column "
                f'in dataset_info.json "columns": {{"{key}": "<your column>"}}'
            )


def _refuse(entry: DatasetEntry, where: str, problem: str, fix: str) -> DataError:
    return DataError(f"dataset {entry.name!r} ({where}): {problem}; {fix}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(entry: DatasetEntry, where: str, text: str, what: str, place: bool = True) -> str:
    """`text`, refused when it holds a lone surrogate: JSON lets "\\ud800" through, but it is
    half of a character, which no tokenizer (nor UTF-8) can encode. `place`: say at which
    character (not for text made from the record, such as the tools column's JSON)."""
    found = _SURROGATE.search(text)
    if found is None:
        return text
    at = f" (at character {found.start()})" if place else ""
    raise _refuse(entry, where, f"{what} holds a lone surrogate \\u{ord(found.group()):04x}{at}, half of a "
                  "character and not text",
                  "fix its \\u escape: a character beyond \\uffff is written as a pair, like \\ud83d\\ude00")


def _text(entry: DatasetEntry, record: dict, key: str, where: str) -> str:
    """The string in the column mapped to `key`; a missing column or null means empty."""
    column = entry.column(key)
    value = record.get(column) if column else None
    if value is None or isinstance(value, str):
        return _unicode(entry, where, value or "", f"column {column!r}")
    raise _refuse(entry, where, f"column {column!r} holds {describe_value(value)}, not text",
                  "write it as a JSON string (in quotes) or fix the record")


def _tools(entry: DatasetEntry, record: dict, where: str) -> list[dict] | None:
    """The tools column as a list of JSON objects (it is usually a JSON string)."""
    column = entry.column("tools")
    value = record.get(column) if column else None
    if value in (None, "", []):
        return None
    fix = 'it must be a JSON list of tool descriptions, like [{"name": ..., "parameters": ...}]'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _refuse(entry, where, f"column {column!r} is not valid JSON (column {err.colno}: {err.msg})",
                          fix) from None
        except RecursionError:
            raise _refuse(entry, where, f"column {column!r} is JSON nested too deeply to read", fix) from None
    tools = [value] if isinstance(value, dict) else value
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _refuse(entry, where, f"column {column!r} holds {describe_value(value)} of other things", fix)
    _unicode(entry, where, json.dumps(tools, ensure_ascii=False), f"column {column!r}", place=False)
    return tools or None


def _blank(text: str) -> bool:
    return not text.strip()


def _from_alpaca(entry: DatasetEntry, record: dict, where: str) -> Conversation:
    messages = []
    system = _text(entry, record, "system", where)
    if system:
        messages.append({"role": "system", "content": system})
    messages += _history(entry, record, where)
    prompt, query = _text(entry, record, "prompt", where), _text(entry, record, "query", where)
    user = "\n".join(part for part in (prompt, query) if part)
    response = _text(entry, record, "response", where)
    if _blank(user):
        raise _Dropped(f"with no {entry.column('prompt')} or {entry.column('query')} text")
    if _blank(response):
        raise _Dropped("with an empty reply")
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return Conversation(messages, _tools(entry, record, where), where, entry.name)


def _history(entry: DatasetEntry, record: dict, where: str) -> list[dict[str, str]]:
    """The history column's [user, reply] pairs as messages; null or missing means none."""
    column = entry.column("history")
    history = record.get(column) if column else None
    if history is None:
        return []
    fix = 'write it as a list of [user, assistant] string pairs, like [["Hi", "Hello!"]]'
    if not isinstance(history, list):
        raise _refuse(entry, where, f"column {column!r} holds {describe_value(history)}", fix)
    messages = []
    for number, turn in enumerate(history):
        if not isinstance(turn, list):
            raise _refuse(entry, where, f"column {column!r} item {number} is {describe_value(turn)}", fix)
        if len(turn) != 2:
            raise _refuse(entry, where, f"column {column!r} item {number} has {len(turn)} entries, not 2", fix)
        wrong = next((t for t in turn if not isinstance(t, str)), "")
        if not isinstance(wrong, str):
            raise _refuse(entry, where, f"column {column!r} item {number} holds {describe_value(wrong)}, "
                          "not text", fix)
        for text in turn:
            _unicode(entry, where, text, f"column {column!r} item {number}")
        if _blank(turn[0]) or _blank(turn[1]):
            raise _Dropped(f"with an empty turn in {column!r}")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return messages


def role_kinds(tags: dict) -> dict[str, tuple[str, int | None]]:
    """tag -> (role, side): LLaMA-Factory's rule is user/observation turns at even positions and
    assistant/function turns at odd ones, after an optional leading system message."""
    return {
        tags["user_tag"]: ("user", 0),
        tags["observation_tag"]: ("tool", 0),
        tags["assistant_tag"]: ("assistant", 1),
        tags["function_tag"]: ("assistant", 1),
        tags["system_tag"]: ("system", None),
    }


def sharegpt_turns(entry: DatasetEntry, record: dict, where: str, fix: str) -> tuple[str, list[dict]]:
    """(system, turns) of a sharegpt record: each turn {"tag", "role", "content"}, a leading
    system message taken out (it wins over the system column, as in LLaMA-Factory). Raises
    DataError (with `fix`) when the messages column is not a list; drops a record with no turns
    or with roles out of order."""
    kinds = role_kinds(entry.tags)
    column = entry.column("messages")
    raw_messages = record[column]
    if not isinstance(raw_messages, list):
        raise _refuse(entry, where, f"column {column!r} holds {describe_value(raw_messages)}", fix)
    turns = [_message(entry, raw, number, kinds, where) for number, raw in enumerate(raw_messages)]
    system = _text(entry, record, "system", where)
    if turns and turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    if not turns:
        raise _Dropped("with no messages")
    if any(kinds[t["tag"]][1] != position % 2 for position, t in enumerate(turns)):
        raise _Dropped("with roles out of order")
    return system, turns


def _from_sharegpt(entry: DatasetEntry, record: dict, where: str) -> Conversation:
    tags = entry.tags
    system, turns = sharegpt_turns(entry, record, where,
                                   f'it must be a list of messages, like [{{"{tags["role_tag"]}": '
                                   f'"{tags["user_tag"]}", "{tags["content_tag"]}": "Hi"}}, ...]')
    if len(turns) % 2:
        raise _Dropped("ending on a user turn with no reply")
    if any(_blank(t["content"]) for t in turns if t["role"] in ("user", "assistant")):
        raise _Dropped("with an empty reply or user turn")
    # a function call is an assistant turn marked as one (data/tool_formats.py writes it)
    messages = [{"role": t["role"], "content": t["content"], **({"function_call": True} if t["tag"] == tags["function_tag"]
                                                                  else {})} for t in turns]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Conversation(messages, _tools(entry, record, where), where, entry.name)


def _message(entry: DatasetEntry, raw, number: int, kinds: dict, where: str) -> dict[str, str]:
    """One sharegpt message, its types checked: {"tag", "role", "content"}."""
    role_tag, content_tag = entry.tags["role_tag"], entry.tags["content_tag"]
    tags_fix = ('set "tags": {"role_tag": ..., "content_tag": ...} in dataset_info.json to match '
                "your data")
    if not isinstance(raw, dict):
        raise _refuse(entry, where, f"message {number} is {describe_value(raw)}, not an object with the "
                      f"keys {role_tag!r} and {content_tag!r}", "fix the record")
    if role_tag not in raw or content_tag not in raw:
        lacking = role_tag if role_tag not in raw else content_tag
        raise _refuse(entry, where, f"message {number} lacks the key {lacking!r}; each message needs the "
                      f"keys {role_tag!r} and {content_tag!r}", tags_fix)
    tag, content = raw[role_tag], raw[content_tag]
    if not isinstance(tag, str) or tag not in kinds:
        shown = repr(tag) if isinstance(tag, str) else describe_value(tag)
        raise _refuse(entry, where, f"the role ({role_tag!r}) of message {number} is {shown}, not one of "
                      f"the tags {', '.join(repr(t) for t in kinds)}",
                      "set user_tag/assistant_tag/... in dataset_info.json or fix the record")
    if not isinstance(content, str):
        raise _refuse(entry, where, f"message {number} ({tag!r}) holds {describe_value(content)} as its "
                      f"{content_tag!r}, not text", "write it as a JSON string (in quotes) or fix the record")
    _unicode(entry, where, content, f"the {content_tag!r} of message {number} ({tag!r})")
    return {"tag": tag, "role": kinds[tag][0], "content": content}
