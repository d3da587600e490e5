"""encode_conversation: labels cover exactly the replies; prompts tokenize as at inference; cutoff."""

from __future__ import annotations

import pytest

from tuneforge.data import encode_conversation
from tuneforge.data.encode import assemble, split_budget
from tuneforge.errors import DataError

IGNORE = -100
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6, since 3 + 3 = 6.\nAnything else?"},
    {"role": "user", "content": "No, thanks."},
    {"role": "assistant", "content": "You're welcome!"},
]
REPLIES = [m["content"] for m in CHAT if m["role"] == "assistant"]


def test_labels_are_exactly_the_replies_plus_eos(smol, spans):
    example = encode_conversation(smol, CHAT)
    assert len(example["input_ids"]) == len(example["labels"])
    decoded = [smol.decode(span) for span in spans(example)]
    assert decoded == [reply + "<|im_end|>" for reply in REPLIES]
    # the whole sequence is exactly the template's rendering
    assert smol.decode(example["input_ids"]) == smol.apply_chat_template(CHAT, tokenize=False)


def test_trailing_newline_after_eos_is_not_labelled(smol):
    example = encode_conversation(smol, CHAT[:3])
    newline = smol("\n", add_special_tokens=False)["input_ids"]
    assert example["input_ids"][-1:] == newline and example["labels"][-1] == IGNORE
    assert example["input_ids"][-2] == smol.eos_token_id == example["labels"][-2]


def test_prompt_tokens_match_inference(smol):
    """The tokens before the last reply are what chat feeds the model for that prompt."""
    example = encode_conversation(smol, CHAT)
    last_prompt = smol.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    at_inference = smol(last_prompt, add_special_tokens=False)["input_ids"]
    assert example["input_ids"][: len(at_inference)] == at_inference
    tokenized_by_chat = smol.apply_chat_template(CHAT[:-1], add_generation_prompt=True, return_dict=True)
    assert tokenized_by_chat["input_ids"] == at_inference
    reply = smol(REPLIES[-1], add_special_tokens=False)["input_ids"]
    assert example["input_ids"][len(at_inference):][: len(reply)] == reply


def test_no_second_bos(smol):
    example = encode_conversation(smol, CHAT[1:3])  # Smol's template opens with its bos <|im_start|>
    assert example["input_ids"][0] == smol.bos_token_id and example["input_ids"][1] != smol.bos_token_id


def test_train_on_prompt_labels_everything_but_the_tail(smol):
    example = encode_conversation(smol, CHAT, train_on_prompt=True)
    masked = [i for i, label in enumerate(example["labels"]) if label == IGNORE]
    newline = smol("\n", add_special_tokens=False)["input_ids"][0]
    assert masked and all(example["input_ids"][i] == newline for i in masked)  # only the post-eos newlines
    assert [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE] == [
        t for t in example["labels"] if t != IGNORE
    ]


def test_mask_history_labels_only_the_last_reply(smol, spans):
    example = encode_conversation(smol, CHAT, mask_history=True)
    assert [smol.decode(s) for s in spans(example)] == [REPLIES[-1] + "<|im_end|>"]
    assert example["input_ids"] == encode_conversation(smol, CHAT)["input_ids"]


