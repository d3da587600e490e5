"""`tuneforge chat` keeps prompt, virtual tokens and answer inside the model's context: the answer
is capped to what the prompt and the adapter's virtual tokens leave, a prompt that leaves nothing
is one error line naming the adapter (exit 2 with --prompt), and in the interactive chat that turn
is dropped, so the conversation goes on."""

from __future__ import annotations

import builtins

import pytest

from tests.conftest import save_moved_adapter
from tuneforge import cli
from tuneforge.config import load_config
from tuneforge.infer import ChatModel
from tuneforge.infer.stream import RequestError

VIRTUAL = 20
ASK = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def prefix_dir(tiny_model_dir, tmp_path_factory):
    from tuneforge.adapters import PrefixTuningConfig

    out = tmp_path_factory.mktemp("chat-context") / "prefix20"
    return save_moved_adapter(tiny_model_dir, out, PrefixTuningConfig(num_virtual_tokens=VIRTUAL), 1,
                              scale=4.0, moved=("encoders",))


@pytest.fixture(scope="module")
def chat(tiny_model_dir, prefix_dir):
    return ChatModel(load_config(None, {"model_name_or_path": str(tiny_model_dir), "do_sample": False,
                                        "adapter_name_or_path": str(prefix_dir), "max_new_tokens": 8}))


def _size(chat, text: str) -> int:
    return chat._inputs([{"role": "user", "content": text}], None)["input_ids"].shape[1]


def _too_long(chat) -> str:
    """A message that fits the context without the prefix but not with it."""
    for words in range(chat.context - 40, chat.context):
        text = "fine " * words
        if chat.context - VIRTUAL <= _size(chat, text) < chat.context:
            return text
    raise AssertionError("no such message")


def test_answer_is_capped_by_prompt_and_virtual_tokens(chat):
    prompt = _size(chat, ASK[0]["content"])
    assert chat.context == 512
    assert chat._generation_kwargs(prompt)["max_new_tokens"] == 8  # the config's, room allowing
    assert chat._generation_kwargs(512 - VIRTUAL - 3)["max_new_tokens"] == 3
    assert chat._generation_kwargs(512 - VIRTUAL - 3, max_new_tokens=None)["max_new_tokens"] == 3
    with pytest.raises(RequestError, match=f"the prompt is {512 - VIRTUAL} tokens and adapter '.*prefix20' "
                       f"adds {VIRTUAL} virtual tokens, but this model's context is 512 tokens"):
        chat._generation_kwargs(512 - VIRTUAL)


def test_chat_prompt_too_long_is_one_error_line(chat, tiny_model_dir, prefix_dir, capsys):
    text = _too_long(chat)
    size = _size(chat, text)
    rc = cli.main(["chat", "--model", str(tiny_model_dir), "--adapter", str(prefix_dir), "--prompt", text])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == (f"tuneforge: error: the prompt is {size} tokens and adapter '{prefix_dir}' adds "
                       f"{VIRTUAL} virtual tokens, but this model's context is 512 tokens, which must also "
                       "hold at least one answer token; shorten the messages")


def test_interactive_chat_drops_the_turn_that_does_not_fit(chat, tiny_model_dir, prefix_dir, capsys,
                                                          monkeypatch):
    typed = iter([_too_long(chat), "hi", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    rc = cli.main(["chat", "--model", str(tiny_model_dir), "--adapter", str(prefix_dir), "max_new_tokens=3",
                   "do_sample=false"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("(not answered: the prompt is ") == 1 and "or /clear the conversation)" in out
    assert out.count("Assistant: ") == 2  # "hi" was answered: the long turn left the history
