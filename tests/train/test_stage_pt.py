"""stage: pt (continued pretraining): plain text with EOS after each text, concatenated and cut
into cutoff_len blocks, every token labelled; trained by `tuneforge train` through the one loop."""

from __future__ import annotations

import json

import pytest

from tuneforge.config import load_config
from tuneforge.data.loader import load_datasets
from tuneforge.data.text import TEXT
from tuneforge.errors import ConfigError, DataError
from tuneforge.models import load_tokenizer
from tuneforge.train.stages import STAGES, get_stage
from tuneforge.workflows import train

TEXTS = ["The cat sat on the mat.", "A second, slightly longer text about dogs and parks.",
         "Short.", "  ", "Numbers 1 2 3 4 5 6 7 8 9 10 and more words to fill a block or two."]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def data_cfg(data_dir, name, **values):
    return load_config(None, {"stage": "pt", "dataset": name, "dataset_dir": str(data_dir), **values}).data


def text_folder(tmp_path):
    """The same texts as a c4-style .jsonl (columns: {prompt: text}) and as a .txt file."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "c4.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (folder / "wiki.txt").write_text("\n".join(TEXTS) + "\n")
    info = {name: {"file_name": file, "columns": {"prompt": "text"}}
            for name, file in (("c4", "c4.jsonl"), ("wiki", "wiki.txt"))}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def expected_blocks(tokenizer, texts, size):
    """By hand: each non-blank text + EOS, tokenized, concatenated, cut, the rest left out."""
    stream = []
    for text in texts:
        if text.strip():
            stream += tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return [stream[i:i + size] for i in range(0, len(stream) // size * size, size)]


@pytest.mark.parametrize("name", ["c4", "wiki"])
@pytest.mark.parametrize("size", [5, 8, 13])
def test_texts_become_fully_labelled_blocks(tokenizer, tmp_path, name, size, caplog):
    folder = text_folder(tmp_path)
    splits = load_datasets(data_cfg(folder, name, cutoff_len=size), tokenizer, seed=0, kind=TEXT)
    want = expected_blocks(tokenizer, TEXTS, size)
    assert sorted(e["input_ids"] for e in splits.train) == sorted(want)  # shuffled, all kept
    assert all(e["labels"] == e["input_ids"] for e in splits.train)
    assert "1 with no text" in caplog.text  # the blank one, counted in one warning


def test_eos_ends_every_text_and_blocks_cross_texts(tokenizer, tmp_path):
    folder = text_folder(tmp_path)
    splits = load_datasets(data_cfg(folder, "c4", cutoff_len=40), tokenizer, seed=0, kind=TEXT)
    tokens = [t for e in splits.train for t in e["input_ids"]]
    assert tokens.count(tokenizer.eos_token_id) >= 2  # texts meet inside a block


def test_a_bos_adding_tokenizer_starts_every_block_with_bos(tokenizer, tmp_path, monkeypatch):
    folder = text_folder(tmp_path)
    monkeypatch.setattr(type(tokenizer), "add_bos_token", True, raising=False)
    splits = load_datasets(data_cfg(folder, "c4", cutoff_len=6), tokenizer, seed=0, kind=TEXT)
    assert {e["input_ids"][0] for e in splits.train} == {tokenizer.bos_token_id}


def test_val_size_holds_out_blocks(tokenizer, tmp_path):
    folder = text_folder(tmp_path)
    splits = load_datasets(data_cfg(folder, "c4", cutoff_len=5, val_size=2), tokenizer, seed=0, kind=TEXT)
    assert len(splits.eval) == 2 and len(splits.train) == len(expected_blocks(tokenizer, TEXTS, 5)) - 2


def test_shared_demo_text_sets(tokenizer, shared_data_dir):
    for name in ("c4_demo", "wiki_demo"):
        splits = get_stage("pt").encode(data_cfg(shared_data_dir, name, cutoff_len=256, max_samples=20),
                                        tokenizer, 0)
        assert splits.train and all(len(e["input_ids"]) == 256 for e in splits.train)


@pytest.mark.parametrize("records, entry, message", [
    ("", {"columns": {"prompt": "text"}}, "has no records"),
    ('{"text": 5}\n', {"columns": {"prompt": "text"}}, "column 'text' holds a number (5), not text"),
    ('{"body": "x"}\n', {"columns": {"prompt": "text"}}, "lack the prompt column 'text'"),
    ('{"text": ""}\n{"text": null}\n', {"columns": {"prompt": "text"}}, "none of its 2 records holds any text"),
    ('{"text": "a b c"}\n', {"columns": {"prompt": "text"}}, "less than one block of cutoff_len=512"),
    ('{"conversations": []}\n', {"formatting": "sharegpt"}, "stage: pt reads plain text"),
    ('{"conversations": []}\n', {"ranking": True, "formatting": "sharegpt"},
     "preference data (ranking: true): it needs stage: rm or dpo; set stage: dpo (or rm), or "
     "pick a plain-text dataset"),
])
def test_bad_text_data_is_one_line(tokenizer, tmp_path, records, entry, message):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "d.jsonl").write_text(records)
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl", **entry}}))
    with pytest.raises(DataError) as caught:
        load_datasets(data_cfg(folder, "d", cutoff_len=512), tokenizer, seed=0, kind=TEXT)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_stage_key_accepts_registered_stages_only():
    assert {"sft", "pt"} <= set(STAGES)
    assert load_config(None, {"stage": "pt"}).finetune.stage == "pt"
    with pytest.raises(ConfigError, match="config key 'stage' must be one of sft, pt"):
        load_config(None, {"stage": "no_such_stage"})


def test_pt_trains_from_yaml_and_loss_falls(tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "run"
    results = train(load_config(None, {
        "stage": "pt", "model_name_or_path": str(tiny_model_dir), "dataset": "c4_demo",
        "dataset_dir": str(shared_data_dir), "max_samples": 40, "cutoff_len": 64, "val_size": 4,
        "output_dir": str(out), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "learning_rate": 5e-3, "max_steps": 10, "logging_steps": 1, "lora_rank": 4,
        "disable_tqdm": True, "bf16": False, "save_strategy": "no"}))
    assert results["eval_loss"] < results["eval_loss_before"]
    assert results["perplexity"] == pytest.approx(2.718281828 ** results["eval_loss"], rel=1e-6)
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 10


def test_sft_still_refuses_plain_text(tokenizer, shared_data_dir):
    cfg = load_config(None, {"dataset": "c4_demo", "dataset_dir": str(shared_data_dir)})
    with pytest.raises(DataError, match="pretraining datasets need stage: pt"):
        get_stage("sft").encode(cfg.data, tokenizer, 0)
