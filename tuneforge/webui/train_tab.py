"""The Train tab's layout: model, stage, method (with only its own options shown, generated from
the registry's key tables), data, hyperparameters, output, the buttons and the live progress.
The buttons call train_actions; a timer polls the run while it trains."""

from __future__ import annotations

import time

import gradio as gr

from . import options, train_actions
from .datasets import dataset_names
from .labels import Labels
from .runner import Runner

# the i18n key of a main field whose label key is not its config key
LABEL_KEYS = {"model_name_or_path": "model", "finetuning_type": "method", "resume_from_checkpoint": "resume"}
HYPER = ("num_train_epochs", "max_steps", "cutoff_len", "per_device_train_batch_size",
         "gradient_accumulation_steps", "learning_rate", "lora_rank", "lora_alpha", "logging_steps",
         "save_steps", "val_size")


def _option_component(name: str, visible: bool, lang: str = "en"):
    """A field for a registry key: its YAML name as the label (the same in every language) and
    its help text from the key table (in Chinese from key_help_zh) as the help line."""
    s = options.spec(name)
    value = options.form_default(name)
    common = {"label": name, "info": options.key_help(name, lang), "visible": visible, "elem_id": f"tf-opt-{name}"}
    if s.kind == "choice":
        choices = [("" if c is None else options.to_form(name, c)) for c in s.choices]
        if s.optional and "" not in choices:
            choices.insert(0, "")
        return gr.Dropdown(choices=choices, value=value, **common)
    if s.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if s.kind == "int":
        return gr.Number(value=value, precision=0, **common)
    if s.kind == "float":
        return gr.Number(value=value, **common)
    return gr.Textbox(value=value, **common)


