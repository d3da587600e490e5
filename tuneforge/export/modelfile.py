"""Ollama Modelfile beside an exported GGUF (`FROM ./<file>.gguf`) or HF folder (`FROM .`, which
Ollama imports from the safetensors there, as LLaMA-Factory's export writes it): FROM, a TEMPLATE in Ollama's Go-template syntax that
renders a conversation as the tokenizer's chat template does, stop strings and SYSTEM.

How Ollama renders (its template package and chat handler): the Modelfile's SYSTEM is sent as a
first system message when a request has none; a template that mentions `.Messages` receives
every message, system ones included, and also `.System`, all system texts joined. So a template
must render the system text from one of the two, never both: ours loops over `.Messages` only.

The chat template is recognised by rendering probe conversations with it and with each of
tuneforge's named templates (data/templates.py, which describe a template turn by turn); the
first that renders every probe alike, once the template's own default system prompt is taken
out, is written as a Go template. A chat template none of them matches gets a comment instead,
and Ollama falls back to guessing from the GGUF's chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..data.templates import TEMPLATES, Template
from .gguf_vocab import adds_bos

_SYSTEM, _U1, _A1, _U2 = "Sys prompt.\nLine two.", "First question?", "First answer.", "Second question?"
_PROBES = [
    [("user", _U1)],
    [("system", _SYSTEM), ("user", _U1)],
    [("user", _U1), ("assistant", _A1), ("user", _U2)],
    [("system", _SYSTEM), ("user", _U1), ("assistant", _A1), ("user", _U2)],
]
_MARK = "\x00system-marker\x00"


@dataclass(frozen=True)
class OllamaTemplate:
    name: str                    # the tuneforge template it matched
    template: str                # Go template text
    stops: tuple[str, ...]
    default_system: str | None   # what the chat template says when a conversation has no system


def _render(tokenizer, messages, chat_template: str | None = None) -> str | None:
    conversation = [{"role": role, "content": content} for role, content in messages]
    kwargs = {"chat_template": chat_template} if chat_template is not None else {}
    try:
        return str(tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=True, **kwargs))
    except Exception:  # a template that refuses a probe (no system role, ...) is not this one
        return None


def _default_system(tokenizer, template: Template) -> str | None:
    """The system text the tokenizer's template adds to a conversation that has none, if the
    rest of its rendering is `template`'s; "" when it adds none; None when it is not `template`."""
    plain = replace(template, default_system="")
    own = _render(tokenizer, [("user", _U1)])
    if own is None:
        return None
    if own == _render(tokenizer, [("user", _U1)], plain.chat_template):
        return ""
    marked = _render(tokenizer, [("system", _MARK), ("user", _U1)], plain.chat_template)
    if marked is None or marked.count(_MARK) != 1:
        return None
    before, after = marked.split(_MARK)
    if own.startswith(before) and own.endswith(after) and len(own) > len(before) + len(after):
        return own[len(before):len(own) - len(after)]
    return None


