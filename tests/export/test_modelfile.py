"""The Modelfile's TEMPLATE, rendered as Ollama renders it (tests/export/gotemplate.py), gives the
prompt transformers' apply_chat_template gives for the same conversation: every message once,
with and without a system message, with the Modelfile's SYSTEM default."""

from __future__ import annotations

import re

import pytest

from tests.export.gotemplate import execute, ollama_prompt
from tuneforge.data import apply_template
from tuneforge.export.modelfile import go_template, ollama_template, write_modelfile

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 3?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "And {{ .System }} then?\nTwo lines, café ünïcode."}],
    [{"role": "system", "content": "Be brief.\nVery brief."}, {"role": "user", "content": "One?"},
     {"role": "assistant", "content": "1."}, {"role": "user", "content": "Two?"},
     {"role": "assistant", "content": "2."}, {"role": "user", "content": "Three?"}],
]
TEMPLATES = [None, "chatml", "qwen", "llama3", "mistral", "gemma", "alpaca", "vicuna", "default",
             # LLaMA-Factory's: system text in the first user turn with its own format, prefixes, eos in turns
             "llama2", "paligemma_chat", "glm4", "deepseek3", "phi4", "mistral_small", "zephyr", "seed_coder"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)  # SmolLM2's, with its own chat template


def _modelfile(text: str) -> tuple[str, str | None]:
    """(TEMPLATE, SYSTEM) read back from a Modelfile's triple-quoted values."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    assert template, text
    return template.group(1), system.group(1) if system else None


def _hf(tokenizer, conversation) -> str:
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", TEMPLATES, ids=[n or "smollm2-own" for n in TEMPLATES])
def test_ollama_renders_each_conversation_as_the_chat_template(tokenizer, tmp_path, name):
    original = tokenizer.chat_template
    try:
        apply_template(tokenizer, name)
        template, system = _modelfile(write_modelfile(tmp_path, "m.gguf", tokenizer).read_text())
        for conversation in CONVERSATIONS:
            assert ollama_prompt(template, conversation, system) == _hf(tokenizer, conversation)
        # default_system from the config: Ollama sends it when a request has none, as chat does
        template, system = _modelfile(write_modelfile(tmp_path, "m.gguf", tokenizer, "Be kind.").read_text())
        assert system == "Be kind."
        for conversation in CONVERSATIONS:
            with_default = conversation if conversation[0]["role"] == "system" else [
                {"role": "system", "content": "Be kind."}, *conversation]
            assert ollama_prompt(template, conversation, system) == _hf(tokenizer, with_default)
    finally:
        tokenizer.chat_template = original


def test_the_old_template_renders_the_system_prompt_twice_and_is_caught(tokenizer):
    """The template exports had before: .System and a .Messages loop that includes system messages."""
    old = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
           "<|im_start|>assistant\n")
    conversation = CONVERSATIONS[1]
    rendered = ollama_prompt(old, conversation)
    assert rendered.count("Answer in French.") == 2
    assert rendered != _hf(tokenizer, conversation)
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert ollama_prompt(old, CONVERSATIONS[0], default).count(default) == 2  # via SYSTEM too


def test_smollm2_modelfile_carries_its_default_system_and_stops(tokenizer, tmp_path):
    text = write_modelfile(tmp_path, "tiny.gguf", tokenizer).read_text()
    assert text.startswith("FROM ./tiny.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    original = tokenizer.chat_template
    try:
        apply_template(tokenizer, "chatml")  # no default system: none in the Modelfile either
        assert "SYSTEM" not in write_modelfile(tmp_path, "tiny.gguf", tokenizer).read_text()
        apply_template(tokenizer, "llama3")
        assert 'PARAMETER stop "<|eot_id|>"' in write_modelfile(tmp_path, "t.gguf", tokenizer).read_text()
    finally:
        tokenizer.chat_template = original


@pytest.mark.parametrize("chat_template", [
    "{{ messages[0]['content'] }}<odd>",
    # a Llama-3.1-style template: dates in every system turn, which no tuneforge template writes
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'system' %}Today Date: 26 Jul 2024\n\n{% endif %}{{ m['content'] }}<|eot_id|>"
    "{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n",
])
def test_a_template_that_matches_none_gets_a_comment_not_a_wrong_template(tokenizer, tmp_path, chat_template):
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = chat_template
        assert ollama_template(tokenizer) is None
        text = write_modelfile(tmp_path, "m.gguf", tokenizer).read_text()
        assert "\nTEMPLATE " not in text and "write a TEMPLATE by hand" in text
    finally:
        tokenizer.chat_template = original


def test_a_reasoning_template_gets_a_comment_not_a_template_without_its_thoughts(tokenizer, tmp_path):
    original = tokenizer.chat_template
    try:
        apply_template(tokenizer, "qwen3")  # an empty thought before replies without one: no Go template for that
        assert ollama_template(tokenizer) is None
        assert "write a TEMPLATE by hand" in write_modelfile(tmp_path, "m.gguf", tokenizer).read_text()
        apply_template(tokenizer, "qwen3_nothink")
        assert ollama_template(tokenizer) is not None
    finally:
        tokenizer.chat_template = original


def test_bos_is_left_to_llama_cpp_when_the_tokenizer_adds_it():
    from tuneforge.data.templates import TEMPLATES as NAMED

    llama3 = NAMED["llama3"]
    assert go_template(llama3, "<s>", "</s>", bos_added=False).startswith("<s>{{ range")
    assert go_template(llama3, "<s>", "</s>", bos_added=True).startswith("{{ range")


def test_go_template_subset():
    """The evaluator itself, on Go's rules the templates rely on."""
    data = {"A": "x", "Empty": "", "Items": [{"N": 1}, {"N": 2}, {"N": 3}]}
    assert execute("a  {{- .A -}}  b", data) == "axb"
    assert execute('{{ if .Empty }}1{{ else if eq .A "y" "x" }}2{{ else }}3{{ end }}', data) == "2"
    assert execute("{{ range $i, $m := .Items }}{{ $i }}:{{ .N }}{{ $.A }},{{ end }}", data) == "0:1x,1:2x,2:3x,"
    assert execute('{{ $s := "" }}{{ range .Items }}{{ if eq .N 2 }}{{ $s = "two" }}{{ end }}{{ end }}{{ $s }}',
                   data) == "two"
    assert execute("{{ if and .A (not .Empty) (eq (len .Items) 3) }}yes{{ end }}", data) == "yes"
    assert execute('{{ if or .Empty "" }}no{{ else }}{{ "{{" }}{{ end }}', data) == "{{"
    assert execute("{{/* a comment */}}{{ range .Empty }}x{{ else }}none{{ end }}", data) == "none"
