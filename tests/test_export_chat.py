"""After training: chat with base + adapter, and export a merged HF folder that transformers
loads on its own and that answers exactly as base + adapter did."""

from __future__ import annotations

import builtins
import os

import pytest
import torch

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.workflows import chat_model, export, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    from tests.conftest import arithmetic_records, write_dataset

    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "data", "arith", arithmetic_records())
    out = root / "adapter"
    train(load_config(None, {
        "model_name_or_path": str(tiny_model_dir), "dataset": "arith", "dataset_dir": str(data),
        "output_dir": str(out), "max_steps": 10, "learning_rate": 1e-2, "cutoff_len": 64,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "bf16": False,
        "disable_tqdm": True}))
    return tiny_model_dir, out


def chat_cfg(model_dir, adapter=None, **extra):
    values = {"model_name_or_path": str(model_dir), "do_sample": False, "max_new_tokens": 12,
              "infer_dtype": "float32", **extra}
    if adapter:
        values["adapter_name_or_path"] = str(adapter)
    return load_config(None, values)


def test_export_answers_like_base_plus_adapter(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = trained
    cfg = chat_cfg(base, adapter, export_dir=str(tmp_path / "merged"), export_dtype="float32")
    out = export(cfg)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in name for name in merged.state_dict())

    chat = chat_model(cfg)
    plain = chat_model(chat_cfg(base))
    messages = [{"role": "user", "content": "What is 12 plus 5?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, chat.model(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain.model(ids).logits, chat.model(ids).logits, atol=1e-3)
        greedy = merged.generate(ids, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
    exported_answer = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
    assert exported_answer == chat.answer(messages)
    assert "".join(chat.stream(messages)) == chat.answer(messages)


def test_export_refuses_a_folder_that_is_not_a_model(trained, tmp_path):
    from tuneforge.errors import ConfigError

    base, adapter = trained
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export(chat_cfg(base, adapter, export_dir=str(tmp_path / "docs")))
    assert (tmp_path / "docs" / "keep.txt").read_text() == "mine"


def test_chat_prompt_answers_once(trained, capsys):
    base, adapter = trained
    code = main(["chat", f"model_name_or_path={base}", "do_sample=false", "--adapter", str(adapter),
                 "--prompt", "What is 3 plus 3?", "max_new_tokens=8", "infer_dtype=float32"])
    assert code == 0
    expected = chat_model(chat_cfg(base, adapter, max_new_tokens=8)).answer(
        [{"role": "user", "content": "What is 3 plus 3?"}])
    assert capsys.readouterr().out.strip() == expected.strip()


def test_interactive_chat_keeps_history_and_clears(trained, capsys, monkeypatch):
    base, adapter = trained
    typed = iter(["What is 1 plus 1?", "And 2 plus 2?", "/clear", "What is 4 plus 4?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    seen = []
    from tuneforge.infer import chat as chat_module

    original = chat_module.ChatModel.stream

    def spy(self, messages, **kwargs):
        seen.append([m["content"] for m in messages])
        yield from original(self, messages, **kwargs)

    monkeypatch.setattr(chat_module.ChatModel, "stream", spy)
    assert main(["chat", f"model_name_or_path={base}", "max_new_tokens=4", "--adapter",
                 str(adapter)]) == 0
    assert seen[0] == ["What is 1 plus 1?"]
    assert len(seen[1]) == 3 and seen[1][2] == "And 2 plus 2?"
    assert seen[2] == ["What is 4 plus 4?"]  # /clear forgot the first two turns
    assert "conversation cleared" in capsys.readouterr().out


def test_cli_export_shards_by_export_size_and_casts_to_export_dtype(trained, tmp_path):
    """`tuneforge export cfg.yaml`: export_size (GB) bounds each safetensors shard, export_dtype
    is the stored dtype, and transformers loads the sharded folder on its own: its weights are
    exactly the float32 export's cast to bfloat16."""
    import json

    import yaml
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base, adapter = trained
    full = export(chat_cfg(base, adapter, export_dir=str(tmp_path / "fp32"), export_dtype="float32"))
    cfg_file = tmp_path / "export.yaml"
    limit_gb = 0.00005  # 50 kB: the tiny model's layers spread over many shards
    cfg_file.write_text(yaml.safe_dump({
        "model_name_or_path": str(base), "adapter_name_or_path": str(adapter),
        "export_dir": str(tmp_path / "bf16"), "export_dtype": "bfloat16", "export_size": limit_gb,
        "export_device": "auto"}))  # a GPU merge where there is one; the same files
    assert main(["export", str(cfg_file)]) == 0
    out = tmp_path / "bf16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's private folder
    assert {(out / s).stat().st_mode & 0o777 for s in shards} == {0o666 & ~umask}
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit_gb * 1e9 or len(tensors) == 1  # only a lone large tensor may exceed it

    loaded = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).state_dict()
    assert loaded.dtype == torch.bfloat16
    state = loaded.state_dict()
    assert state.keys() == reference.keys()
    for name, weight in state.items():
        assert torch.equal(weight, reference[name].to(torch.bfloat16)), name
