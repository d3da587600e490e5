"""Fields several tabs share (Chat, Evaluate & Predict, Export)."""

from __future__ import annotations

import gradio as gr

from .labels import Labels
from .use import adapter_dirs


def model_and_adapters(labels: Labels, tab: str) -> tuple[gr.Textbox, gr.Dropdown]:
    """The model path box (empty: the default model) and the adapters picker (the adapters found
    under saves/, or any typed path) of `tab`, elem ids tf-<tab>-model and tf-<tab>-adapter,
    registered with `labels`. Call it inside a gr.Row."""
    model = labels.add(gr.Textbox(value="", placeholder="SmolLM2-135M-Instruct (default)", elem_id=f"tf-{tab}-model",
                                  scale=2, **labels.field("model")), "model")
    adapters = labels.add(gr.Dropdown(choices=adapter_dirs(), value=[], multiselect=True, allow_custom_value=True,
                                      elem_id=f"tf-{tab}-adapter", scale=3, **labels.field("adapter")), "adapter")
    return model, adapters
