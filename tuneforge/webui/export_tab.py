"""The Export tab: merge adapters into the model and write a Hugging Face folder (dtype, shard
size), a GGUF file (f16 / q8_0 / q4_0) with an Ollama Modelfile, or the adapters unmerged, by
`tuneforge export`'s own code (workflows.export); then list the files written."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .i18n import text
from .labels import Labels
from .options import spec
from .pickers import model_and_adapters
from .use import config_from, failure


def export(fields: dict, lang: str) -> tuple[str, str]:
    """(status, the files written: one 'size  path' line each)."""
    cfg, errors = config_from(fields)
    if errors:
        return "\n".join(errors), ""
    from ..workflows import export as run_export

    try:
        out = Path(run_export(cfg))
    except Exception as exc:  # noqa: BLE001 - TuneforgeError / OSError / MemoryError become one line
        return failure(exc), ""
    files = sorted(p for p in (out.rglob("*") if out.is_dir() else [out]) if p.is_file())
    listing = "\n".join(f"{p.stat().st_size:>14,}  {p}" for p in files)
    return text("msg.exported", lang, path=out), listing


def build(labels: Labels, lang_box) -> None:
    with gr.Row():
        model, adapters = model_and_adapters(labels, "export")
    with gr.Row():
        export_dir = labels.add(gr.Textbox(value="saves/export", elem_id="tf-export-dir", scale=2,
                                           **labels.field("export_dir")), "export_dir")
        fmt = labels.add(gr.Dropdown(choices=list(spec("export_format").choices), value="hf", elem_id="tf-export-format",
                                     **labels.field("export_format")), "export_format")
        dtype = labels.add(gr.Dropdown(choices=list(spec("export_dtype").choices), value="auto",
                                       elem_id="tf-export-dtype", **labels.field("export_dtype")), "export_dtype")
        size = labels.add(gr.Number(value=5, elem_id="tf-export-size", **labels.field("export_size")), "export_size")
        quant = labels.add(gr.Dropdown(choices=list(spec("export_quantization").choices), value="f16",
                                       elem_id="tf-export-quant", **labels.field("export_quantization")),
                           "export_quantization")
    button = labels.add(gr.Button(text("btn.export", labels.lang), variant="primary", elem_id="tf-export-run"),
                        "btn.export", "button")
    status = labels.add(gr.Textbox(interactive=False, elem_id="tf-export-status", **labels.field("status")), "status")
    files = labels.add(gr.Textbox(interactive=False, lines=8, elem_id="tf-export-files", **labels.field("written")),
                       "written")

    def on_export(lang, model_path, adapter_paths, folder, export_format, export_dtype, shard, quantization):
        yield text("msg.exporting", lang), ""
        fields = {"model_name_or_path": model_path, "adapter_name_or_path": adapter_paths, "export_dir": folder,
                  "export_format": export_format, "export_dtype": export_dtype, "export_size": shard}
        if export_format == "gguf":
            fields["export_quantization"] = quantization
        yield export(fields, lang)

    button.click(on_export, [lang_box, model, adapters, export_dir, fmt, dtype, size, quant], [status, files])
