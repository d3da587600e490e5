"""The page: a language switch and the tabs, and `launch()`, which serves it on 127.0.0.1 unless
told otherwise. Gradio is told not to phone home (no analytics, no version check, no share link,
fonts from the system, not from Google)."""

from __future__ import annotations

import os

from .i18n import LANGS, text
from .labels import Labels
from .paths import EXPOSED_WARNING, allowed_roots, exposed
from .runner import Runner

DEFAULT_PORT = 7860


def offline_gradio() -> None:
    """Environment settings that keep gradio from reaching the network; call before importing it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    no_proxy = os.environ.get("NO_PROXY", "")
    if "127.0.0.1" not in no_proxy:  # gradio checks its own server over HTTP when it starts
        os.environ["NO_PROXY"] = ",".join(p for p in (no_proxy, "127.0.0.1", "localhost") if p)
        os.environ["no_proxy"] = os.environ["NO_PROXY"]


def build_app(lang: str = "en", runner: Runner | None = None, roots=None):
    """The gr.Blocks of the whole page (not yet served). `runner` holds the training subprocess
    (a new one by default); `roots` (paths.allowed_roots) the folders Save / Load arguments may
    use (None: any path the server's user can reach)."""
    offline_gradio()
    import gradio as gr

    from . import chat_tab, eval_tab, export_tab, runs_tab, train_tab

    runner = runner or Runner()
    holder = chat_tab.ChatHolder()
    labels = Labels(lang)
    with gr.Blocks(title="tuneforge", analytics_enabled=False) as app:
        with gr.Row():
            title = labels.add(gr.Markdown(f"### {text('title', lang)}"), "title", "markdown")
            del title
            lang_box = labels.add(gr.Dropdown(choices=list(LANGS), value=lang, elem_id="tf-lang", scale=0,
                                              min_width=120, **labels.field("lang")), "lang")
        with gr.Tabs():
            with gr.Tab(text("tab.train", lang), elem_id="tf-tab-train") as tab:
                labels.add(tab, "tab.train", "tab")
                train_tab.build(labels, runner, lang_box, roots)
            with gr.Tab(text("tab.eval", lang), elem_id="tf-tab-eval") as tab:
                labels.add(tab, "tab.eval", "tab")
                eval_tab.build(labels, lang_box)
            with gr.Tab(text("tab.chat", lang), elem_id="tf-tab-chat") as tab:
                labels.add(tab, "tab.chat", "tab")
                chat_tab.build(labels, holder, lang_box)
            with gr.Tab(text("tab.export", lang), elem_id="tf-tab-export") as tab:
                labels.add(tab, "tab.export", "tab")
                export_tab.build(labels, lang_box)
            with gr.Tab(text("tab.runs", lang), elem_id="tf-tab-runs") as tab:
                labels.add(tab, "tab.runs", "tab")
                runs_tab.build(labels, lang_box)
        lang_box.change(labels.updates, [lang_box], labels.components())
    app.tuneforge_runner = runner
    return app


def theme():
    import gradio as gr

    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(host: str | None = None, port: int | None = None, lang: str = "en", block: bool = True):
    """Serve the page on host:port (default 127.0.0.1:7860: this machine only). block=False
    returns at once (the server runs in a thread; for tests). Returns the gr.Blocks. A host other
    than 127.0.0.1 / localhost logs a warning line first (paths.EXPOSED_WARNING), and the page's
    Save / Load arguments then stay inside the current directory and the output root."""
    import logging

    roots = None
    if exposed(host):
        roots = allowed_roots()
        logging.getLogger("tuneforge").warning(EXPOSED_WARNING.format(host=host, roots=" and ".join(map(str, roots))))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's check of its own server, every start
    app = build_app(lang, roots=roots)
    app.queue()
    try:
        app.launch(server_name=host or "127.0.0.1", server_port=port or DEFAULT_PORT, share=False,
                   inbrowser=False, prevent_thread_lock=not block, ssr_mode=False, theme=theme(),
                   show_error=False, quiet=not block)
    finally:
        if block:
            app.tuneforge_runner.shutdown()
    return app
