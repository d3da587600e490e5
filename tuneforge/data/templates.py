"""Chat templates: the tokenizer's own by default, or a named one (LLaMA-Factory's names).

A named template is a few format strings (one per role) that we turn into an ordinary Jinja chat
template and set on the tokenizer, so training, `apply_chat_template` and chat all render alike.
Format strings use `{content}`, `{bos}` and `{eos}`; bos/eos are the tokenizer's own special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from tuneforge.errors import ConfigError, ModelError
from tuneforge.fileio import quoted


@dataclass(frozen=True)
class Template:
    name: str
    user: str
    assistant: str  # the turn's body after `generation`; it should end the turn (eos or an end-of-turn token)
    generation: str  # the header that opens an assistant turn; also what add_generation_prompt renders
    system: str = "{content}\n"
    tool: str = "{content}\n"
    prefix: str = ""  # rendered once at the very start, e.g. "{bos}"
    default_system: str = ""
    system_in_user: bool = False  # models without a system role: the system text opens the first user turn
    stop_words: tuple[str, ...] = ()  # what ends a reply besides eos, for generation

    @property
    def chat_template(self) -> str:
        return _to_jinja(self)


_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    tool="<|im_start|>tool\n{content}<|im_end|>\n",
    generation="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    stop_words=("<|im_end|>",),
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template("empty", system="{content}", user="{content}", tool="{content}", generation="",
                 assistant="{content}{eos}"),
        Template("default", system="System: {content}\n", user="Human: {content}\n", tool="Tool: {content}\n",
                 generation="Assistant:", assistant=" {content}{eos}\n"),
        Template("alpaca", system="{content}\n\n", user="### Instruction:\n{content}\n\n",
                 tool="### Observation:\n{content}\n\n", generation="### Response:\n", assistant="{content}{eos}\n\n",
                 default_system="Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request."),
        Template("vicuna", system="{content} ", user="USER: {content} ", tool="TOOL: {content} ",
                 generation="ASSISTANT:", assistant=" {content}{eos}",
                 default_system="A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions."),
        # plain text for few-shot benchmarks (LLaMA-Factory's eval examples use it)
        Template("fewshot", system="{content}\n\n", user="{content}", tool="{content}", generation="",
                 assistant="{content}\n\n"),
        Template("chatml", **_CHATML),
        Template("qwen", **_CHATML,
                 default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        Template("llama3", prefix="{bos}",
                 system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                 user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
                 tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
                 generation="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
                 stop_words=("<|eot_id|>", "<|eom_id|>")),
        Template("mistral", prefix="{bos}", system_in_user=True, user="[INST] {content} [/INST]",
                 tool="[TOOL_RESULTS] {content} [/TOOL_RESULTS]", generation="", assistant="{content}{eos}"),
        Template("gemma", prefix="{bos}", system_in_user=True, user="<start_of_turn>user\n{content}<end_of_turn>\n",
                 tool="<start_of_turn>tool\n{content}<end_of_turn>\n", generation="<start_of_turn>model\n",
                 assistant="{content}<end_of_turn>\n", stop_words=("<end_of_turn>",)),
    ]
}


def get_template(name: str) -> Template:
    """The named template; ConfigError listing the known names if there is none by that name."""
    template = TEMPLATES.get(str(name).strip().lower())
    if template is None:
        raise ConfigError(
            f"template: unknown template {name!r}; known templates: {', '.join(TEMPLATES)} "
            "(or leave template unset to use the tokenizer's own chat template)"
        )
    return template


def apply_template(tokenizer, name: str | None) -> str:
    """Make `tokenizer.chat_template` the template training and chat will use, and return its text.

    None keeps the tokenizer's own template (ConfigError if it has none). The template must
    render one user message with the generation prompt: TemplateRefused (a ModelError naming
    the template's file) for a syntax error or a template that raises on it.
    """
    if name in (None, ""):
        if not tokenizer.chat_template:
            raise ConfigError(
                "the tokenizer has no chat template: set template: to one of "
                f"{', '.join(TEMPLATES)}"
            )
        text = template_text(tokenizer)
    else:
        tokenizer.chat_template = text = get_template(name).chat_template
    render_chat(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                what="a single user message")
    return text


def template_text(tokenizer, tools: list | None = None) -> str:
    """The Jinja text apply_chat_template will use (tokenizers may hold a dict of named templates)."""
    try:
        return tokenizer.get_chat_template(None, tools)
    except ValueError as err:
        raise ConfigError(f"the tokenizer's chat templates are ambiguous ({err}); set template:") from None


# what apply_chat_template raises for a template that is broken or refuses the messages
RENDER_ERRORS = (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError)


class TemplateRefused(ModelError):
    """The chat template failed on some messages: a syntax error, or an error it raised itself
    (many raise for roles they do not support). `reason` is the template's own words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def render_chat(tokenizer, messages: list[dict], tools: list | None = None,
                add_generation_prompt: bool = False, what: str = "these messages") -> str:
    """The chat template's text for `messages`: the one place templates are rendered, for
    training (data/encode.py), chat, the API and eval (infer/generation.py).

    Raises TemplateRefused naming the template (and its file) and `what` it could not render."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except RENDER_ERRORS as err:
        reason = _reason(err)
        raise TemplateRefused(f"{template_label(tokenizer)} cannot render {what}: {reason}; fix it or "
                              f"set template: to one of {', '.join(TEMPLATES)}", reason) from None


def _reason(err: Exception) -> str:
    if isinstance(err, jinja2.TemplateSyntaxError):
        return f"{err.message} (a syntax error at line {err.lineno} of the template)"
    return str(err) or type(err).__name__


def template_label(tokenizer) -> str:
    """How to name the tokenizer's current template in messages: its name if it is one of ours,
    else the tokenizer's own, with the file it came from when that is known."""
    text = tokenizer.chat_template
    for name, template in TEMPLATES.items():
        if text == template.chat_template:
            return f"template {name!r}"
    origin = template_file(tokenizer)
    return "the tokenizer's own chat template" + (f" ({quoted(origin)})" if origin else "")


