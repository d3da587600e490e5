"""tokenized_path: saved with save_to_disk, read back instead of the data, refused when made with
other settings; overwrite_cache tokenizes again; do_train: false tokenizes, saves and stops."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from tuneforge.data import load_datasets
from tuneforge.data.tokenized import STAMP
from tuneforge.errors import ConfigError

RECORDS = [{"instruction": f"Name {i}", "input": "", "output": f"Item {i}"} for i in range(8)]


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "d.json").write_text(json.dumps(RECORDS))
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    return folder


def _args(make_args, data_dir, saved, **extra):
    return make_args(dataset="d", dataset_dir=str(data_dir), tokenized_path=str(saved), val_size=2, **extra)


def test_saved_then_read_instead_of_the_data(smol, make_args, data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tuneforge")
    saved = tmp_path / "tok"
    first = load_datasets(_args(make_args, data_dir, saved), smol)
    assert (saved / STAMP).is_file() and (saved / "dataset_dict.json").is_file()
    (data_dir / "d.json").write_text("not read any more")
    again = load_datasets(_args(make_args, data_dir, saved), smol)
    assert (again.train, again.eval) == (first.train, first.eval) and len(again.eval) == 2
    assert "loaded the tokenized data from" in caplog.text


@pytest.mark.parametrize("change,named", [
    ({"cutoff_len": 16}, "cutoff_len: 2048 then, 16 now"),
    ({"template": "llama3"}, "another chat template"),
    ({"train_on_prompt": True}, "train_on_prompt: false then, true now"),
])
def test_other_settings_are_refused_in_one_line(smol, make_args, data_dir, tmp_path, change, named):
    saved = tmp_path / "tok"
    load_datasets(_args(make_args, data_dir, saved), smol)
    with pytest.raises(ConfigError) as caught:
        load_datasets(_args(make_args, data_dir, saved, **change), smol)
    message = str(caught.value)
    assert message.startswith(f"tokenized_path '{saved}' was tokenized with other settings (") and named in message
    assert "overwrite_cache: true" in message and "\n" not in message


def test_another_tokenizer_is_refused(smol, make_args, data_dir, tmp_path):
    saved = tmp_path / "tok"
    load_datasets(_args(make_args, data_dir, saved), smol)
    other = copy.deepcopy(smol)  # the shared tokenizer stays as it is
    other.add_special_tokens({"additional_special_tokens": ["<extra_token>"]})
    with pytest.raises(ConfigError, match="another tokenizer"):
        load_datasets(_args(make_args, data_dir, saved), other)


def test_overwrite_cache_tokenizes_again(smol, make_args, data_dir, tmp_path):
    saved = tmp_path / "tok"
    load_datasets(_args(make_args, data_dir, saved), smol)
    (data_dir / "d.json").write_text(json.dumps(RECORDS[:5]))
    redone = load_datasets(_args(make_args, data_dir, saved, overwrite_cache=True), smol)
    assert len(redone.train) + len(redone.eval) == 5
    reread = load_datasets(_args(make_args, data_dir, saved), smol)
    assert reread.train == redone.train


def test_do_train_false_tokenizes_saves_and_stops(tiny_model_dir, data_dir, tmp_path):
    from tuneforge.config import load_config
    from tuneforge.workflows import train

    out, saved = tmp_path / "out", tmp_path / "tok"
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "d", "dataset_dir": str(data_dir),
                             "output_dir": str(out), "tokenized_path": str(saved), "do_train": False,
                             "cutoff_len": 64})
    assert train(cfg) == {"train_examples": 8, "eval_examples": 0}
    assert (saved / STAMP).is_file() and not out.exists()
    stamp = json.loads((saved / STAMP).read_text())
    assert stamp["records"] == "conversations (tuneforge.data.loader._tokenize)" and stamp["cutoff_len"] == 64


def test_rm_pairs_are_not_read_as_dpo_pairs(smol, make_args, tmp_path, shared_data):
    from tuneforge.data.pairwise import PAIRWISE, PAIRWISE_REPLIES

    args = make_args(dataset="dpo_en_demo", dataset_dir=str(shared_data), tokenized_path=str(tmp_path / "tok"),
                     max_samples=4, cutoff_len=64)
    saved = load_datasets(args, smol, kind=PAIRWISE).train
    assert load_datasets(args, smol, kind=PAIRWISE).train == saved
    with pytest.raises(ConfigError, match=r"\(records: .*encode_pairs.* then, .*encode_pairs\(prompt_len=True\)"):
        load_datasets(args, smol, kind=PAIRWISE_REPLIES)
