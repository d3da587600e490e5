"""What the Train tab's buttons do, as plain functions of the form's values (a dict key -> value)
and the language; train_tab.py wires them to the page. Each returns the texts to show."""

from __future__ import annotations

import json

from ..errors import TuneforgeError
from . import command, datasets, options, paths, progress
from .i18n import text
from .runner import Runner, run_files


def form_config(form: dict, extra: dict | None = None) -> dict:
    """The YAML mapping of the form: the fields of the chosen method and stage only (another
    method's options are not shown, so never sent), a dataset list joined with commas, then the
    keys a loaded file had that the page does not show (`extra`)."""
    method, stage = form.get("finetuning_type"), form.get("stage")
    shown = set(options.method_keys(method)) | set(options.stage_keys(stage))
    fields = {}
    for name, value in form.items():
        if name in options.RANK_KEYS and method in options.NO_ADAPTER:
            continue  # full / freeze train no adapter: its rank is not theirs to write
        if name in options.MAIN_KEYS or name in shown:
            if name == "dataset" and isinstance(value, (list, tuple)):
                value = ",".join(value)
            fields[name] = value
    values = command.config_values(fields)
    for key, value in (extra or {}).items():
        values.setdefault(key, value)
    return values


def preview(form: dict, extra: dict | None, lang: str, devices=1) -> tuple[str, str, str]:
    """(command line, YAML, status): the line (with FORCE_TORCHRUN=1 NPROC_PER_NODE=N in front for
    `devices` N > 1) and file Start would run, and the config and dataset checks' one-line errors,
    or that the config is valid (the YAML is then written where the line names it)."""
    values = form_config(form, extra)
    errors = command.check(values) or [command.error_line(m) for m in datasets.check_datasets(
        values.get("dataset_dir"), values.get("dataset") or "", values.get("stage", "sft"))]
    path = run_files(values.get("output_dir") or "saves/run")[0]
    try:
        line = command.command_line(path, devices)
    except TuneforgeError as exc:
        line, errors = command.command_line(path), [*errors, command.error_line(str(exc))]
    if not errors:  # the file the line names, so that the line runs as shown
        try:
            command.save(values, path)
        except OSError as exc:
            errors.append(command.error_line(f"cannot write {path}: {exc}"))
    return line, command.yaml_text(values), "\n".join(errors) or text("msg.config_ok", lang)


def outside(path: str, roots, lang: str) -> str | None:
    """The page's one line when `path` is outside `roots` (paths.allowed_roots); None when it is
    inside, or when `roots` is None (no limit: a call from Python, not from the page)."""
    if roots is None or paths.inside(path, roots):
        return None
    return text("msg.path_outside", lang, path=path, roots=", ".join(str(r) for r in roots))


def save(form: dict, extra: dict | None, path: str, lang: str, roots=None) -> str:
    """Write the form's YAML to `path` (status line). The page passes `roots`: a path outside
    them is refused in one line and nothing is written."""
    if not path:
        return text("msg.need_path", lang)
    if refused := outside(path, roots, lang):
        return refused
    try:
        written = command.save(form_config(form, extra), path)
    except OSError as exc:
        return command.error_line(f"cannot write '{path}': {exc.strerror or exc}")
    return text("msg.saved", lang, path=written)


