"""Never silently wrong: a record value of the wrong type is refused in one line naming the record
and column; a record that is not a complete conversation is dropped as LLaMA-Factory drops it,
and said in one warning line per dataset with the counts; so are examples left with no reply
token within cutoff_len (and when nothing is left, one error line)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tuneforge.data import load_datasets
from tuneforge.errors import DataError, TuneforgeError

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
HI, HELLO = {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}
CALL, OBS = {"from": "function_call", "value": '{"name": "f"}'}, {"from": "observation", "value": "42"}
SYSTEM = {"from": "system", "value": "Be brief."}


def register(folder: Path, records: list, **entry) -> str:
    (folder / "d.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", **entry}}))
    return str(folder)


def load(smol, make_args, folder, caplog, **args):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        splits = load_datasets(make_args(dataset="d", dataset_dir=folder, **args), smol)
    return splits.train, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def refused(smol, make_args, folder, **args) -> str:
    with pytest.raises(DataError) as err:
        load_datasets(make_args(dataset="d", dataset_dir=folder, **args), smol)
    assert "\n" not in str(err.value)
    return str(err.value)


# --- values of the wrong type are refused ---------------------------------------------------

WRONG = [(5, "a number (5)"), (2.5, "a number (2.5)"), (True, "a boolean (true)"), ([], "a list"),
         (["Hi"], "a list"), ({"text": "Hi"}, "an object")]


@pytest.mark.parametrize("value,shown", WRONG)
@pytest.mark.parametrize("column", ["instruction", "input", "output", "system"])
def test_alpaca_text_of_the_wrong_type(smol, make_args, tmp_path, column, value, shown):
    folder = register(tmp_path, [GOOD, GOOD, {**GOOD, column: value}], columns={"system": "system"})
    message = refused(smol, make_args, folder)
    assert message.startswith(f"dataset 'd' ('{tmp_path / 'd.json'}' record 2): column {column!r} holds {shown}, "
                              "not text; write it as a JSON string")


@pytest.mark.parametrize("history,problem", [
    ("Hi / Hello", "holds a string ('Hi / Hello')"),
    (3, "holds a number (3)"),
    ({"Hi": "Hello"}, "holds an object"),
    (["Hi", "Hello"], "item 0 is a string ('Hi')"),
    ([["Hi"]], "item 0 has 1 entries, not 2"),
    ([["Hi", "Hello", "Bye"]], "item 0 has 3 entries, not 2"),
    ([["Hi", "Hello"], ["1+1", 2]], "item 1 holds a number (2), not text"),
    ([[None, "Hello"]], "item 0 holds null, not text"),
])
def test_history_that_is_not_string_pairs(smol, make_args, tmp_path, history, problem):
    folder = register(tmp_path, [{**GOOD, "history": history}], columns={"history": "history"})
    message = refused(smol, make_args, folder)
    assert f"record 0): column 'history' {problem}; write it as a list of [user, assistant] string pairs" in message


@pytest.mark.parametrize("value,shown", WRONG + [(None, "null")])
def test_sharegpt_content_of_the_wrong_type(smol, make_args, tmp_path, value, shown):
    folder = register(tmp_path, [{"conversations": [HI, HELLO]}, {"conversations": [HI, {**HELLO, "value": value}]}],
                      formatting="sharegpt")
    message = refused(smol, make_args, folder)
    assert f"d.json' record 1): message 1 ('gpt') holds {shown} as its 'value', not text" in message


@pytest.mark.parametrize("role,shown", [("user", "'user'"), ("assistant", "'assistant'"), (0, "a number (0)"),
                                        (None, "null"), (["human"], "a list")])
def test_sharegpt_unknown_roles(smol, make_args, tmp_path, role, shown):
    folder = register(tmp_path, [{"conversations": [HI, HELLO, {"from": role, "value": "x"}, HELLO]}],
                      formatting="sharegpt")
    message = refused(smol, make_args, folder)
    assert f"the role ('from') of message 2 is {shown}, not one of the tags 'human'," in message
    assert "set user_tag/assistant_tag/..." in message


@pytest.mark.parametrize("messages,problem", [
    ("human: Hi", "column 'conversations' holds a string ('human: Hi'); it must be a list of messages"),
    (None, "column 'conversations' holds null"),
    ({"from": "human"}, "column 'conversations' holds an object"),
    ([HI, "Hello!"], "message 1 is a string ('Hello!'), not an object with the keys 'from' and 'value'"),
    ([HI, {"from": "gpt", "text": "x"}], "message 1 lacks the key 'value'"),
])
def test_sharegpt_messages_of_the_wrong_shape(smol, make_args, tmp_path, messages, problem):
    folder = register(tmp_path, [{"conversations": messages}], formatting="sharegpt")
    assert problem in refused(smol, make_args, folder)


def test_sharegpt_system_column_of_the_wrong_type(smol, make_args, tmp_path):
    folder = register(tmp_path, [{"conversations": [HI, HELLO], "system": 1}], formatting="sharegpt",
                      columns={"messages": "conversations", "system": "system"})
    assert "column 'system' holds a number (1), not text" in refused(smol, make_args, folder)


# --- incomplete conversations are dropped, counted, said ------------------------------------

def assert_dropped(smol, make_args, folder, caplog, kept: int, counts: str) -> None:
    """Loading `folder` keeps `kept` examples and warns once: `counts` and the standard advice."""
    train, warnings = load(smol, make_args, folder, caplog)
    assert len(train) == kept
    assert warnings == [f"{counts}; fix or remove those records (or check columns/tags in dataset_info.json)"]


def test_alpaca_drops_are_counted_in_one_warning(smol, make_args, tmp_path, caplog):
    records = [GOOD, {**GOOD, "output": ""}, GOOD, {**GOOD, "output": "  \n"}, {**GOOD, "output": None},
               {"instruction": "", "input": " ", "output": "x"}, {"instruction": None, "output": "x"},
               {**GOOD, "history": [["Hi", ""]]}, GOOD]
    folder = register(tmp_path, records, columns={"history": "history"})
    path = tmp_path / "d.json"
    assert_dropped(smol, make_args, folder, caplog, kept=3, counts=(
        f"dropped 6 of 9 examples of 'd': 3 with an empty reply (first: '{path}' record 1), "
        f"2 with no instruction or input text (first: '{path}' record 5), "
        f"1 with an empty turn in 'history' (first: '{path}' record 7)"))


def test_sharegpt_drops_follow_llamafactory_and_are_counted(smol, make_args, tmp_path, caplog):
    convos = [
        [HI, HELLO],  # kept
        [SYSTEM, HI, CALL, OBS, HELLO],  # kept: a tool call and its observation in their places
        [HI, HELLO, HI],  # ends on a user turn
        [HI, CALL, OBS],  # ends on an observation
        [HELLO, HI],  # starts with the assistant
        [HI, HI, HELLO],  # two user turns in a row
        [HI, SYSTEM, HELLO],  # a system message in the middle
        [],  # nothing
        [SYSTEM],  # only a system message
        [HI, {**HELLO, "value": " "}],  # a blank reply
        [{**HI, "value": ""}, HELLO],  # a blank user turn
        [HI, HELLO, HI, {**HELLO, "value": ""}],  # a blank later reply
    ]
    folder = register(tmp_path, [{"conversations": c} for c in convos], formatting="sharegpt")
    path = tmp_path / "d.json"
    assert_dropped(smol, make_args, folder, caplog, kept=2, counts=(
        f"dropped 10 of 12 examples of 'd': 2 ending on a user turn with no reply (first: '{path}' record 2), "
        f"3 with roles out of order (first: '{path}' record 4), 2 with no messages (first: '{path}' record 7), "
        f"3 with an empty reply or user turn (first: '{path}' record 9)"))


def test_jsonl_drops_name_the_line(smol, make_args, tmp_path, caplog):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [GOOD, GOOD, {**GOOD, "output": ""}]) + "\n\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl"}}))
    train, warnings = load(smol, make_args, str(tmp_path), caplog)
    assert len(train) == 2 and f"1 with an empty reply (first: '{tmp_path / 'd.jsonl'}' line 3)" in warnings[0]


def test_nothing_usable_is_one_error_with_the_counts(smol, make_args, tmp_path):
    folder = register(tmp_path, [{"conversations": [HI, HELLO, HI]}, {"conversations": [HELLO]}], formatting="sharegpt")
    message = refused(smol, make_args, folder)
    assert message == (
        f"dataset 'd': none of its 2 records is a usable conversation (a user turn followed by a non-empty "
        f"assistant reply): 1 ending on a user turn with no reply (first: '{tmp_path / 'd.json'}' record 0), "
        f"1 with roles out of order (first: '{tmp_path / 'd.json'}' record 1); "
        "fix or remove those records (or check columns/tags in dataset_info.json)")


# --- cutoff_len ------------------------------------------------------------------------------

# A reply of ~12 tokens: within cutoff_len=16, a short prompt keeps a few of them (the budget is
# shared in proportion), a ~200-token prompt none (LLaMA-Factory's truncation rule).
REPLY = "Hello to each and every one of you here today!"
SHORT = {"instruction": "Greet.", "input": "", "output": REPLY}
LONG = {"instruction": "Please greet every single person in this room, one by one, politely. " * 12,
        "input": "", "output": REPLY}


def test_examples_with_no_reply_left_after_cutoff_are_dropped_and_said(smol, make_args, tmp_path, caplog):
    folder = register(tmp_path, [SHORT, LONG, SHORT, LONG, LONG])
    train, warnings = load(smol, make_args, folder, caplog, cutoff_len=16)
    assert len(train) == 2 and all(any(label != -100 for label in e["labels"]) for e in train)
    assert warnings == [f"dropped 3 of 5 examples of 'd': 3 with no reply token left (first: '{tmp_path / 'd.json'}' "
                        "record 1); raise cutoff_len (now 16) to keep them"]


def test_no_example_left_within_cutoff_is_one_error_naming_cutoff_len(smol, make_args, tmp_path):
    folder = register(tmp_path, [LONG, LONG])
    message = refused(smol, make_args, folder, cutoff_len=16)
    assert message.startswith("dataset 'd': none of its 2 examples keeps a reply token within cutoff_len=16: ")
    assert message.endswith("raise cutoff_len (now 16) to keep them")


def test_cutoff_drops_are_counted_per_dataset(smol, make_args, tmp_path, caplog):
    (tmp_path / "short.json").write_text(json.dumps([SHORT] * 3))
    (tmp_path / "long.json").write_text(json.dumps([LONG, SHORT]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"short": {"file_name": "short.json"},
                                                            "long": {"file_name": "long.json"}}))
    caplog.set_level(logging.WARNING)
    train = load_datasets(make_args(dataset="short,long", dataset_dir=str(tmp_path), cutoff_len=16), smol).train
    assert len(train) == 4
    assert [r.getMessage()[:40] for r in caplog.records] == ["dropped 1 of 2 examples of 'long': 1 wit"]


# --- num_samples (LLaMA-Factory samples instead of ignoring it) -----------------------------

def test_num_samples_samples_and_repeats(smol, make_args, tmp_path):
    records = [{"instruction": f"q{i}", "input": "", "output": f"answer {i}"} for i in range(10)]
    for num, expected_distinct in ((4, 4), (25, 10)):
        folder = register(tmp_path, records, num_samples=num)
        first = load_datasets(make_args(dataset="d", dataset_dir=folder), smol, seed=3).train
        again = load_datasets(make_args(dataset="d", dataset_dir=folder), smol, seed=3).train
        assert len(first) == num and len({tuple(e["input_ids"]) for e in first}) == expected_distinct
        assert [e["input_ids"] for e in first] == [e["input_ids"] for e in again]
    assert len(load_datasets(make_args(dataset="d", dataset_dir=folder, max_samples=7), smol).train) == 7


# --- LLaMA-Factory's demo data still loads, unchanged and with nothing dropped --------------

def test_every_demo_entry_loads_or_is_refused_in_one_line(smol, make_args, shared_data, caplog, monkeypatch,
                                                         tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # its hub datasets: not in this (empty) cache, one line each
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    registry = json.loads((shared_data / "dataset_info.json").read_text())
    loaded = {}
    caplog.set_level(logging.WARNING)
    for name in registry:
        try:
            args = make_args(dataset=name, dataset_dir=str(shared_data), placeholders={"name": "A", "author": "B"})
            loaded[name] = len(load_datasets(args, smol).train)
        except TuneforgeError as err:
            assert "\n" not in str(err) and name in str(err)
    assert loaded == {"identity": 91, "alpaca_en_demo": 999, "alpaca_zh_demo": 1000, "glaive_toolcall_en_demo": 300}
    assert not caplog.records, [r.getMessage() for r in caplog.records]
