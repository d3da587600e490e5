"""LLaMA-Factory's keys for gradient checkpointing, pure bf16, added special tokens and
do_predict inside `tuneforge train`: each takes effect (the tests fail if it were ignored) and a
contradiction with tuneforge's own keys is one ConfigError line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.config_lf_keys import gradient_checkpointing
from tuneforge.errors import ConfigError
from tuneforge.workflows import train


def tiny_cfg(model_dir, data_dir, out, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "max_steps": 1, "val_size": 0,
        "logging_steps": 1, "save_steps": 100, "lora_rank": 4, "disable_tqdm": True,
        "eval_on_start": False, "bf16": False,
    }
    values.update(overrides)
    return load_config(None, values)


# --- gradient checkpointing -------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ({}, None),
    ({"disable_gradient_checkpointing": True}, None),
    ({"disable_gradient_checkpointing": False}, {"use_reentrant": True}),  # LLaMA-Factory's defaults
    ({"gradient_checkpointing": True}, {"use_reentrant": True}),
    ({"gradient_checkpointing": True, "use_reentrant_gc": False}, {"use_reentrant": False}),
    ({"disable_gradient_checkpointing": False, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
     {"use_reentrant": False}),
    ({"gradient_checkpointing": True, "use_reentrant_gc": False,
      "gradient_checkpointing_kwargs": {"use_reentrant": False, "determinism_check": "none"}},
     {"use_reentrant": False, "determinism_check": "none"}),
])
def test_checkpointing_keys_combine(values, expected):
    assert gradient_checkpointing(load_config(None, values)) == expected


@pytest.mark.parametrize("values, message", [
    ({"gradient_checkpointing": True, "disable_gradient_checkpointing": True}, "contradict each other"),
    ({"gradient_checkpointing": False, "disable_gradient_checkpointing": False}, "contradict each other"),
    ({"gradient_checkpointing": True, "use_reentrant_gc": True,
      "gradient_checkpointing_kwargs": {"use_reentrant": False}}, "'use_reentrant_gc: true' and"),
    ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"reentrant": False}},
     "'gradient_checkpointing_kwargs' has 'reentrant'"),
    ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": "no"}},
     "use_reentrant must be true or false"),
    ({"use_reentrant_gc": False}, "config key 'use_reentrant_gc' sets up gradient checkpointing, which is off"),
    ({"disable_gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
     "config key 'gradient_checkpointing_kwargs' sets up gradient checkpointing"),
    ({"gradient_checkpointing_kwargs": "use_reentrant=False"}, "expects a mapping"),
])
def test_checkpointing_contradictions_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, values)
    assert "\n" not in str(info.value)


def test_checkpointing_setting_reaches_torch_and_gradients_are_unchanged(
        tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """One step of plain SGD-like AdamW (adam_epsilon 1: the update is ~ the gradient) with each
    checkpoint variant: torch's checkpoint is called with use_reentrant as configured, and the
    adapter (the gradient) equals the one trained without checkpointing."""
    import transformers.modeling_utils as modeling_utils

    real, seen = modeling_utils.checkpoint, []

    def recording(function, *args, **kwargs):
        seen.append(kwargs.get("use_reentrant"))
        return real(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", recording)
    common = dict(learning_rate=1.0, adam_epsilon=1.0, lora_target="all")
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "plain", **common))
    assert seen == []
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    for name, keys, reentrant in [
            ("lf", {"disable_gradient_checkpointing": False}, True),
            ("kwargs", {"gradient_checkpointing": True,
                        "gradient_checkpointing_kwargs": {"use_reentrant": False}}, False)]:
        seen.clear()
        train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / name, **common, **keys))
        assert seen and set(seen) == {reentrant}, name
        trained = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert trained.keys() == plain.keys()
        for key in plain:
            torch.testing.assert_close(trained[key], plain[key], atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
        assert any(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k)


# --- pure_bf16 ----------------------------------------------------------------------------------

@pytest.fixture
def run_spy(monkeypatch):
    """Records, as each training run starts, the dtypes of the model's parameters (trainable and
    frozen) and the accelerator's mixed precision."""
    from tuneforge.train import loop

    real, seen = loop.TrainingRun.run, {}

    def run(self):
        params = list(self.model.parameters())
        seen.update(trainable={p.dtype for p in params if p.requires_grad},
                    frozen={p.dtype for p in params if not p.requires_grad},
                    precision=self.acc.mixed_precision)
        return real(self)

    monkeypatch.setattr(loop.TrainingRun, "run", run)
    return seen


