"""`tuneforge eval` keeps every row inside the model's context: each batch's max_new_tokens is
capped to what the context leaves after its longest prompt and the adapter's virtual tokens
(prompt / prefix tuning put num_virtual_tokens positions before every prompt), an example that
runs past the context with those virtual tokens, or a prompt with no room for an answer, is one
ConfigError before any work; so is a multiple-choice prompt (a question with its shots) that
does not fit.

The model is a tiny GPT-2 with a 64-token context: its positions are learned embeddings, so a row
past the context fails (an index past the table) instead of degrading quietly."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from tests.conftest import write_dataset
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.eval.predict import answer_limits
from tuneforge.workflows import evaluate

CONTEXT = 64


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, default_model_path):
    """A random 2-layer GPT-2 (context 64) with the default model's tokenizer and template."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _adapter(gpt2_dir, out, config):
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters import add_adapter, save_adapter

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    add_adapter(model, config)
    save_adapter(model, out)
    return out


def _values(model_dir, data_dir, **extra):
    return {"model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
            "val_size": 6, "do_predict": True, "predict_with_generate": True, "do_sample": False,
            "max_new_tokens": 30, "per_device_eval_batch_size": 4, "infer_dtype": "float32",
            "cutoff_len": CONTEXT, "disable_tqdm": True, **extra}


