"""Reasoning templates (Template.thought) as LLaMA-Factory's ReasoningTemplate, the *_nothink
ones as its plain templates, and `template: qwen3_nothink` in a training run."""

from __future__ import annotations

import json

import pytest

import tuneforge
from tuneforge.config import DataArguments
from tuneforge.data import apply_template, encode_conversation, get_template, load_datasets

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "<think>\nNot blue.\n</think>\n\nGreen."},
]
EMPTY = "<think>\n\n</think>\n\n"


def _encode(smol, spans, name, enable_thinking=True):
    apply_template(smol, name, enable_thinking)
    example = encode_conversation(smol, CHAT)
    return smol.decode(example["input_ids"]), [smol.decode(s) for s in spans(example)]


def test_thinking_on_learns_an_empty_thought_before_a_reply_without_one(smol, spans):
    text, learned = _encode(smol, spans, "qwen3")
    assert learned == [EMPTY + "Blue.<|im_end|>", "<think>\nNot blue.\n</think>\n\nGreen.<|im_end|>"]
    assert text.count("<|im_start|>assistant\n" + EMPTY) == 1


def test_thinking_off_removes_thoughts_and_puts_the_empty_one_in_the_prompt(smol, spans):
    text, learned = _encode(smol, spans, "qwen3", enable_thinking=False)
    assert learned == ["Blue.<|im_end|>", "Green.<|im_end|>"]
    assert "Not blue." not in text and text.count("<|im_start|>assistant\n" + EMPTY) == 2
    assert smol.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n" + EMPTY)


def test_glm4_7_writes_an_empty_thought_as_its_closing_word(smol, spans):
    _, learned = _encode(smol, spans, "glm4_7")
    assert learned[0] == "\n</think>Blue.<|im_end|>"  # eos appended: glm4 replies end with no eos of their own


@pytest.mark.parametrize("name", ["qwen3_nothink", "qwen3_vl_nothink", "qwen3_5_nothink", "qwen"])
def test_nothink_templates_render_replies_as_they_are(smol, spans, name):
    """LLaMA-Factory's *_nothink templates are plain templates: no think block is added (Qwen3
    Instruct-2507's own template writes none either); a thought in the data stays as written."""
    text, learned = _encode(smol, spans, name)
    assert learned == ["Blue.<|im_end|>", "<think>\nNot blue.\n</think>\n\nGreen.<|im_end|>"]
    assert EMPTY not in text


def test_enable_thinking_from_the_config_reaches_the_template(smol, tmp_path):
    from tests.conftest import write_dataset

    records = [{"instruction": "Name a color.", "input": "", "output": "Blue."}] * 2
    data = write_dataset(tmp_path / "data", "colors", records)
    learned = {}
    for thinking in (True, False):
        args = DataArguments(dataset="colors", dataset_dir=str(data), template="qwen3", enable_thinking=thinking)
        example = load_datasets(args, smol).train[0]
        learned[thinking] = smol.decode([t for t in example["labels"] if t != -100])
    assert learned == {True: EMPTY + "Blue.<|im_end|>", False: "Blue.<|im_end|>"}


def test_qwen3_nothink_trains(tiny_model_dir, tiny_data_dir, tmp_path):
    keys = {"model_name_or_path": str(tiny_model_dir), "dataset": "arith", "dataset_dir": str(tiny_data_dir),
            "template": "qwen3_nothink", "cutoff_len": 48, "max_steps": 2, "disable_tqdm": True, "bf16": False,
            "output_dir": str(tmp_path / "out")}
    metrics = tuneforge.train(keys)
    assert metrics == json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert (tmp_path / "out" / "adapter_config.json").exists()
    # the tokenizer saved beside the adapter carries the template it was trained with
    saved = (tmp_path / "out" / "chat_template.jinja").read_text()
    assert saved == get_template("qwen3_nothink").chat_template != get_template("qwen3").chat_template