def test_cutoff_len_truncates_each_turn_and_drops_turns_that_do_not_fit(smol, spans):
    full = encode_conversation(smol, CHAT)
    turn1 = len(encode_conversation(smol, CHAT[:3])["input_ids"])
    turn2 = len(encode_conversation(smol, CHAT[:5])["input_ids"]) - turn1
    reply2 = len(smol(REPLIES[1] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
    cutoff = turn1 + 6
    cut = encode_conversation(smol, CHAT, cutoff_len=cutoff)
    assert len(cut["input_ids"]) == cutoff < len(full["input_ids"])
    # turn 2 shares its 6 tokens between prompt and reply; turn 3 no longer fits at all
    kept_prompt, kept_reply = split_budget(turn2 - reply2, reply2, 6)
    assert kept_reply > 0 and kept_prompt + kept_reply == 6
    assert cut["input_ids"] == full["input_ids"][: turn1 + kept_prompt] + full["input_ids"][
        turn1 + turn2 - reply2:][:kept_reply]
    decoded = [smol.decode(s) for s in spans(cut)]
    assert decoded[0] == REPLIES[0] + "<|im_end|>" and REPLIES[1].startswith(decoded[1])


def test_cutoff_len_shares_budget_so_a_long_prompt_keeps_its_reply(smol, spans):
    messages = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Short answer."}]
    example = encode_conversation(smol, messages, cutoff_len=64)
    assert len(example["input_ids"]) == 64
    assert smol.decode(spans(example)[0]) == "Short answer.<|im_end|>"


def test_mask_history_keeps_last_turn_under_cutoff(smol, spans):
    last_turn_len = len(encode_conversation(smol, CHAT)["input_ids"]) - len(
        encode_conversation(smol, CHAT[:5])["input_ids"])
    cut = encode_conversation(smol, CHAT, cutoff_len=last_turn_len, mask_history=True)
    assert [smol.decode(s) for s in spans(cut)] == [REPLIES[-1] + "<|im_end|>"]
    assert len(cut["input_ids"]) == last_turn_len


@pytest.mark.parametrize("prompt_len,target_len,budget,expected", [
    (10, 5, 100, (10, 5)),      # everything fits
    (300, 10, 64, (54, 10)),    # short reply kept whole, prompt truncated
    (10, 300, 64, (10, 54)),    # short prompt kept whole, reply truncated
    (300, 100, 64, (48, 16)),   # both long: proportional
])
def test_split_budget(prompt_len, target_len, budget, expected):
    assert split_budget(prompt_len, target_len, budget) == expected


def test_assemble_masks_tail_and_history():
    turns = [([1, 2], [3, 4], [9]), ([5], [6], [9])]
    out = assemble(turns, cutoff_len=100)
    assert out == {"input_ids": [1, 2, 3, 4, 9, 5, 6, 9], "labels": [IGNORE, IGNORE, 3, 4, IGNORE, IGNORE, 6, IGNORE]}
    out = assemble(turns, cutoff_len=100, mask_history=True)
    assert out["labels"] == [IGNORE] * 6 + [6, IGNORE]


def test_tools_go_into_the_system_message_when_the_template_ignores_them(smol):
    tools = [{"name": "add", "description": "Add two numbers", "parameters": {"type": "object"}}]
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
                {"role": "tool", "content": "3"}, {"role": "assistant", "content": "It is 3."}]
    text = smol.decode(encode_conversation(smol, messages, tools=tools)["input_ids"])
    assert text.startswith("<|im_start|>system\n") and '"name": "add"' in text.split("<|im_end|>")[0]
    assert "<|im_start|>tool\n3<|im_end|>" in text


def test_tools_are_passed_to_templates_that_render_them(smol, spans):
    smol.chat_template = (
        "{% if tools %}TOOLS:{{ tools | tojson }}{{ '\\n' }}{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tools = [{"name": "add"}]
    example = encode_conversation(smol, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                  tools=tools)
    assert smol.decode(example["input_ids"]).startswith('TOOLS:[{"name": "add"}]\nuser: hi\n')
    assert [smol.decode(s) for s in spans(example)] == ["yo<|im_end|>"]


def test_template_without_eos_gets_eos_appended_to_the_reply(smol, spans):
    smol.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    example = encode_conversation(smol, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert [smol.decode(s) for s in spans(example)] == ["yo<|im_end|>"]


def test_template_that_rewrites_history_is_reported(smol):
    # drops earlier replies, like templates that strip reasoning from past turns
    smol.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                          "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="prefix-consistent.*template:"):
        encode_conversation(smol, CHAT)


def test_template_errors_become_data_errors(smol):
    smol.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="roles must alternate.*template:"):
        encode_conversation(smol, CHAT)


def test_conversation_without_reply_is_rejected(smol):
    with pytest.raises(DataError, match="no assistant message"):
        encode_conversation(smol, [{"role": "user", "content": "hi"}])
