"""The Chat, Export, Evaluate and Runs tabs in a real browser, on a tiny model with a LoRA adapter
whose weights were moved (so it changes the answers as a trained one would)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, arithmetic_records, save_moved_adapter, write_dataset
from tests.webui.conftest import fill, screenshot, value_of
from tuneforge.adapters import LoraConfig


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    return save_moved_adapter(tiny_model_dir, tmp_path_factory.mktemp("saves") / "lora",
                              LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), seed=1)


def _tab(page, name: str):
    page.get_by_role("tab", name=name).click()


def _pick_custom(page, elem_id: str, value: str):
    """Type a value into a gradio Dropdown that allows custom values, and confirm it."""
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    box.press("Enter")
    box.blur()


def _choose(page, elem_id: str, value: str):
    """Pick one of a gradio Dropdown's listed choices by clicking it, and wait until the field
    shows it (typing and Enter can be lost under load, leaving the previous choice)."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    page.get_by_role("option", name=value, exact=True).click()
    page.wait_for_function(f"document.querySelector('#{elem_id} input').value === {json.dumps(value)}")


def _wait_status(page, elem_id: str, part: str, timeout: int = 90_000):
    """Until the status shows `part` or an error line (then the assertion names it)."""
    value = f"document.querySelector('#{elem_id} textarea').value"
    page.wait_for_function(f"{value}.includes({json.dumps(part)}) || {value}.includes('tuneforge: error:')",
                           timeout=timeout)
    assert part in value_of(page, elem_id)


def test_chat_with_the_adapter_streams_an_answer(page, tiny_model_dir, adapter):
    _tab(page, "Chat")
    page.click("#tf-chat-send")
    _wait_status(page, "tf-chat-status", "load a model first")
    fill(page, "tf-chat-model", str(tiny_model_dir))
    _pick_custom(page, "tf-chat-adapter", str(adapter))
    page.click("#tf-chat-load")
    _wait_status(page, "tf-chat-status", "model loaded")
    assert str(adapter) in value_of(page, "tf-chat-status")
    page.locator("#tf-chat-sample input").uncheck()
    fill(page, "tf-chat-max-new", "16")
    fill(page, "tf-chat-message", "What is 2 plus 2?")
    page.click("#tf-chat-send")
    page.wait_for_function("document.querySelectorAll('#tf-chatbot .message').length >= 2")
    page.wait_for_function("document.querySelector('#tf-chat-message textarea').value === ''")
    assert "What is 2 plus 2?" in page.locator("#tf-chatbot").inner_text()
    screenshot(page, "chat_tab")
    page.click("#tf-chat-clear")
    page.wait_for_function("!document.querySelector('#tf-chatbot').innerText.includes('What is 2 plus 2?')")


def test_export_merges_and_lists_the_files(page, tiny_model_dir, adapter, tmp_path):
    _tab(page, "Export")
    fill(page, "tf-export-model", str(tiny_model_dir))
    _pick_custom(page, "tf-export-adapter", str(adapter))
    fill(page, "tf-export-dir", str(tmp_path / "merged"))
    page.click("#tf-export-run")
    _wait_status(page, "tf-export-status", "exported to")
    files = value_of(page, "tf-export-files")
    assert "model.safetensors" in files and "config.json" in files
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert any("q_proj" in k for k in merged) and not any("lora" in k for k in merged)
    screenshot(page, "export_tab")
    _choose(page, "tf-export-format", "gguf")
    _choose(page, "tf-export-quant", "q8_0")
    fill(page, "tf-export-dir", str(tmp_path / "gguf"))
    page.click("#tf-export-run")
    _wait_status(page, "tf-export-status", str(tmp_path / "gguf"))
    files = value_of(page, "tf-export-files")
    assert ".gguf" in files and "Modelfile" in files
    assert any(p.suffix == ".gguf" for p in (tmp_path / "gguf").iterdir())
    (tmp_path / "file").write_text("x")
    fill(page, "tf-export-dir", str(tmp_path / "file"))
    page.click("#tf-export-run")
    _wait_status(page, "tf-export-status", "tuneforge: error:")
    assert "Traceback" not in value_of(page, "tf-export-status")


def test_eval_scores_and_lists_predictions(page, tiny_model_dir, adapter, tmp_path):
    data = write_dataset(tmp_path / "data", "arith", arithmetic_records(6))
    _tab(page, "Evaluate & Predict")
    fill(page, "tf-eval-model", str(tiny_model_dir))
    _pick_custom(page, "tf-eval-adapter", str(adapter))
    fill(page, "tf-eval-dataset-dir", str(data))
    _pick_custom(page, "tf-eval-dataset", "arith")
    fill(page, "tf-eval-max-new", "4")
    fill(page, "tf-eval-max-samples", "3")
    fill(page, "tf-eval-output-dir", str(tmp_path / "eval"))
    page.click("#tf-eval-run")
    _wait_status(page, "tf-eval-status", "evaluation finished")
    results = json.loads(page.locator("#tf-eval-results .cm-content").inner_text())
    assert {"eval_loss", "predict_rouge-l", "predict_bleu-4"} <= set(results)
    assert (tmp_path / "eval" / "generated_predictions.jsonl").is_file()
    assert "What is 1 plus 1?" in page.locator("#tf-eval-predictions").inner_text()
    screenshot(page, "eval_tab")
    fill(page, "tf-eval-benchmark", str(REPO / "examples" / "mc_demo.json"))
    fill(page, "tf-eval-n-shot", "0")
    fill(page, "tf-eval-output-dir", str(tmp_path / "bench"))
    page.click("#tf-eval-run")
    page.wait_for_function("document.querySelector('#tf-eval-results').innerText.includes('arithmetic') || "
                           "document.querySelector('#tf-eval-status textarea').value.includes('tuneforge: error:')",
                           timeout=90_000)
    _wait_status(page, "tf-eval-status", "evaluation finished")
    assert (tmp_path / "bench" / "benchmark_results.json").is_file()


def test_runs_lists_runs_and_compares_two(page, tmp_path):
    for name, losses in (("a", [2.0, 1.5, 1.2]), ("b", [2.2, 1.9, 1.1])):
        run = tmp_path / name
        run.mkdir()
        (run / "trainer_log.jsonl").write_text("".join(
            json.dumps({"current_steps": i + 1, "total_steps": 3, "loss": v}) + "\n" for i, v in enumerate(losses)))
    _tab(page, "Runs")
    fill(page, "tf-runs-root", str(tmp_path))
    page.click("#tf-runs-refresh")
    _wait_status(page, "tf-runs-status", "2 runs")
    table = page.locator("#tf-runs-table").inner_text()
    assert "3/3" in table and "1.1" in table and "1.2" in table
    _pick_custom(page, "tf-runs-b", str(tmp_path / "a"))
    page.click("#tf-runs-compare")
    page.wait_for_selector("#tf-runs-plot canvas, #tf-runs-plot svg")
    screenshot(page, "runs_tab")