def test_answer_limits_cap_each_batch_and_log_once(caplog):
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        limits = answer_limits([30, 10, 20, 5, 3], 2, 30, CONTEXT, 20, "p")
    assert limits == [CONTEXT - 20 - 30, CONTEXT - 20 - 20, 30]  # each batch's longest prompt
    capped = [r.getMessage() for r in caplog.records if "capped" in r.getMessage()]
    assert capped == ["max_new_tokens=30 capped to 14..24 in 2 of 3 batches: this model's context of 64 "
                      "tokens holds the batch's longest prompt, the 20 virtual tokens of adapter 'p' and the "
                      "answer"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        assert answer_limits([30, 10], 2, 5, CONTEXT, 20) == [5]  # within the room: unchanged, no line
        assert answer_limits([30, 10], 1, None, CONTEXT) == [34, 54]  # no limit asked: the room
        assert answer_limits([300], 1, 30, None, 20) == [30]  # a model that names no context
    assert not caplog.records
    assert answer_limits([CONTEXT - 21], 1, 30, CONTEXT, 20) == [1]  # room for exactly one token


def test_answer_limits_refuse_a_prompt_without_room():
    with pytest.raises(ConfigError) as info:
        answer_limits([10, CONTEXT - 20], 1, 30, CONTEXT, 20, "/adapters/p", cutoff_len=128)
    assert str(info.value) == (
        "eval example 2 of 2: its prompt is 44 tokens (cutoff_len=128) and adapter '/adapters/p' adds 20 "
        "virtual tokens, but this model's context is 64 tokens, which must also hold at least one answer "
        "token; lower cutoff_len to 44")


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_answers_run_to_the_end_of_the_context(kind, gpt2_dir, tiny_data_dir, tmp_path, monkeypatch, caplog):
    """Prompts of ~38 tokens, 20 virtual tokens, 30 new tokens asked: uncapped, the rows would
    run to position 88 of 64 and fail. Capped, the longest row of a batch ends at the last one."""
    from transformers import GPT2LMHeadModel

    from tuneforge.adapters import PrefixTuningConfig, PromptTuningConfig

    config = (PrefixTuningConfig if kind == "prefix" else PromptTuningConfig)(num_virtual_tokens=20)
    adapter = _adapter(gpt2_dir, tmp_path / kind, config)
    lengths = []
    original = GPT2LMHeadModel.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        lengths.append(out.shape[1])  # the batch's padded prompt + its new tokens
        return out

    monkeypatch.setattr(GPT2LMHeadModel, "generate", spy)
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        results = evaluate(load_config(None, _values(gpt2_dir, tiny_data_dir,
                                                     adapter_name_or_path=str(adapter))))
    assert results["predict_samples"] == 6
    assert lengths and max(lengths) == CONTEXT - 20  # ran to the context's last position
    assert re.search(rf"max_new_tokens=30 capped to \d+(\.\.\d+)? in 2 of 2 batches.*the 20 virtual tokens "
                     rf"of adapter '{re.escape(str(adapter))}'", caplog.text)


def test_an_example_past_the_context_with_the_adapter_is_refused(gpt2_dir, tiny_data_dir, tmp_path, capsys):
    """42-token examples fit a 64-token context alone, not after 24 virtual tokens: refused
    before the eval loss would fail on them; the cutoff_len the message names fits."""
    from tuneforge.adapters import PrefixTuningConfig

    adapter = _adapter(gpt2_dir, tmp_path / "prefix", PrefixTuningConfig(num_virtual_tokens=24))
    values = _values(gpt2_dir, tiny_data_dir, adapter_name_or_path=str(adapter))
    assert main(["eval", *[f"{k}={v}" for k, v in values.items()]]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tuneforge: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert re.fullmatch(
        rf"tuneforge: error: (all|\d+ of the) 6 eval examples run past this model's context of 64 tokens: "
        rf"adapter '{re.escape(str(adapter))}' puts num_virtual_tokens=24 virtual tokens before each, and the "
        r"longest example is \d+ tokens \(cutoff_len=64\); lower cutoff_len to 40", lines[0]), lines[0]
    results = evaluate(load_config(None, {**values, "cutoff_len": 40}))
    assert results["predict_samples"] == 6


def test_a_prompt_without_room_is_refused_before_the_work(gpt2_dir, tmp_path):
    """No adapter: a 70-token prompt (cutoff_len 128) leaves no room in a 64-token context."""
    records = [{"instruction": "Count: " + "one " * (40 if i == 3 else 1), "input": "", "output": "Done."}
               for i in range(8)]
    data = write_dataset(tmp_path / "data", "arith", records)
    with pytest.raises(ConfigError) as info:
        evaluate(load_config(None, _values(gpt2_dir, data, val_size=0, eval_dataset="arith", cutoff_len=128)))
    assert re.fullmatch(r"eval example \d of 8: its prompt is (\d+) tokens \(cutoff_len=128\), but this "
                        r"model's context is 64 tokens, which must also hold at least one answer token; "
                        r"lower cutoff_len to 64", str(info.value)), str(info.value)
    assert int(re.search(r"prompt is (\d+)", str(info.value)).group(1)) >= CONTEXT


def test_a_benchmark_prompt_past_the_context_is_refused(gpt2_dir, tmp_path, capsys):
    """Multiple choice: a question's prompt with its shots (and the adapter's virtual tokens)
    must fit the context; without shots these questions do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.adapters import PrefixTuningConfig, add_adapter
    from tuneforge.data.templates import apply_template
    from tuneforge.eval.choice import evaluate_choices

    rows = [{"question": f"{a} + 1 = ?", "A": str(a + 1), "B": str(a), "answer": "A", "subject": "math"}
            for a in range(3)]
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    apply_template(tokenizer, None)
    assert evaluate_choices(model, tokenizer, rows, n_shot=0, progress=False)["choices"]
    with pytest.raises(ConfigError, match=r"^benchmark question 1 of 3 \(subject 'math'\) is a (\d+)-token prompt, "
                                          r"but this model's context is 64 tokens; lower n_shot \(its 2 shots take "
                                          r"part of it\)$"):
        evaluate_choices(model, tokenizer, rows, n_shot=2, progress=False)
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=40))
    with pytest.raises(ConfigError, match=r"^benchmark question 1 of 3 \(subject 'math'\) is a \d+-token prompt "
                                          r"and adapter 'prefix/x' adds 40 virtual tokens, but this model's context "
                                          r"is 64 tokens; leave the question out: alone it does not fit$"):
        evaluate_choices(model, tokenizer, rows, n_shot=0, progress=False, adapter="prefix/x")