def template_file(tokenizer) -> Path | None:
    """The file the tokenizer's own template was read from: chat_template.jinja, which
    transformers prefers, else tokenizer_config.json; None when not loaded from a folder."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not str(folder) or not folder.is_dir():
        return None
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def _expr(fmt: str, content: str = "message['content']") -> str:
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


def _to_jinja(t: Template) -> str:
    system_first = "loop.index0 == ns.first_user and ns.system"
    user_with_system = _expr(t.user, "ns.system + '\\n\\n' + message['content']")
    lines = [
        f"{{%- set ns = namespace(system={t.default_system!r}, first_user=0) %}}",
        "{%- if messages and messages[0]['role'] == 'system' %}",
        "{%- set ns.system = messages[0]['content'] %}{%- set ns.first_user = 1 %}",
        "{%- endif %}",
        f"{{{{- {_expr(t.prefix)} }}}}" if t.prefix else "",
        "" if t.system_in_user else f"{{%- if ns.system %}}{{{{- {_expr(t.system, 'ns.system')} }}}}{{%- endif %}}",
        "{%- for message in messages %}",
        "{%- if message['role'] == 'system' %}",
        "{%- if not loop.first %}" + f"{{{{- {_expr(t.system)} }}}}" + "{%- endif %}",
        "{%- elif message['role'] == 'user' %}",
        (
            f"{{%- if {system_first} %}}{{{{- {user_with_system} }}}}"
            f"{{%- else %}}{{{{- {_expr(t.user)} }}}}{{%- endif %}}"
            if t.system_in_user
            else f"{{{{- {_expr(t.user)} }}}}"
        ),
        "{%- elif message['role'] == 'assistant' %}",
        f"{{{{- {_expr(t.generation + t.assistant)} }}}}",
        "{%- elif message['role'] == 'tool' %}",
        f"{{{{- {_expr(t.tool)} }}}}",
        "{%- else %}",
        "{{- raise_exception('unknown role: ' + message['role']) }}",
        "{%- endif %}",
        "{%- endfor %}",
        f"{{%- if add_generation_prompt %}}{{{{- {_expr(t.generation)} }}}}{{%- endif %}}" if t.generation else "",
    ]
    return "\n".join(line for line in lines if line) + "\n"