def match_template(tokenizer) -> tuple[Template, str] | None:
    """(the tuneforge template that renders like the tokenizer's chat template, the chat
    template's own default system prompt or ""), or None when none does."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    for template in TEMPLATES.values():
        if template.thought:  # a reply's empty thought depends on its text: not expressible here
            continue
        default = _default_system(tokenizer, template)
        if default is None:
            continue
        candidate = replace(template, default_system=default).chat_template
        if all(_render(tokenizer, p) == _render(tokenizer, p, candidate) for p in _PROBES):
            return template, default
    return None


def _go_text(text: str) -> str:
    """Literal text inside a Go template: as is, unless it holds an action delimiter."""
    if "{{" not in text:
        return text
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _go_format(fmt: str, content: str, bos: str, eos: str) -> str:
    """A tuneforge format string ({content}, {bos}, {eos}) as Go template text; `content` is
    already Go template text."""
    out, rest = [], fmt
    while rest:
        hits = [(rest.find(k), k) for k in ("{content}", "{bos}", "{eos}") if k in rest]
        if not hits:
            out.append(_go_text(rest))
            break
        at, key = min(hits)
        out.append(_go_text(rest[:at]))
        out.append(content if key == "{content}" else _go_text(bos if key == "{bos}" else eos))
        rest = rest[at + len(key):]
    return "".join(out)


def go_template(template: Template, bos: str, eos: str, bos_added: bool) -> str:
    """Ollama template text for a tuneforge template. `bos_added`: llama.cpp puts BOS first itself
    (so a leading {bos} is left out). Every message is rendered once, from `.Messages`."""
    def fmt(f: str, content: str = "{{ .Content }}") -> str:
        return _go_format(f, content, bos, eos)

    prefix = template.prefix
    if bos_added and prefix.startswith("{bos}"):
        prefix = prefix[len("{bos}"):]
    if template.system_in_user:
        # the first system text opens the first user turn, as the chat template does
        system = '{{ if eq $i 0 }}{{ $system = .Content }}{{ else }}' + fmt(template.system) + "{{ end }}"
        joined = fmt(template.user, fmt(template.system, "{{ $system }}") + "{{ .Content }}")
        user = "{{ if and $system (eq $i 1) }}" + joined + "{{ else }}" + fmt(template.user) + "{{ end }}"
        start = '{{ $system := "" }}'
    else:
        system = "{{ if or .Content (ne $i 0) }}" + fmt(template.system) + "{{ end }}"
        user = fmt(template.user)
        start = ""
    return (fmt(prefix) + start + "{{ range $i, $m := .Messages }}"
            + '{{ if eq .Role "system" }}' + system
            + '{{ else if eq .Role "user" }}' + user
            + '{{ else if eq .Role "assistant" }}' + fmt(template.generation + template.assistant)
            + '{{ else if eq .Role "tool" }}' + fmt(template.tool)
            + "{{ end }}{{ end }}" + fmt(template.generation))


def ollama_template(tokenizer) -> OllamaTemplate | None:
    """The tokenizer's chat template as an Ollama template, or None when it cannot be converted."""
    found = match_template(tokenizer)
    if found is None:
        return None
    template, default = found
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    stops = tuple(dict.fromkeys([*template.stop_words, *([eos] if eos else [])]))
    return OllamaTemplate(template.name, go_template(template, bos, eos, adds_bos(tokenizer)),
                          stops, default or None)


def implicit_system(tokenizer) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (SmolLM2's and
    Qwen's do). Ollama only sends SYSTEM, so the Modelfile must carry it to make Ollama prompt
    the model as transformers and llama.cpp do."""
    found = match_template(tokenizer)
    return (found[1] or None) if found else None


def _quote(text: str) -> str:
    # Ollama accepts triple-quoted multi-line values; a literal """ inside cannot be expressed
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def render_modelfile(gguf_name: str | None, converted: OllamaTemplate | None, has_chat_template: bool,
                     eos_token: str | None = None, system: str | None = None) -> str:
    """gguf_name: the GGUF file beside the Modelfile, or None for the HF folder it is in."""
    lines = [f"FROM ./{gguf_name}" if gguf_name else "FROM .", ""]
    stops: list[str] = []
    if converted is not None:
        lines += [f"# TEMPLATE converted from the tokenizer's chat template (renders as tuneforge's "
                  f"{converted.name!r} template)", f"TEMPLATE {_quote(converted.template)}", ""]
        stops += converted.stops
    elif has_chat_template:
        lines += ["# The tokenizer's chat template matches none of tuneforge's templates and could not",
                  "# be converted to Ollama's template syntax: write a TEMPLATE by hand.", ""]
    else:
        lines += ["# The tokenizer has no chat template: Ollama will send raw prompts.", ""]
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        lines += ["", f"SYSTEM {_quote(system)}"]
    return "\n".join(lines) + "\n"


def write_modelfile(directory: Path, gguf_name: str | None, tokenizer, system: str | None = None) -> Path:
    """Write `directory`/Modelfile for the GGUF file `gguf_name` there, or (None) for the HF model
    folder `directory` itself. `system`: default_system from the config; without it, the chat
    template's own default."""
    converted = ollama_template(tokenizer)
    if system is None and converted is not None:
        system = converted.default_system
    path = Path(directory) / "Modelfile"
    path.write_text(render_modelfile(gguf_name, converted, bool(getattr(tokenizer, "chat_template", None)),
                                     getattr(tokenizer, "eos_token", None), system), encoding="utf-8")
    return path