def load(path: str, keys: list[str], lang: str, roots=None) -> tuple[list, dict, str]:
    """(a form value per key of `keys`, the file's other keys, status). A key the file does not
    set gets its default; stage and finetuning_type their defaults (sft, lora); lora_alpha shows
    2 x lora_rank (the value an unset lora_alpha has; loha / lokr: empty, their alpha is the rank).
    A path outside `roots` (given by the page) is refused in one line and not read."""
    if not path:
        return [None] * len(keys), {}, text("msg.need_path", lang)
    if refused := outside(path, roots, lang):
        return [None] * len(keys), {}, refused
    try:
        values = command.load(path)
    except TuneforgeError as exc:
        return [None] * len(keys), {}, command.error_line(str(exc))
    form = []
    for key in keys:
        if key == "dataset":
            value = values.get(key) or []
            names = value if isinstance(value, list) else str(value).split(",")
            form.append([str(n).strip() for n in names if str(n).strip()])
        elif key == "resume_from_checkpoint":
            value = values.get(key)
            form.append("" if value in (None, False) else str(value))
        elif key in values:
            form.append(options.to_form(key, values[key]))
        elif key == "lora_alpha" and values.get("finetuning_type", "lora") not in ("loha", "lokr"):
            form.append(2 * int(values.get("lora_rank") or options.form_default("lora_rank")))
        else:
            form.append(options.form_default(key))
    extra = {k: v for k, v in values.items() if k not in keys}
    status = text("msg.loaded", lang, path=path)
    if extra:
        status += "\n" + text("msg.not_loaded", lang, path=path, keys=", ".join(extra))
    return form, extra, status


def start(runner: Runner, form: dict, extra: dict | None, lang: str, devices=1) -> tuple[bool, str, str]:
    """(started, command line, status). Nothing starts when the config check, the dataset check
    (registry entries, as the run reads them) or the device count fails: the status is then the
    CLI's lines. `devices` N > 1 runs the same command under torchrun (Runner.start)."""
    values = form_config(form, extra)
    if runner.busy():
        return False, "", text("msg.running", lang)
    errors = command.check(values) or [command.error_line(m) for m in datasets.check_datasets(
        values.get("dataset_dir"), values.get("dataset") or "", values.get("stage", "sft"))]
    try:
        command.device_number(devices)
    except TuneforgeError as exc:
        errors.append(command.error_line(str(exc)))
    if not values.get("output_dir"):
        errors.append(command.error_line("config key 'output_dir' is empty: name the folder the run writes"))
    if errors:
        return False, "", "\n".join(errors)
    try:
        run = runner.start(values, devices)
    except OSError as exc:
        return False, "", command.error_line(f"cannot start the run: {exc}")
    return True, run.command, text("msg.started", lang, command=run.command)


def stop(runner: Runner, lang: str) -> str:
    return text("msg.stopping", lang) if runner.stop() else text("msg.no_run", lang)


def poll(runner: Runner, lang: str) -> tuple[str, object, str, str, bool]:
    """(progress line, loss frame, log tail, status, still running) of the current run."""
    run = runner.current
    if run is None:
        return "", progress.loss_points(None, lang), "", text("msg.no_run", lang), False
    state = run.state
    line = progress.progress_line(run.output_dir, lang) or (text("msg.waiting", lang) if state == "running" else "")
    frame = progress.loss_points(run.output_dir, lang)
    tail = progress.log_tail(run.log_path)
    if state == "running":
        status = text("msg.stopping", lang) if run.stop_requested else text("msg.started", lang, command=run.command)
    elif state == "finished":
        status = text("msg.finished", lang, output_dir=run.output_dir)
    elif state == "stopped":
        status = text("msg.stopped", lang)
    else:
        status = "\n".join(progress.error_lines(run.log_path)) or text("msg.failed", lang, code=run.returncode)
    return line, frame, tail, status, state == "running"


def dataset_preview(dataset_dir: str, names, stage: str, lang: str) -> tuple[str, str]:
    """(count line, first records as JSON) of the first chosen dataset, or its one-line error."""
    names = [n for n in (names or []) if n]
    if not names:
        return text("msg.no_dataset", lang), ""
    try:
        count, records = datasets.preview(dataset_dir, names[0], stage)
    except TuneforgeError as exc:
        return command.error_line(str(exc)), ""
    shown = "?" if count is None else count
    return text("msg.records", lang, count=shown, name=names[0]), json.dumps(records, ensure_ascii=False, indent=2)
