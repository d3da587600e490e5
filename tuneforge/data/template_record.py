"""The Template record: a chat format as data (one format string per role), and its Jinja text.

Format strings use `{content}`, `{bos}` and `{eos}`; bos/eos are the tokenizer's own special tokens.
A template is turned into an ordinary Jinja chat template set on the tokenizer, so training,
`apply_chat_template` and chat all render alike. The table of named templates is in
data/template_table.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    user: str
    assistant: str  # the turn's body after `generation`; it should end the turn (eos or an end-of-turn token)
    generation: str  # the header that opens an assistant turn; also what add_generation_prompt renders
    system: str = "{content}\n"
    tool: str = "{content}\n"  # a tool result (LLaMA-Factory's observation), without the assistant header
    prefix: str = ""  # rendered once at the very start, e.g. "{bos}"
    default_system: str = ""
    system_in_user: bool = False  # no system turn: the system format's text opens the first user turn
    stop_words: tuple[str, ...] = ()  # what ends a reply besides eos, for generation
    # Reasoning models (LLaMA-Factory's ReasoningTemplate): the words around a thought, e.g.
    # ("<think>\n", "\n</think>\n\n"). A reply without a thought gets an empty one before it. With
    # thinking on (enable_thinking, default true) the empty thought is part of the reply (learned);
    # off, thoughts are removed from replies and the empty one closes the generation prompt.
    thought: tuple[str, str] | tuple[()] = ()
    empty_thought: str | None = None  # what an empty thought renders as: default open + close words
    tool_format: str = "default"  # LLaMA-Factory's tool_format: how tool lists and calls are written
    # a function-call turn's body (LLaMA-Factory's format_function), when it differs from `assistant`;
    # {content} is the call as the tool format writes it (data/tool_formats.py)
    function: str | None = None
    # the tool list written literally into the system text ({content}: the tools' JSON), instead of
    # the tool format's prompt (LLaMA-Factory's format_tools as a plain string, e.g. phi4_mini)
    tools: str | None = None
    note: str = ""  # e.g. a multimodal model's template: its text formats only

    @property
    def chat_template(self) -> str:
        return to_jinja(self)

    def jinja(self, enable_thinking: bool = True) -> str:
        """The Jinja text, with `enable_thinking`'s default baked in (a caller may still pass it)."""
        return to_jinja(self, enable_thinking)

    @property
    def empty(self) -> str:
        return self.empty_thought if self.empty_thought is not None else "".join(self.thought)


def expr(fmt: str, content: str = "message['content']") -> str:
    """A format string as a Jinja expression: literals quoted, placeholders as variables."""
    parts = []
    rest = fmt
    names = {"{content}": content, "{bos}": "(bos_token or '')", "{eos}": "(eos_token or '')"}
    while rest:
        hits = [(rest.find(k), k) for k in names if k in rest]
        if not hits:
            parts.append(repr(rest))
            break
        at, key = min(hits)
        if at:
            parts.append(repr(rest[:at]))
        parts.append(names[key])
        rest = rest[at + len(key):]
    return " + ".join(parts) or "''"


def _thought_lines(t: Template) -> list[str]:
    """Jinja that sets `content` for an assistant message of a reasoning template."""
    if not t.thought:
        return ["{%- set content = message['content'] %}"]
    start, end = t.thought
    return [
        "{%- set content = message['content'] %}",
        # thinking off: the thought (start ... end) is removed, as is the newline after it
        f"{{%- if not thinking and {start!r} in content and {end!r} in content.split({start!r}, 1)[1] %}}",
        f"{{%- set content = content.split({start!r}, 1)[0] + content.split({start!r}, 1)[1].split({end!r}, 1)[1] %}}",
        "{%- endif %}",
        "{%- if not thinking %}{%- set content = content.lstrip('\\n') %}{%- endif %}",
        f"{{%- if {start.strip()!r} not in content and {end.strip()!r} not in content %}}",
        f"{{%- set content = {t.empty!r} + content %}}",
        "{%- endif %}",
    ]


def _function_lines(t: Template) -> list[str]:
    """Jinja for a function-call turn (data/tool_formats.py prepares `function_call`, the call as
    the tool format writes it, and `thought`, any thought before it in the data). A reasoning
    template keeps the thought with thinking on and writes its empty thought otherwise, as for
    replies; the thought goes before the function format's own words."""
    if t.thought:
        thought = f"(message['thought'] if thinking and message['thought'] else {t.empty!r})"
    else:
        thought = "message['thought']"
    body = expr(t.function if t.function is not None else t.assistant, "message['function_call']")
    return [f"{{{{- {expr(t.generation)} + {thought} + {body} }}}}"]


def to_jinja(t: Template, enable_thinking: bool = True) -> str:
    system_first = "loop.index0 == ns.first_user and ns.system"
    user_with_system = expr(t.user, f"({expr(t.system, 'ns.system')}) + message['content']")
    generation = expr(t.generation)
    if t.thought:
        generation = f"{generation} + ('' if thinking else {t.empty!r})"
    lines = [
        f"{{%- set ns = namespace(system={t.default_system!r}, first_user=0) %}}",
        f"{{%- set thinking = enable_thinking if enable_thinking is defined else {str(enable_thinking).lower()} %}}"
        if t.thought else "",
        "{%- if messages and messages[0]['role'] == 'system' %}",
        "{%- set ns.system = messages[0]['content'] %}{%- set ns.first_user = 1 %}",
        "{%- endif %}",
        f"{{{{- {expr(t.prefix)} }}}}" if t.prefix else "",
        "" if t.system_in_user else f"{{%- if ns.system %}}{{{{- {expr(t.system, 'ns.system')} }}}}{{%- endif %}}",
        "{%- for message in messages %}",
        "{%- if message['role'] == 'system' %}",
        "{%- if not loop.first %}" + f"{{{{- {expr(t.system)} }}}}" + "{%- endif %}",
        "{%- elif message['role'] == 'user' %}",
        (
            f"{{%- if {system_first} %}}{{{{- {user_with_system} }}}}"
            f"{{%- else %}}{{{{- {expr(t.user)} }}}}{{%- endif %}}"
            if t.system_in_user
            else f"{{{{- {expr(t.user)} }}}}"
        ),
        "{%- elif message['role'] == 'assistant' and message['function_call'] is defined %}",
        *_function_lines(t),
        "{%- elif message['role'] == 'assistant' %}",
        *_thought_lines(t),
        f"{{{{- {expr(t.generation + t.assistant, 'content')} }}}}",
        "{%- elif message['role'] == 'tool' %}",
        f"{{{{- {expr(t.tool)} }}}}",
        "{%- else %}",
        "{{- raise_exception('unknown role: ' + message['role']) }}",
        "{%- endif %}",
        "{%- endfor %}",
        f"{{%- if add_generation_prompt %}}{{{{- {generation} }}}}{{%- endif %}}"
        if t.generation or t.thought else "",
    ]
    return "\n".join(line for line in lines if line) + "\n"
