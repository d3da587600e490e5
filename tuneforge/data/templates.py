"""Chat templates: the tokenizer's own by default, or a named one (LLaMA-Factory's names).

A named template is a few format strings (one per role) that we turn into an ordinary Jinja chat
template and set on the tokenizer, so training, `apply_chat_template` and chat all render alike.
Format strings use `{content}`, `{bos}` and `{eos}`; bos/eos are the tokenizer's own special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.errors import ConfigError


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

    None keeps the tokenizer's own template (ConfigError if it has none).
    """
    if name in (None, ""):
        if not tokenizer.chat_template:
            raise ConfigError(
                "the tokenizer has no chat template: set template: to one of "
                f"{', '.join(TEMPLATES)}"
            )
        return template_text(tokenizer)
    tokenizer.chat_template = get_template(name).chat_template
    return tokenizer.chat_template


def template_text(tokenizer, tools: list | None = None) -> str:
    """The Jinja text apply_chat_template will use (tokenizers may hold a dict of named templates)."""
    try:
        return tokenizer.get_chat_template(None, tools)
    except ValueError as err:
        raise ConfigError(f"the tokenizer's chat templates are ambiguous ({err}); set template:") from None


def template_label(tokenizer) -> str:
    """How to name the tokenizer's current template in messages: its name if it is one of ours."""
    text = tokenizer.chat_template
    for name, template in TEMPLATES.items():
        if text == template.chat_template:
            return f"template {name!r}"
    return "the tokenizer's own chat template"


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
