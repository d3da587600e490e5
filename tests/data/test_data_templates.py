"""Named chat templates: rendering, masking on a real tokenizer, and errors."""

from __future__ import annotations

import pytest

from tuneforge.data import TEMPLATES, apply_template, encode_conversation, get_template
from tuneforge.errors import ConfigError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
]


def test_a_sensible_set_of_llama_factory_names():
    assert {"default", "empty", "alpaca", "vicuna", "chatml", "qwen", "llama3", "mistral", "gemma"} <= set(TEMPLATES)


@pytest.mark.parametrize("name,close", [("llama-9000", "llama3"), ("qwen3-nothink", "qwen3_nothink"),
                                        ("mistral7", "mistral")])
def test_unknown_template_names_close_names_not_all(name, close):
    with pytest.raises(ConfigError) as err:
        get_template(name)
    message = str(err.value)
    assert name in message and close in message.split("close names:")[1] and "\n" not in message
    assert sum(known in message.split(";") for known in TEMPLATES) == 0  # no list of every name
    assert len(message) < 400


def test_none_keeps_the_tokenizers_template(smol):
    original = smol.chat_template
    assert apply_template(smol, None) == original and smol.chat_template == original


def test_tokenizer_without_template_asks_for_template(smol):
    smol.chat_template = None
    with pytest.raises(ConfigError, match="template:"):
        apply_template(smol, None)


def test_apply_template_sets_it_on_the_tokenizer(smol):
    text = apply_template(smol, "alpaca")
    assert smol.chat_template == text == get_template("alpaca").chat_template
    rendered = smol.apply_chat_template(CHAT[1:3], tokenize=False)
    assert rendered == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.<|im_end|>\n\n"
    )


@pytest.mark.parametrize("name,expected", [
    ("alpaca", "Be brief.\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.<|im_end|>\n\n"
               "### Instruction:\nAnother?\n\n### Response:\n"),
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
               "<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nAnother?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    # LLaMA-Factory's mistral (Mistral v0.3's spacing): "[INST] ...[/INST]", a space before the reply
    ("mistral", "<|im_start|>[INST] Be brief.\n\nName a color.[/INST] Blue.<|im_end|>[INST] Another?[/INST]"),
    ("gemma", "<|im_start|><start_of_turn>user\nBe brief.\n\nName a color.<end_of_turn>\n<start_of_turn>model\n"
              "Blue.<end_of_turn>\n<start_of_turn>user\nAnother?<end_of_turn>\n<start_of_turn>model\n"),
    ("vicuna", "Be brief. USER: Name a color. ASSISTANT: Blue.<|im_end|>USER: Another? ASSISTANT:"),
    ("default", "System: Be brief.\nHuman: Name a color.\nAssistant: Blue.<|im_end|>\nHuman: Another?\nAssistant:"),
    ("empty", "Be brief.Name a color.Blue.<|im_end|>Another?"),
])
def test_named_templates_render(smol, name, expected):
    apply_template(smol, name)  # bos/eos come from the tokenizer: <|im_start|> / <|im_end|> for SmolLM2
    assert smol.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True) == expected


def test_qwen_has_a_default_system_prompt(smol):
    apply_template(smol, "qwen")
    assert smol.apply_chat_template(CHAT[1:2], tokenize=False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_named_template_is_prefix_consistent_and_masks_replies(smol, spans, name):
    """The whole table: each template renders the probe conversation, its generation prompt is a
    prefix of the text with the reply, and exactly the replies (with eos) are labelled."""
    apply_template(smol, name)
    render = smol.apply_chat_template
    example = encode_conversation(smol, CHAT)
    decoded = [smol.decode(s) for s in spans(example)]
    answers = []
    for i in (2, 4):  # each assistant message: the rendered text it adds after the generation prompt
        prompt = render(CHAT[:i], tokenize=False, add_generation_prompt=True)
        full = render(CHAT[: i + 1], tokenize=False)
        assert full.startswith(prompt) and prompt.startswith(render(CHAT[:i], tokenize=False))
        answers.append(full[len(prompt):].rstrip())
    assert len(decoded) == 2
    for reply, answer, text in zip(["Blue.", "Green."], answers, decoded):
        assert reply in answer and text.endswith("<|im_end|>")  # eos, appended where missing
        assert text == (answer if "<|im_end|>" in answer else answer + "<|im_end|>")
    # the tokens before the last reply spell the prompt chat renders for it, with the eos that was
    # added after the earlier reply when the template's reply does not end with it
    labels = example["labels"]
    last_reply_start = max(i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100)
    prompt = render(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    if "<|im_end|>" not in answers[0]:
        prompt = prompt.replace(answers[0], answers[0] + "<|im_end|>", 1)
    assert smol.decode(example["input_ids"][:last_reply_start]) == prompt


@pytest.mark.parametrize("name", ["alpaca", "chatml", "vicuna", "default"])
def test_named_template_prompt_tokens_match_inference(smol, name):
    apply_template(smol, name)
    example = encode_conversation(smol, CHAT)
    prompt = smol.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    ids = smol(prompt, add_special_tokens=False)["input_ids"]
    assert example["input_ids"][: len(ids)] == ids


def test_alpaca_and_llama3_label_exactly_the_reply(smol, spans):
    apply_template(smol, "alpaca")
    alpaca = encode_conversation(smol, CHAT)
    assert [smol.decode(s) for s in spans(alpaca)] == ["Blue.<|im_end|>", "Green.<|im_end|>"]
    apply_template(smol, "llama3")
    llama3 = encode_conversation(smol, CHAT)
    # llama3 ends a reply with <|eot_id|>; the tokenizer's eos is added so the model learns to stop
    assert [smol.decode(s) for s in spans(llama3)] == ["Blue.<|eot_id|><|im_end|>", "Green.<|eot_id|><|im_end|>"]


def test_named_templates_get_tool_descriptions_in_the_system_text(smol):
    """minimax1's tool turn says "tools": still one of ours, which never render the tools list."""
    from tuneforge.data.formats import Conversation
    from tuneforge.data.encode import encode_conversations

    tools = [{"name": "add", "description": "Add two numbers", "parameters": {}}]
    for name in ("minimax1", "qwen3_nothink"):
        apply_template(smol, name)
        example = encode_conversations(smol, [Conversation(list(CHAT[1:3]), tools)])[0]
        assert "Add two numbers" in smol.decode(example["input_ids"]), name
