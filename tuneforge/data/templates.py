"""Chat templates: the tokenizer's own by default, or a named one (LLaMA-Factory's names).

A named template is a few format strings (one per role: data/template_record.py) that we turn
into an ordinary Jinja chat template and set on the tokenizer, so training, `apply_chat_template`
and chat all render alike. The named templates are a table (data/template_table.py).
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

import jinja2

from tuneforge.errors import ConfigError, ModelError
from tuneforge.fileio import quoted

from .template_record import Template
from .template_table import TEMPLATES

__all__ = ["TEMPLATES", "Template", "apply_template", "get_template", "named_template", "render_chat", "renders_tools",
           "template_hint", "template_label", "template_text", "TemplateRefused"]

_EXAMPLES = ("chatml", "llama3", "qwen3_nothink", "alpaca")


def template_hint() -> str:
    """How to name a template in a message, without listing all of them."""
    return (f"one of the {len(TEMPLATES)} named templates (LLaMA-Factory's names, e.g. "
            f"{', '.join(_EXAMPLES)}; the README lists them)")


def get_template(name: str) -> Template:
    """The named template; ConfigError naming the closest known names if there is none by that name."""
    key = str(name).strip().lower()
    template = TEMPLATES.get(key)
    if template is None:
        close = difflib.get_close_matches(key, TEMPLATES, n=5, cutoff=0.6)
        close += [n for n in TEMPLATES if key and (n.startswith(key) or key.startswith(n)) and n not in close]
        near = f"close names: {', '.join(close[:6])}; " if close else ""
        raise ConfigError(
            f"template: unknown template {name!r}; {near}set it to {template_hint()}, "
            "or leave it unset to use the tokenizer's own chat template"
        )
    return template


def apply_template(tokenizer, name: str | None, enable_thinking: bool = True) -> str:
    """Make `tokenizer.chat_template` the template training and chat will use, and return its text.

    None keeps the tokenizer's own template (ConfigError if it has none). `enable_thinking`
    (LLaMA-Factory's key) is the default a reasoning template renders with (Template.thought). The template must
    render one user message with the generation prompt: TemplateRefused (a ModelError naming
    the template's file) for a syntax error or a template that raises on it.
    """
    if name in (None, ""):
        if not tokenizer.chat_template:
            raise ConfigError(f"the tokenizer has no chat template: set template: to {template_hint()}")
        text = template_text(tokenizer)
    else:
        tokenizer.chat_template = text = get_template(name).jinja(enable_thinking)
    render_chat(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                what="a single user message")
    return text


def template_text(tokenizer, tools: list | None = None) -> str:
    """The Jinja text apply_chat_template will use (tokenizers may hold a dict of named templates)."""
    try:
        return tokenizer.get_chat_template(None, tools)
    except ValueError as err:
        raise ConfigError(f"the tokenizer's chat templates are ambiguous ({err}); set template:") from None


def renders_tools(tokenizer) -> bool:
    """Whether the chat template writes the `tools` list itself (else data/encode.py puts the tool
    descriptions in the system message). Named templates never do, even when a format's text
    says "tools" (minimax1's tool turn)."""
    text = template_text(tokenizer, tools=[])
    return "tools" in text and text not in _by_text()


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
                              f"set template: to {template_hint()}", reason) from None


def _reason(err: Exception) -> str:
    if isinstance(err, jinja2.TemplateSyntaxError):
        return f"{err.message} (a syntax error at line {err.lineno} of the template)"
    return str(err) or type(err).__name__


def named_template(tokenizer) -> Template | None:
    """The named template set on the tokenizer (apply_template), or None for the tokenizer's own."""
    return _by_text().get(tokenizer.chat_template)


@lru_cache(maxsize=1)
def _by_text() -> dict[str, Template]:
    return {text: t for t in TEMPLATES.values() for text in (t.jinja(True), t.jinja(False))}


def template_label(tokenizer) -> str:
    """How to name the tokenizer's current template in messages: its name if it is one of ours,
    else the tokenizer's own, with the file it came from when that is known."""
    template = named_template(tokenizer)
    if template is not None:
        return f"template {template.name!r}"
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
