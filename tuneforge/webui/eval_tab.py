"""The Evaluate & Predict tab: `tuneforge eval` on a model with adapters and eval datasets (eval
loss and perplexity; with predictions: ROUGE-1/2/L and BLEU-4), by the CLI's own code
(workflows.evaluate, greedy as the CLI decodes unless asked), and a table of the predictions; or,
with benchmark files, `tuneforge eval --benchmark` (multiple-choice accuracy per subject)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from .datasets import dataset_names
from .i18n import text
from .labels import Labels
from .pickers import model_and_adapters
from .use import config_from, failure

PREDICTIONS = "generated_predictions.jsonl"


def evaluate(fields: dict, limit, lang: str) -> tuple[str, str, list[list[str]]]:
    """(status, results as JSON, prediction rows [prompt, predict, label], at most 100)."""
    cfg, errors = config_from({"stage": "sft", "do_sample": False, **fields})
    if errors:
        return "\n".join(errors), "", []
    from ..workflows import evaluate as run_eval

    try:
        results = run_eval(cfg, limit=int(limit) if limit else None, progress=False)
    except Exception as exc:  # noqa: BLE001 - TuneforgeError / OSError / MemoryError become one line
        return failure(exc), "", []
    rows = []
    path = Path(cfg.train.output_dir or "") / PREDICTIONS
    if cfg.train.output_dir and cfg.train.do_predict and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines()[:100]:
            record = json.loads(line)
            rows.append([record.get("prompt", ""), record.get("predict", ""), record.get("label", "")])
    return text("msg.eval_done", lang), json.dumps(results, indent=2, ensure_ascii=False), rows


def benchmark(fields: dict, files: str, n_shot, limit, lang: str) -> tuple[str, str, list[list[str]]]:
    """`tuneforge eval --benchmark FILES`: (status, accuracy per subject as JSON, no rows)."""
    cfg, errors = config_from({"do_sample": False, **fields})
    if errors:
        return "\n".join(errors), "", []
    from ..workflows import evaluate_benchmark

    paths = [p.strip() for p in files.split(",") if p.strip()]
    try:
        results = evaluate_benchmark(cfg, paths, int(n_shot) if n_shot is not None else None, None,
                                     int(limit) if limit else None, progress=False)
    except Exception as exc:  # noqa: BLE001 - TuneforgeError / OSError / MemoryError become one line
        return failure(exc), "", []
    return text("msg.eval_done", lang), json.dumps(results, indent=2, ensure_ascii=False), []


def build(labels: Labels, lang_box) -> None:
    with gr.Row():
        model, adapters = model_and_adapters(labels, "eval")
    with gr.Row():
        dataset_dir = labels.add(gr.Textbox(value="", elem_id="tf-eval-dataset-dir", **labels.field("dataset_dir")),
                                 "dataset_dir")
        datasets = labels.add(gr.Dropdown(choices=dataset_names(None), value=[], multiselect=True, allow_custom_value=True,
                                          elem_id="tf-eval-dataset", scale=2, **labels.field("eval_dataset")),
                              "eval_dataset")
    with gr.Row():
        max_samples = labels.add(gr.Number(value=None, precision=0, elem_id="tf-eval-max-samples",
                                           **labels.field("max_samples")), "max_samples")
        cutoff = labels.add(gr.Number(value=1024, precision=0, elem_id="tf-eval-cutoff", **labels.field("cutoff_len")),
                            "cutoff_len")
        max_new = labels.add(gr.Number(value=128, precision=0, elem_id="tf-eval-max-new",
                                       **labels.field("max_new_tokens")), "max_new_tokens")
        predict = labels.add(gr.Checkbox(value=True, elem_id="tf-eval-predict", **labels.field("do_predict")),
                             "do_predict")
        out_dir = labels.add(gr.Textbox(value="saves/eval", elem_id="tf-eval-output-dir",
                                        **labels.field("eval_output_dir")), "eval_output_dir")
    with gr.Row():
        bench = labels.add(gr.Textbox(value="", elem_id="tf-eval-benchmark", scale=3, **labels.field("benchmark")),
                           "benchmark")
        n_shot = labels.add(gr.Number(value=5, precision=0, elem_id="tf-eval-n-shot", **labels.field("n_shot")),
                            "n_shot")
    button = labels.add(gr.Button(text("btn.eval", labels.lang), variant="primary", elem_id="tf-eval-run"),
                        "btn.eval", "button")
    status = labels.add(gr.Textbox(interactive=False, elem_id="tf-eval-status", **labels.field("status")), "status")
    results = labels.add(gr.Code(language="json", elem_id="tf-eval-results", label=text("results", labels.lang)),
                         "results")
    table = labels.add(gr.Dataframe(headers=["prompt", "predict", "label"], elem_id="tf-eval-predictions", wrap=True,
                                    label=text("predictions", labels.lang)), "predictions")

    def on_eval(lang, model_path, adapter_paths, folder, names, limit, cutoff_len, max_new_tokens, do_predict, output,
                files, shots):
        yield text("msg.evaluating", lang), "", []
        fields = {"model_name_or_path": model_path, "adapter_name_or_path": adapter_paths, "output_dir": output}
        if files and files.strip():
            yield benchmark(fields, files, shots, limit, lang)
            return
        fields.update({"dataset_dir": folder, "eval_dataset": names, "cutoff_len": cutoff_len,
                       "max_new_tokens": max_new_tokens, "do_predict": bool(do_predict)})
        yield evaluate(fields, limit, lang)

    def on_dataset_dir(folder):  # the choices only: the value may change meanwhile
        return gr.update(choices=dataset_names(folder or None))

    button.click(on_eval, [lang_box, model, adapters, dataset_dir, datasets, max_samples, cutoff, max_new, predict,
                           out_dir, bench, n_shot], [status, results, table])
    dataset_dir.change(on_dataset_dir, [dataset_dir], [datasets])