def build(labels: Labels, runner: Runner, lang_box, roots=None) -> None:
    """Lay the tab out inside the current gr.Blocks / gr.Tab context and wire its events. `roots`
    (paths.allowed_roots; None: no limit) are the folders Save / Load arguments may use."""
    form: dict[str, object] = {}

    def field(key, component):
        form[key] = labels.add(component, label_key(key))
        return component

    with gr.Row():
        field("model_name_or_path", gr.Textbox(value="", placeholder="SmolLM2-135M-Instruct (default)",
                                               elem_id="tf-model", scale=3, **labels.field(label_key("model_name_or_path"))))
        field("stage", gr.Dropdown(choices=options.stages(), value="sft", elem_id="tf-stage", **labels.field("stage")))
        field("finetuning_type", gr.Dropdown(choices=options.methods(), value="lora", elem_id="tf-method",
                                             **labels.field(label_key("finetuning_type"))))
    with gr.Row():
        field("dataset_dir", gr.Textbox(value="", elem_id="tf-dataset-dir", **labels.field("dataset_dir")))
        field("dataset", gr.Dropdown(choices=dataset_names(None), value=[], multiselect=True, allow_custom_value=True,
                                     elem_id="tf-dataset", scale=2, **labels.field("dataset")))
        preview_data = labels.add(gr.Button(labels.field("preview_data")["label"], elem_id="tf-preview-data"),
                                  "preview_data", "button")
    with gr.Row():
        data_count = gr.Markdown(elem_id="tf-data-count")
    data_records = labels.add(gr.Code(language="json", visible=False, elem_id="tf-data-records",
                                      **{k: v for k, v in labels.field("data_preview").items() if k == "label"}),
                              "data_preview")
    hyper_title = labels.add(gr.Markdown(f"### {labels.field('hyper')['label']}"), "hyper", "markdown")
    del hyper_title
    with gr.Row():
        for key in HYPER[:6]:
            field(key, _main_number(labels, key))
    with gr.Row():
        for key in HYPER[6:]:
            field(key, _main_number(labels, key))
        devices = labels.add(gr.Number(value=1, precision=0, minimum=1, elem_id="tf-devices",
                                       **labels.field("devices")), "devices")
    option_fields: dict[str, object] = {}
    stage_option_keys = {k for s in options.stages() for k in options.stage_keys(s)}
    with gr.Accordion(labels.field("method_opts")["label"], open=False) as method_box:
        for key in options.all_option_keys():
            if key not in stage_option_keys:
                option_fields[key] = labels.add(_option_component(key, key in options.method_keys("lora"), labels.lang),
                                                key, "option")
    with gr.Accordion(labels.field("stage_opts")["label"], open=False) as stage_box:
        for key in options.all_option_keys():
            if key in stage_option_keys:
                option_fields[key] = labels.add(_option_component(key, key in options.stage_keys("sft"), labels.lang),
                                                key, "option")
    labels.add(method_box, "method_opts")
    labels.add(stage_box, "stage_opts")
    form.update(option_fields)
    with gr.Row():
        field("output_dir", gr.Textbox(value=time.strftime("saves/train_%Y-%m-%d-%H-%M-%S"),
                                       elem_id="tf-output-dir", **labels.field("output_dir")))
        field("resume_from_checkpoint", gr.Textbox(value="", elem_id="tf-resume", **labels.field(label_key("resume_from_checkpoint"))))
        args_path = labels.add(gr.Textbox(value="saves/webui_args.yaml", elem_id="tf-args-path",
                                          **labels.field("args_path")), "args_path")
    with gr.Row():
        buttons = {}
        for key, variant in (("preview", "secondary"), ("save", "secondary"), ("load", "secondary"),
                             ("start", "primary"), ("stop", "stop")):
            buttons[key] = labels.add(gr.Button(labels.field(f"btn.{key}")["label"], variant=variant,
                                                elem_id=f"tf-{key}"), f"btn.{key}", "button")
    status = labels.add(gr.Textbox(interactive=False, lines=2, elem_id="tf-status", **labels.field("status")), "status")
    with gr.Row():
        command_box = labels.add(gr.Textbox(interactive=False, elem_id="tf-command", **labels.field("command")),
                                 "command")
    yaml_box = labels.add(gr.Code(language="yaml", elem_id="tf-yaml", label=labels.field("yaml")["label"]), "yaml")
    progress_box = labels.add(gr.Textbox(interactive=False, elem_id="tf-progress", **labels.field("progress")),
                              "progress")
    with gr.Row():
        plot = labels.add(gr.LinePlot(None, x="step", y="loss", color="series", elem_id="tf-plot", height=300,
                                      label=labels.field("loss_plot")["label"]), "loss_plot")
        log_box = labels.add(gr.Textbox(interactive=False, lines=12, max_lines=12, autoscroll=True,
                                        elem_id="tf-log", **labels.field("log")), "log")
    timer = gr.Timer(1.0, active=False)
    extra = gr.State({})
    keys = list(form)
    inputs = [form[k] for k in keys]

    def as_form(values) -> dict:
        return dict(zip(keys, values))

    def on_preview(lang, extra_values, device_count, *values):
        return train_actions.preview(as_form(values), extra_values, lang, device_count)

    def on_save(lang, path, extra_values, *values):
        return train_actions.save(as_form(values), extra_values, path, lang, roots)

    def on_load(lang, path):
        values, extra_values, message = train_actions.load(path, keys, lang, roots)
        if values[0] is None and not extra_values and message:
            return [gr.update() for _ in keys] + [extra_values, message]
        return values + [extra_values, message]

    def on_start(lang, extra_values, device_count, *values):
        started, line, message = train_actions.start(runner, as_form(values), extra_values, lang, device_count)
        return line or gr.update(), message, gr.Timer(active=started)

    def on_stop(lang):
        return train_actions.stop(runner, lang)

    def on_tick(lang):
        line, frame, tail, message, running = train_actions.poll(runner, lang)
        # an empty frame would fix the plot's colour domain empty (gradio 6.31 then draws no lines)
        return line, gr.update() if frame.empty else frame, tail, message, gr.Timer(active=running)

    def on_method(method, stage):
        shown = set(options.method_keys(method)) | set(options.stage_keys(stage))
        ranks = [gr.update(visible=method not in options.NO_ADAPTER) for _ in options.RANK_KEYS]
        return [gr.update(visible=key in shown) for key in option_fields] + ranks

    def on_rank(rank):
        return gr.update(value=2 * rank) if rank else gr.update()

    def on_dataset_dir(folder):  # the choices only: the value may change meanwhile
        return gr.update(choices=dataset_names(folder or None))

    buttons["preview"].click(on_preview, [lang_box, extra, devices, *inputs], [command_box, yaml_box, status])
    buttons["save"].click(on_save, [lang_box, args_path, extra, *inputs], [status])
    buttons["load"].click(on_load, [lang_box, args_path], [*inputs, extra, status])
    buttons["start"].click(on_start, [lang_box, extra, devices, *inputs], [command_box, status, timer])
    buttons["stop"].click(on_stop, [lang_box], [status])
    timer.tick(on_tick, [lang_box], [progress_box, plot, log_box, status, timer])
    for trigger in (form["finetuning_type"], form["stage"]):
        trigger.change(on_method, [form["finetuning_type"], form["stage"]],
                       list(option_fields.values()) + [form[k] for k in options.RANK_KEYS])
    form["lora_rank"].input(on_rank, [form["lora_rank"]], [form["lora_alpha"]])
    form["dataset_dir"].change(on_dataset_dir, [form["dataset_dir"]], [form["dataset"]])
    def on_preview_data(lang, folder, names, stage):
        count, records = train_actions.dataset_preview(folder, names, stage, lang)
        return count, gr.update(value=records, visible=bool(records))

    preview_data.click(on_preview_data, [lang_box, form["dataset_dir"], form["dataset"], form["stage"]],
                       [data_count, data_records])


def label_key(key: str) -> str:
    """The i18n key of the main field for config key `key`."""
    return LABEL_KEYS.get(key, key)


def _main_number(labels: Labels, key: str):
    default = options.form_default(key)
    if key == "lora_alpha":
        default = 2 * options.form_default("lora_rank")
    precision = 0 if options.spec(key).kind == "int" else None
    return gr.Number(value=default, precision=precision, elem_id=f"tf-{key}", **labels.field(key))
