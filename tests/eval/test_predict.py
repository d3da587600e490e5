"""`tuneforge eval`: batched left-padded generation, result files, limits and errors."""

from __future__ import annotations

import json
import math

import pytest

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.eval.predict import generate, left_pad, split_example
from tuneforge.infer.generation import generation_kwargs
from tuneforge.workflows import evaluate


def eval_values(model_dir, data_dir, out, **extra):
    return {"model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
            "val_size": 6, "output_dir": str(out), "do_predict": True,
            "predict_with_generate": True, "do_sample": False, "max_new_tokens": 6,
            "per_device_eval_batch_size": 4, "infer_dtype": "float32", "cutoff_len": 64,
            "disable_tqdm": True, **extra}


def test_files_have_the_fields_and_counts(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "eval"
    results = evaluate(load_config(None, eval_values(tiny_model_dir, tiny_data_dir, out)))
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(set(r) == {"prompt", "predict", "label"} for r in rows)
    # the prompt ends with the generation prompt; the label is the alpaca output
    assert all(r["prompt"].rstrip().endswith("assistant") for r in rows)
    assert all(r["label"].endswith(".") and r["label"][:-1].isdigit() for r in rows)
    saved = json.loads((out / "predict_results.json").read_text())
    assert saved == results
    for key in ("predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4",
                "eval_loss", "perplexity", "predict_runtime", "predict_samples_per_second"):
        assert key in saved
    assert saved["predict_samples"] == 6
    assert saved["perplexity"] == pytest.approx(math.exp(saved["eval_loss"]), rel=1e-3)


def test_batched_left_padding_equals_one_by_one(tiny_model_dir, tiny_data_dir):
    from tuneforge.data import load_datasets
    from tuneforge.infer import ChatModel

    cfg = load_config(None, eval_values(tiny_model_dir, tiny_data_dir, None, max_new_tokens=8))
    chat = ChatModel(cfg)
    examples = load_datasets(cfg.data, chat.tokenizer).eval
    prompts = [split_example(e).prompt_ids for e in examples]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    kwargs = generation_kwargs(cfg.generate, chat.tokenizer)
    batched = generate(chat.model, chat.tokenizer, prompts, 6, kwargs, progress=False)
    single = generate(chat.model, chat.tokenizer, prompts, 1, kwargs, progress=False)
    assert batched == single


def test_left_pad():
    batch = left_pad([[5, 6, 7], [8]], pad=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_without_do_predict_only_loss(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "eval"
    results = evaluate(load_config(None, eval_values(tiny_model_dir, tiny_data_dir, out,
                                                     do_predict=False)))
    assert "eval_loss" in results and "predict_bleu-4" not in results
    assert not (out / "generated_predictions.jsonl").exists()


def test_cli_max_samples_and_greedy_default(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    values = eval_values(tiny_model_dir, tiny_data_dir, out)
    del values["do_sample"]  # eval is greedy unless asked
    args = [f"{k}={v}" for k, v in values.items()]
    assert main(["eval", *args, "--max_samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert '"predict_rouge-1"' in printed and "eval_loss" in printed
    assert len((out / "generated_predictions.jsonl").read_text().splitlines()) == 2
    first = (out / "generated_predictions.jsonl").read_text()
    assert main(["eval", *args, "--max_samples", "2"]) == 0
    assert (out / "generated_predictions.jsonl").read_text() == first  # greedy: reproducible


def test_config_max_samples_cuts(tiny_model_dir, tiny_data_dir, tmp_path):
    results = evaluate(load_config(None, eval_values(tiny_model_dir, tiny_data_dir, tmp_path,
                                                     max_samples=10, val_size=0.2)))
    assert results["predict_samples"] == 2


@pytest.mark.parametrize("change,needle", [
    ({"val_size": 0}, "needs eval data"),
    ({"do_predikt": True}, "unknown config key 'do_predikt'"),
    ({"val_size": 0, "eval_dataset": "missing"}, "missing"),
])
def test_errors_are_one_line(tiny_model_dir, tiny_data_dir, tmp_path, capsys, change, needle):
    values = {**eval_values(tiny_model_dir, tiny_data_dir, tmp_path / "eval"), **change}
    assert main(["eval", *[f"{k}={v}" for k, v in values.items()]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneforge: error:") and "\n" not in err and needle in err
    assert not (tmp_path / "eval").exists()


def test_eval_without_data_raises(tiny_model_dir):
    with pytest.raises(ConfigError, match="eval_dataset"):
        evaluate(load_config(None, {"model_name_or_path": str(tiny_model_dir)}))


@pytest.mark.integration
def test_real_model_batched_equals_single_and_scores(default_model_path, shared_data_dir, tmp_path):
    from tuneforge.data import load_datasets
    from tuneforge.infer import ChatModel

    values = {"model_name_or_path": str(default_model_path), "dataset": "alpaca_en_demo",
              "dataset_dir": str(shared_data_dir), "max_samples": 40, "val_size": 4,
              "do_predict": True, "do_sample": False, "max_new_tokens": 16,
              "per_device_eval_batch_size": 4, "infer_dtype": "float32", "disable_tqdm": True,
              "output_dir": str(tmp_path)}
    cfg = load_config(None, values)
    results = evaluate(cfg)
    assert 0 <= results["predict_rouge-1"] <= 100 and results["perplexity"] < 100
    rows = [json.loads(line) for line in (tmp_path / "generated_predictions.jsonl").open()]
    chat = ChatModel(cfg)
    examples = load_datasets(cfg.data, chat.tokenizer).eval
    prompts = [split_example(e).prompt_ids for e in examples]
    single = generate(chat.model, chat.tokenizer, prompts, 1,
                      generation_kwargs(cfg.generate, chat.tokenizer), progress=False)
    assert [r["predict"] for r in rows] == single