def test_pure_bf16_trains_bf16_weights_without_autocast(tiny_model_dir, tiny_data_dir, tmp_path, run_spy):
    out = tmp_path / "lora"
    results = train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, pure_bf16=True, bf16=None, val_size=8,
                             max_steps=12, eval_on_start=True))
    assert run_spy == {"trainable": {torch.bfloat16}, "frozen": {torch.bfloat16}, "precision": "no"}
    assert results["eval_loss"] < results["eval_loss_before"]
    assert torch.isfinite(torch.tensor(results["train_loss"]))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    for key, tensor in adapter.items():  # peft's files hold fp32; the values are the bf16 weights
        torch.testing.assert_close(tensor, tensor.to(torch.bfloat16).float(), atol=0, rtol=0, msg=key)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)


def test_pure_bf16_full_finetuning_saves_bf16_weights(tiny_model_dir, tiny_data_dir, tmp_path, run_spy):
    out = tmp_path / "full"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, pure_bf16=True, bf16=None, finetuning_type="full",
                   learning_rate=1e-4))
    assert run_spy["trainable"] == {torch.bfloat16} and run_spy["precision"] == "no"
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_bf16_freeze_finetuning_keeps_fp32_weights(tiny_model_dir, tiny_data_dir, tmp_path, run_spy, monkeypatch):
    """bf16 mixed precision on full / freeze weights: loaded in fp32 (not bf16 and back), so the
    frozen weights are saved bit for bit and the trained ones start from the exact values."""
    from tuneforge import models
    monkeypatch.setattr(models, "bf16_is_fast", lambda device="cpu": True)  # bf16 autocast on any CPU
    out = tmp_path / "freeze"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, bf16=True, finetuning_type="freeze",
                   freeze_trainable_layers=1, learning_rate=1e-4))
    assert run_spy == {"trainable": {torch.float32}, "frozen": {torch.float32}, "precision": "bf16"}
    base, saved = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    frozen = [key for key in base if ".layers.1." not in key]
    assert frozen and all(key in saved for key in frozen)
    for key in frozen:
        torch.testing.assert_close(saved[key], base[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("values, message", [
    ({"pure_bf16": True, "fp16": True}, "config keys 'pure_bf16' and 'fp16' are both true"),
    ({"pure_bf16": True, "bf16": False}, "config key 'pure_bf16' is true but bf16 is false"),
])
def test_pure_bf16_contradictions(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, values)
    load_config(None, {"pure_bf16": True, "bf16": True})  # both ask for bf16: fine


# --- new_special_tokens / resize_vocab ------------------------------------------------------------

def test_new_special_tokens_are_learned_saved_and_loaded_by_peft_chat_and_export(tiny_model_dir, tmp_path):
    """A token added by new_special_tokens is one special id; the adapter trains the resized
    embeddings and head in full, learns to start every answer with it, and is saved with its
    tokenizer: chat (no new_special_tokens in its config) emits the token, peft loads the adapter
    on a base resized as vocab.py says with the same logits, and the export merges it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import write_dataset
    from tuneforge.workflows import chat_model, export

    records = [{"instruction": f"What is {a} plus {a % 7}?", "input": "", "output": f"<ans>{a + a % 7}."}
               for a in range(48)]
    data = write_dataset(tmp_path / "data", "tok", records)
    out = tmp_path / "run"
    train(tiny_cfg(tiny_model_dir, data, out, dataset="tok", new_special_tokens=["<ans>", "<other>"],
                   max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2))
    base_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    saved = AutoTokenizer.from_pretrained(out)
    ans = saved.convert_tokens_to_ids("<ans>")
    assert ans >= base_tokens and saved.added_tokens_decoder[ans].special
    assert saved("<ans>12", add_special_tokens=False)["input_ids"][0] == ans
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens", "lm_head"]

    values = {"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out),
              "infer_dtype": "float32", "export_dir": str(tmp_path / "merged"), "export_dtype": "float32"}
    chat = chat_model(load_config(None, values))
    assert chat.tokenizer.convert_tokens_to_ids("<ans>") == ans
    prompt = chat.tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}],
                                                add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, torch.tensor([[ans]])], dim=1)
    with torch.no_grad():
        first = chat.model.generate(prompt, max_new_tokens=1, do_sample=False)[0, -1].item()
        ours = chat.model(ids).logits
    assert first == ans

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(saved), pad_to_multiple_of=64)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, out).eval()(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    merged_dir = export(load_config(None, values))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name in merged.state_dict())
    assert AutoTokenizer.from_pretrained(merged_dir).convert_tokens_to_ids("<ans>") == ans
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_resize_vocab_with_quantization_is_refused():
    with pytest.raises(ConfigError, match="config key 'new_special_tokens' resizes the embeddings"):
        load_config(None, {"new_special_tokens": "<a>", "quantization_bit": 4})


def test_resized_rows_are_padded_to_64_and_new_tokens_start_at_the_mean(tiny_model_dir):
    """LLaMA-Factory's resize: rows rounded up to a multiple of 64, old rows kept, each new token's
    row the mean of the others plus noise of std 1/sqrt(hidden size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.vocab import resize_embeddings

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    tokenizer.add_tokens(["<x>", "<y>"], special_tokens=True)
    resize_embeddings(model, tokenizer, ["<x>", "<y>"])
    weight = model.get_input_embeddings().weight.detach()
    assert weight.shape[0] % 64 == 0 and len(tokenizer) <= weight.shape[0] < len(tokenizer) + 64
    assert model.config.vocab_size == weight.shape[0]
    torch.testing.assert_close(weight[:old.shape[0]], old, atol=0, rtol=0)
    noise = weight[tokenizer.convert_tokens_to_ids(["<x>", "<y>"])] - old.mean(dim=0)
    assert 0.5 / 8 < noise.std().item() < 2 / 8  # hidden size 64: std 1/8


# --- do_predict in `tuneforge train` ------------------------------------------------------------

@pytest.fixture
def generate_spy(monkeypatch):
    """Records what eval.predict.generate is asked (the model and generate() arguments) and lets
    it generate 3 tokens per answer, so that LLaMA-Factory's 1024 do not make the test slow."""
    from tuneforge.eval import predict

    real, seen = predict.generate, []

    def spy(model, tokenizer, prompts, batch_size, gen_kwargs, progress=True, limits=None):
        seen.append({"model": model, "kwargs": dict(gen_kwargs), "prompts": len(prompts)})
        return real(model, tokenizer, prompts, batch_size, {**gen_kwargs, "max_new_tokens": 3}, progress,
                    [3] * len(limits) if limits else None)

    monkeypatch.setattr(predict, "generate", spy)
    return seen


def test_llama_factory_predict_yaml_runs_in_train(tiny_model_dir, tiny_data_dir, tmp_path, generate_spy):
    """LLaMA-Factory's nlg_eval predict config (do_predict, eval_dataset, no dataset, no do_train)
    through `tuneforge train`: no training, `tuneforge eval`'s predict path with LLaMA-Factory's
    decoding defaults, its two files in output_dir."""
    from tuneforge.cli import main

    out = tmp_path / "predict"
    (tmp_path / "predict.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\nstage: sft\ndo_predict: true\nfinetuning_type: lora\n"
        f"eval_dataset: arith\ndataset_dir: {tiny_data_dir}\ncutoff_len: 64\nmax_samples: 5\n"
        f"overwrite_cache: true\noutput_dir: {out}\noverwrite_output_dir: true\nreport_to: none\n"
        "per_device_eval_batch_size: 2\npredict_with_generate: true\ndisable_tqdm: true\n")
    assert main(["train", str(tmp_path / "predict.yaml")]) == 0
    assert [s["prompts"] for s in generate_spy] == [5]
    kwargs = generate_spy[0]["kwargs"]
    assert {k: kwargs[k] for k in ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens")} == {
        "do_sample": True, "temperature": 0.95, "top_p": 0.7, "top_k": 50, "max_new_tokens": 1024}
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(set(r) == {"prompt", "predict", "label"} for r in rows)
    assert rows[0]["label"] == "0."
    results = json.loads((out / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"} <= set(results)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "train_results.json").exists()


def test_do_train_and_do_predict_predict_with_the_trained_adapter(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                   generate_spy):
    out = tmp_path / "run"
    results = train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, do_predict=True, val_size=4, max_steps=2,
                             do_sample=False))
    assert "train_loss" in results and "predict_rouge-1" in results
    assert [s["prompts"] for s in generate_spy] == [4] and generate_spy[0]["kwargs"]["do_sample"] is False
    assert any("lora_B" in name for name, _ in generate_spy[0]["model"].named_parameters())
    assert len((out / "generated_predictions.jsonl").read_text().splitlines()) == 4
    assert (out / "predict_results.json").is_file() and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("values, message", [
    ({"do_predict": True, "dataset": "arith"}, "config key 'do_predict' needs eval data"),
    ({"do_predict": True, "stage": "pt", "eval_dataset": "arith"}, "generates answers for stage: sft data"),
    ({"do_train": False}, "do_train is false: nothing to do"),
])
def test_do_predict_refusals(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        train(load_config(None, {"output_dir": str(tmp_path / "out"), **values}))
    assert not (tmp_path / "out").exists()


def test_add_tokens_and_add_special_tokens_llama_factorys_newer_names(tiny_model_dir):
    from tuneforge.models import load_model_and_tokenizer

    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "add_tokens": "<plain>",
                             "add_special_tokens": ["<sp1>", "<sp2>"]})
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype="float32")
    ids = tokenizer("<plain><sp1><sp2>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and ids == tokenizer.convert_tokens_to_ids(["<plain>", "<sp1>", "<sp2>"])
    decoder = tokenizer.added_tokens_decoder
    assert decoder[ids[1]].special and decoder[ids[2]].special and not decoder[ids[0]].special
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer) > ids[0]
    with pytest.raises(ConfigError, match="list different tokens"):
        load_config(None, {"new_special_tokens": "<a>", "add_special_tokens": "<b>"})
