"""The Train tab in a real browser: a 2-step run of a tiny model started from the page (progress,
loss plot, finish, the same adapter as the CLI run of its previewed command), Stop and the CLI's
resume, the CLI's one-line error for a bad value or dataset, method options, the Chinese switch;
one integration test trains the default model."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import yaml
from safetensors.torch import load_file

from tuneforge.cli import main
from tuneforge.train.reporting import read_log

from tests.conftest import arithmetic_records, write_dataset
from tests.webui.conftest import fill, screenshot, value_of


def _args_file(tmp_path, model_dir, **extra):
    data = write_dataset(tmp_path / "data", "arith", arithmetic_records(16))
    values = {"model_name_or_path": str(model_dir), "stage": "sft", "finetuning_type": "lora",
              "dataset_dir": str(data), "dataset": "arith", "cutoff_len": 64, "max_steps": 2,
              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 0.01,
              "logging_steps": 1, "save_steps": 1, "lora_rank": 4, "output_dir": str(tmp_path / "out"),
              "eval_on_start": False, **extra}
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _pick(page, elem_id: str, value: str):
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    box.press("Enter")
    box.blur()


def _load(page, path):
    fill(page, "tf-args-path", str(path))
    page.click("#tf-load")
    page.wait_for_function("document.querySelector('#tf-status textarea').value.includes('args.yaml')")


def test_a_two_step_run_from_the_page(page, tmp_path, tiny_model_dir):
    path = _args_file(tmp_path, tiny_model_dir)
    _load(page, path)
    assert value_of(page, "tf-model") == str(tiny_model_dir)
    assert value_of(page, "tf-lora_alpha") == "8"  # alpha = 2 x rank unless set
    assert "eval_on_start" in value_of(page, "tf-status")  # a key the page does not show is kept
    page.click("#tf-preview-data")
    page.wait_for_selector("#tf-data-records", state="visible")
    assert "16 records in arith" in page.locator("#tf-data-count").inner_text()
    assert "What is 0 plus 0?" in page.locator("#tf-data-records").inner_text()
    page.click("#tf-preview")
    page.wait_for_function("document.querySelector('#tf-command textarea').value.startsWith('tuneforge train ')")
    command = value_of(page, "tf-command")
    assert command.endswith("/.webui/out/train.yaml")
    page.click("#tf-start")
    page.wait_for_function("document.querySelector('#tf-progress textarea').value.includes('step 2/2')",
                           timeout=120_000)
    page.wait_for_function("document.querySelector('#tf-status textarea').value.includes('training finished')",
                           timeout=60_000)
    assert re.search(r"loss \d+\.\d{4}", value_of(page, "tf-progress"))
    page.wait_for_selector("#tf-plot canvas, #tf-plot svg")
    page.wait_for_timeout(1500)  # the plot draws its lines after the frame arrives
    screenshot(page, "train_tab")
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    run_yaml = yaml.safe_load((tmp_path / ".webui" / "out" / "train.yaml").read_text())
    assert run_yaml["max_steps"] == 2 and run_yaml["lora_alpha"] == 8 and run_yaml["eval_on_start"] is False
    assert "train" in value_of(page, "tf-log")
    # the CLI run of the previewed command writes the same adapter
    cli_out = tmp_path / "cli"
    assert main(["train", command.split(" ", 2)[2], f"output_dir={cli_out}"]) == 0  # in this process: no start-up
    page_weights, cli_weights = load_file(out / "adapter_model.safetensors"), load_file(cli_out / "adapter_model.safetensors")
    assert page_weights.keys() == cli_weights.keys()
    assert max(float((page_weights[k] - cli_weights[k]).abs().max()) for k in page_weights) <= 1e-6


def _pause_after_first_step(app, out, timeout: float = 120.0):
    """SIGSTOP the page's training process once its log has a step, so that the page's Stop
    reaches a run still going on a fast idle machine (20 tiny steps take under a second). The
    caller sends SIGCONT; a SIGINT sent meanwhile waits for it."""
    deadline = time.time() + timeout
    runner = app.tuneforge_runner
    while runner.current is None or runner.current.output_dir != str(out):  # the click's run, not an older one
        assert time.time() < deadline, "the page's Start did not start a run"
        time.sleep(0.01)
    process = runner.current.process
    while not ((out / "trainer_log.jsonl").is_file() and read_log(out)):
        assert process.poll() is None, "the page's run ended before its first step"
        assert time.time() < deadline
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGSTOP)
    return process


def test_stop_leaves_a_checkpoint_the_cli_resumes(page, webui_app, tmp_path, tiny_model_dir, capsys):
    """Stop sends the CLI's Ctrl-C: the step finishes, a checkpoint is saved; the CLI run of the
    same YAML resumes from it and finishes."""
    out = tmp_path / "out"
    _load(page, _args_file(tmp_path, tiny_model_dir, max_steps=20, save_steps=1000))
    page.click("#tf-start")
    process = _pause_after_first_step(webui_app, out)
    try:
        page.wait_for_function("/step \\d+\\/20/.test(document.querySelector('#tf-progress textarea').value)",
                               timeout=120_000)
        page.click("#tf-stop")
        deadline = time.time() + 60
        while not webui_app.tuneforge_runner.current.stop_requested:  # the click's SIGINT is sent
            assert time.time() < deadline, "the page's Stop did not reach the run"
            time.sleep(0.01)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    page.wait_for_function("document.querySelector('#tf-status textarea').value.includes('stopped')", timeout=60_000)
    stopped_at = read_log(out)[-1]["current_steps"]
    assert stopped_at < 20 and (out / f"checkpoint-{stopped_at}").is_dir()
    run_yaml = tmp_path / ".webui" / "out" / "train.yaml"
    assert "to resume, run the same command again" in (run_yaml.parent / "train.log").read_text()
    capsys.readouterr()
    assert main(["train", str(run_yaml)]) == 0  # the CLI, in this process (no second start-up)
    printed = capsys.readouterr()
    assert f"resumed from {out / f'checkpoint-{stopped_at}'}" in printed.out + printed.err
    assert read_log(out)[-1]["current_steps"] == 20 and (out / "adapter_model.safetensors").is_file()


def test_bad_value_shows_the_cli_one_line_error(page, tmp_path, tiny_model_dir):
    _load(page, _args_file(tmp_path, tiny_model_dir))
    fill(page, "tf-cutoff_len", "0")
    page.click("#tf-start")
    page.wait_for_function("document.querySelector('#tf-status textarea').value.includes('tuneforge: error:')")
    status = value_of(page, "tf-status")
    assert "cutoff_len" in status and "Traceback" not in status
    fill(page, "tf-cutoff_len", "64")
    _pick(page, "tf-dataset", "arith_typo")
    page.click("#tf-start")
    page.wait_for_function("document.querySelector('#tf-status textarea').value.includes('arith_typo')")
    assert value_of(page, "tf-status").startswith("tuneforge: error: dataset 'arith_typo' is not in ")
    assert not (tmp_path / ".webui").exists()  # nothing started


def test_method_options_follow_the_method(page):
    page.get_by_text("Options of this method").click()
    page.wait_for_selector("#tf-opt-use_dora", state="visible")
    assert not page.locator("#tf-opt-vera_rank").is_visible()
    page.locator("#tf-method input").fill("vera")
    page.keyboard.press("Enter")
    page.wait_for_selector("#tf-opt-vera_rank", state="visible")
    assert not page.locator("#tf-opt-use_dora").is_visible()
    assert "VeRA" in page.locator("#tf-opt-vera_rank").inner_text()  # the key table's help line
    page.locator("#tf-method input").fill("full")
    page.keyboard.press("Enter")
    page.wait_for_selector("#tf-lora_rank", state="hidden")
    assert not page.locator("#tf-opt-vera_rank").is_visible()


def test_chinese_switch_changes_the_labels(page):
    assert page.locator("#tf-start").inner_text().strip() == "Start"
    page.locator("#tf-lang input").fill("zh")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#tf-start').innerText.trim() === '开始'")
    assert page.get_by_text("训练阶段").first.is_visible()
    assert page.get_by_text("预览命令").first.is_visible()
    for tab in ("训练", "评估与预测", "对话", "导出", "训练记录"):
        assert page.get_by_role("tab", name=tab, exact=True).is_visible()
    screenshot(page, "train_tab_zh")


@pytest.mark.integration
def test_the_default_model_trains_from_the_page(page, tmp_path, shared_data_dir):
    """The model field left empty: the default model (SmolLM2-135M-Instruct), 2 steps."""
    values = {"stage": "sft", "finetuning_type": "lora", "dataset_dir": str(shared_data_dir),
              "dataset": "alpaca_en_demo", "max_samples": 8, "cutoff_len": 64, "max_steps": 2,
              "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "logging_steps": 1,
              "output_dir": str(tmp_path / "out"), "eval_on_start": False}
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(values))
    _load(page, path)
    assert value_of(page, "tf-model") == ""
    page.click("#tf-start")
    page.wait_for_function("document.querySelector('#tf-progress textarea').value.includes('step 2/2')",
                           timeout=300_000)
    page.wait_for_function("document.querySelector('#tf-status textarea').value.includes('training finished')",
                           timeout=120_000)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
