"""The Chat tab: load a model with adapters (tuneforge's chat loader, infer.ChatModel, the same as
`tuneforge chat`), then talk to it with streaming answers, a system prompt and sampling settings."""

from __future__ import annotations

import gradio as gr

from .i18n import text
from .labels import Labels
from .pickers import model_and_adapters
from .use import config_from, failure


class ChatHolder:
    """The one loaded chat model of the page (loading another replaces it)."""

    def __init__(self) -> None:
        self.model = None
        self.name = ""

    def load(self, model: str, adapters, lang: str) -> str:
        cfg, errors = config_from({"model_name_or_path": model, "adapter_name_or_path": adapters})
        if errors:
            return "\n".join(errors)
        from ..workflows import chat_model

        self.model = None
        try:
            self.model = chat_model(cfg)
        except Exception as exc:  # noqa: BLE001 - TuneforgeError / OSError / MemoryError become one line
            return failure(exc)
        self.name = model or "SmolLM2-135M-Instruct"
        if adapters:
            self.name += " + " + ", ".join(adapters if isinstance(adapters, list) else [adapters])
        return text("msg.model_loaded", lang, model=self.name)

    def stream(self, history: list[dict], system: str, sampling: dict):
        """Yield the growing answer to the conversation `history` (messages role/content)."""
        messages = [{"role": m["role"], "content": _plain(m["content"])} for m in history]
        answer = ""
        for piece in self.model.stream(messages, system=system or None, **sampling):
            answer += piece
            yield answer


def _plain(content) -> str:
    """A chatbot message's text (gradio 6 may hand a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def build(labels: Labels, holder: ChatHolder, lang_box) -> None:
    with gr.Row():
        model, adapters = model_and_adapters(labels, "chat")
    with gr.Row():
        load = labels.add(gr.Button(text("btn.load_model", labels.lang), elem_id="tf-chat-load"), "btn.load_model",
                          "button")
        unload = labels.add(gr.Button(text("btn.unload_model", labels.lang), elem_id="tf-chat-unload"),
                            "btn.unload_model", "button")
    status = labels.add(gr.Textbox(interactive=False, elem_id="tf-chat-status", **labels.field("status")), "status")
    with gr.Row():
        system = labels.add(gr.Textbox(value="", elem_id="tf-chat-system", scale=3, **labels.field("system")), "system")
        do_sample = labels.add(gr.Checkbox(value=True, elem_id="tf-chat-sample", **labels.field("do_sample")),
                               "do_sample")
        temperature = labels.add(gr.Slider(0.01, 1.5, value=0.95, step=0.01, **labels.field("temperature")),
                                 "temperature")
        top_p = labels.add(gr.Slider(0.01, 1.0, value=0.7, step=0.01, **labels.field("top_p")), "top_p")
        max_new = labels.add(gr.Slider(8, 4096, value=512, step=8, elem_id="tf-chat-max-new",
                                       **labels.field("max_new_tokens")), "max_new_tokens")
    chatbot = labels.add(gr.Chatbot(elem_id="tf-chatbot", height=360, **{"label": text("chatbot", labels.lang)}),
                         "chatbot")
    with gr.Row():
        message = labels.add(gr.Textbox(elem_id="tf-chat-message", scale=4, **labels.field("message")), "message")
        send = labels.add(gr.Button(text("btn.send", labels.lang), variant="primary", elem_id="tf-chat-send"),
                          "btn.send", "button")
        clear = labels.add(gr.Button(text("btn.clear", labels.lang), elem_id="tf-chat-clear"), "btn.clear", "button")

    def on_load(lang, model_path, adapter_paths):
        yield text("msg.loading", lang)
        yield holder.load(model_path, adapter_paths, lang)

    def on_unload(lang):
        holder.model = None
        return text("msg.model_unloaded", lang)

    def on_send(lang, history, user_text, system_text, sample, temp, top, max_tokens):
        history = list(history or [])
        if holder.model is None:
            yield history, user_text, text("msg.no_model", lang)
            return
        if not user_text.strip():
            yield history, "", gr.update()
            return
        history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": ""}]
        sampling = {"do_sample": bool(sample), "max_new_tokens": int(max_tokens)}
        if sample:
            sampling.update(temperature=float(temp), top_p=float(top))
        try:
            for answer in holder.stream(history[:-1], system_text, sampling):
                history[-1] = {"role": "assistant", "content": answer}
                yield history, "", gr.update()
        except Exception as exc:  # noqa: BLE001 - e.g. the conversation outgrew the context: one line
            yield history[:-2], user_text, failure(exc)

    load.click(on_load, [lang_box, model, adapters], [status])
    unload.click(on_unload, [lang_box], [status])
    send_inputs = [lang_box, chatbot, message, system, do_sample, temperature, top_p, max_new]
    send.click(on_send, send_inputs, [chatbot, message, status])
    message.submit(on_send, send_inputs, [chatbot, message, status])
    clear.click(lambda: [], None, [chatbot])
