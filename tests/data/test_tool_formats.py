"""Tool-call data in a named template's tool format (data/tool_formats.py), as LLaMA-Factory writes
it: the tools in the system text, each function_call turn in the family's call syntax, learned."""

from __future__ import annotations

import json

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tests.data import family_chat_templates as fam
from tuneforge.data import get_template
from tuneforge.data.encode import encode_conversations
from tuneforge.data.formats import Conversation, to_conversations
from tuneforge.data.readers import read_records
from tuneforge.data.registry import get_entry, load_registry
from tuneforge.data.template_table import TEMPLATES
from tuneforge.data.templates import apply_template
from tuneforge.data.tool_formats import TOOL_FORMATS, apply_tool_format
from tuneforge.errors import DataError

TOOL = {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"},
                                                        "unit": {"type": "string", "enum": ["C", "F"]}},
                       "required": ["city"]}}
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": json.dumps(CALL), "function_call": True},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 C."},
]


@pytest.fixture(scope="module")
def glaive(shared_data):
    entry = get_entry(shared_data, load_registry(shared_data), "glaive_toolcall_en_demo")
    return to_conversations(entry, read_records(entry, max_samples=8))


def test_glaive_function_calls_are_marked_and_the_tools_read(glaive):
    calls = [m for c in glaive for m in c.messages if m.get("function_call")]
    assert calls and all(m["role"] == "assistant" for m in calls)
    assert all(c.tools for c in glaive[:1])


def test_qwen_renders_tools_and_calls_as_qwen25s_own_template():
    """Qwen2.5's chat template given the same tools and a tool_calls message is the oracle."""
    ours = get_template("qwen").chat_template
    messages = apply_tool_format(get_template("qwen"), CHAT, [TOOL])
    own_messages = [CHAT[0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": CALL}]}, *CHAT[2:]]

    def render(text, msgs, **kw):
        return render_jinja_template([msgs], chat_template=text, add_generation_prompt=False,
                                     bos_token="<|endoftext|>", eos_token="<|im_end|>", **kw)[0][0]

    expected = render(fam.QWEN25, own_messages, tools=[{"type": "function", "function": TOOL}])
    assert render(ours, messages) == expected
    assert "# Tools" in expected and "<tool_call>" in expected


def test_glaive_call_turns_are_learned_in_the_templates_format(smol, spans, glaive):
    apply_template(smol, "qwen")
    example = encode_conversations(smol, glaive[:1])[0]
    text = smol.decode(example["input_ids"])
    assert '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools' in text
    assert '"name": "search_recipes"' in text.split("</tools>\n\nFor each")[0]
    learned = [smol.decode(s) for s in spans(example)]
    call = [s for s in learned if "<tool_call>" in s]
    assert call == ['<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", '
                    '"rice"]}}\n</tool_call><|im_end|>']
    # the tool's answer is an observation turn: part of the prompt, never learned
    assert not any("Chicken and Rice Casserole" in s and "recipes" in s and "{" in s for s in learned)


CALL_TEXT = {
    "default": 'Action: get_weather\nAction Input: {"city": "Paris", "unit": "C"}',
    "glm4": 'get_weather\n{"city": "Paris", "unit": "C"}',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}',
    "mistral": '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]',
    "qwen3_5": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=unit>\nC\n"
               "</parameter>\n</function>\n</tool_call>",
    "glm4_moe": "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>unit"
                "</arg_key>\n<arg_value>C</arg_value>\n</tool_call>",
    "minimax1": '<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_calls>',
    "minimax2": '<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n<parameter name="unit">C'
                "</parameter>\n</invoke>",
    "lfm2": '<|tool_call_start|>[get_weather(city="Paris", unit="C")]<|tool_call_end|>',
    "gemma4": '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>C<|"|>}<tool_call|>',
    "seed_oss": "\n<seed:tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n<parameter=unit>C"
                "</parameter>\n</function>\n</seed:tool_call>",
}


@pytest.mark.parametrize("fmt", sorted(CALL_TEXT))
def test_each_tool_format_writes_a_call_as_its_family(fmt):
    assert TOOL_FORMATS[fmt].calls([(CALL["name"], CALL["arguments"])]) == CALL_TEXT[fmt]


def test_the_default_format_describes_each_argument():
    text = TOOL_FORMATS["default"].tools([TOOL])
    assert "> Tool Name: get_weather\nTool Description: Weather of a city\nTool Args:\n" in text
    assert "  - city (string, required): The city\n  - unit (string): , should be one of [C, F]\n" in text
    assert "Action: tool name (one of [get_weather])" in text


def test_parallel_calls_and_a_thought_before_the_call():
    qwen = get_template("qwen3")  # a reasoning template: the thought stays before the call
    both = json.dumps([CALL, {"name": "get_time", "arguments": {}}])
    content = "<think>\nI need the weather.\n</think>\n\n" + both
    out = apply_tool_format(qwen, [CHAT[0], {"role": "assistant", "content": content, "function_call": True}], None)
    assert out[1]["thought"] == "<think>\nI need the weather.\n</think>\n\n"
    assert out[1]["function_call"].count("<tool_call>") == 2
    text = render_jinja_template([out], chat_template=qwen.chat_template, bos_token="", eos_token="")[0][0]
    assert "<|im_start|>assistant\n<think>\nI need the weather.\n</think>\n\n<tool_call>\n" in text


def test_mistral_and_glm4_function_turns_use_their_own_words():
    for name, expected in (("mistral", '[/INST][TOOL_CALLS] [{"name": "get_weather"'),
                           ("glm4", '<|assistant|>get_weather\n{"city": "Paris"')):
        template = get_template(name)
        out = apply_tool_format(template, CHAT, [TOOL])
        text = render_jinja_template([out], chat_template=template.chat_template, bos_token="<s>",
                                     eos_token="</s>")[0][0]
        assert expected in text, name


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_named_template_learns_a_function_call(smol, spans, name):
    apply_template(smol, name)
    example = encode_conversations(smol, [Conversation(list(CHAT), [TOOL], "record 1")])[0]
    learned = "".join(smol.decode(s) for s in spans(example))
    assert "get_weather" in learned and "Paris" in learned, name
    assert "Weather of a city" in smol.decode(example["input_ids"]), name


@pytest.mark.parametrize("content, problem", [
    ("not json", "is not JSON"),
    ('{"arguments": {}}', 'a "name"'),
])
def test_a_bad_function_call_is_one_line_naming_the_record(content, problem):
    bad = [CHAT[0], {"role": "assistant", "content": content, "function_call": True}]
    with pytest.raises(DataError, match=problem) as err:
        apply_tool_format(get_template("qwen"), bad, None, "glaive.json record 3")
    assert str(err.value).startswith("glaive.json record 3: function call") and "\n" not in str(err.value)


def test_glm4_refuses_parallel_calls():
    both = [CHAT[0], {"role": "assistant", "content": json.dumps([CALL, CALL]), "function_call": True}]
    with pytest.raises(DataError, match="no parallel calls"):
        apply_tool_format(get_template("glm4"), both, None)


def test_the_tokenizers_own_template_keeps_the_call_text(smol, spans):
    """No named template: the data's call text is the reply, the marker never reaches the template."""
    example = encode_conversations(smol, [Conversation(list(CHAT), [TOOL], "record 1")])[0]
    assert json.dumps(CALL) in "".join(smol.decode(s) for s in spans(example))
