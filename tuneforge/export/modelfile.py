"""Ollama Modelfile beside an exported GGUF: FROM, a TEMPLATE in Ollama's Go-template syntax
converted from the tokenizer's Jinja chat template (the common ChatML / Llama-3 / Llama-2
families; anything else gets a comment saying so), stop tokens and the default system prompt."""

from __future__ import annotations

import re
from pathlib import Path

# family -> (marker found in the Jinja template, Ollama template, end-of-turn stop strings)
_FAMILIES = [
    ("chatml", "<|im_start|>",
     "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
     "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
     "<|im_start|>assistant\n",
     ["<|im_end|>", "<|im_start|>"]),
    ("llama3", "<|start_header_id|>",
     "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
     "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
     "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
     ["<|eot_id|>", "<|start_header_id|>"]),
    ("llama2", "[INST]",
     "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]",
     ["[INST]", "[/INST]"]),
]


def _quote(text: str) -> str:
    # Ollama accepts triple-quoted multi-line values; a literal """ inside cannot be expressed
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def render_modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None = None,
                     system: str | None = None) -> str:
    lines = [f"FROM ./{gguf_name}", ""]
    family = next((f for f in _FAMILIES if chat_template and f[1] in chat_template), None)
    stops: list[str] = []
    if family is not None:
        lines += [f"# TEMPLATE converted from the tokenizer's chat template ({family[0]} family)",
                  f"TEMPLATE {_quote(family[2])}", ""]
        stops += family[3]
    elif chat_template:
        lines += ["# The tokenizer's chat template is not ChatML, Llama-3 or Llama-2 style and could not",
                  "# be converted to Ollama's template syntax: write a TEMPLATE by hand.", ""]
    else:
        lines += ["# The tokenizer has no chat template: Ollama will send raw prompts.", ""]
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        lines += ["", f"SYSTEM {_quote(system)}"]
    return "\n".join(lines) + "\n"


# the system turn in a rendered prompt, per family
_SYSTEM_TURN = {
    "chatml": r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
    "llama3": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    "llama2": r"<<SYS>>\n(.*?)\n<</SYS>>",
}


def implicit_system(tokenizer) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (SmolLM2's and
    Qwen's do). Ollama's template only sends SYSTEM, so the Modelfile must carry it to make
    Ollama prompt the model as transformers and llama.cpp do."""
    template = getattr(tokenizer, "chat_template", None)
    family = next((f for f in _FAMILIES if template and f[1] in template), None)
    if family is None:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that needs more than one user turn: nothing to learn here
        return None
    found = re.search(_SYSTEM_TURN[family[0]], str(text), re.S)  # the only turns: system?, user
    return found.group(1) if found else None


def write_modelfile(directory: Path, gguf_name: str, tokenizer, system: str | None = None) -> Path:
    """`system`: default_system from the config; without it, the template's own default."""
    path = Path(directory) / "Modelfile"
    path.write_text(render_modelfile(gguf_name, getattr(tokenizer, "chat_template", None),
                                     getattr(tokenizer, "eos_token", None),
                                     system if system is not None else implicit_system(tokenizer)))
    return path
