"""The page's translatable components: each registered with its i18n key, so the language switch
can give every label, help line, button and tab its text in the other language."""

from __future__ import annotations

from .i18n import has, text


class Labels:
    """Components in the order they were registered, each with (key, kind): kind "field" sets the
    label and, when the table has `<key>.info`, the help line; "button" a button's text; "tab" a
    tab's label; "markdown" a Markdown's text; "option" a registry key's field, whose label is its
    YAML name in every language and whose help line is options.key_help(key, lang)."""

    def __init__(self, lang: str = "en") -> None:
        self.lang = lang
        self.items: list[tuple[object, str, str]] = []

    def field(self, key: str) -> dict:
        """Keyword arguments label= (and info=) for a component's constructor."""
        kwargs = {"label": text(key, self.lang)}
        if has(f"{key}.info"):
            kwargs["info"] = text(f"{key}.info", self.lang)
        return kwargs

    def add(self, component, key: str, kind: str = "field"):
        self.items.append((component, key, kind))
        return component

    def components(self) -> list:
        return [c for c, _, _ in self.items]

    def updates(self, lang: str) -> list:
        import gradio as gr

        out = []
        for _, key, kind in self.items:
            if kind == "button":
                out.append(gr.update(value=text(key, lang)))
            elif kind == "markdown":
                out.append(gr.update(value=f"### {text(key, lang)}"))
            elif kind == "option":
                from .options import key_help

                out.append(gr.update(info=key_help(key, lang)))
            elif kind == "tab":
                out.append(gr.Tab(label=text(key, lang)))
            else:
                update = {"label": text(key, lang)}
                if has(f"{key}.info"):
                    update["info"] = text(f"{key}.info", lang)
                out.append(gr.update(**update))
        return out
