"""LLaMA Pro: `python -m tuneforge.llama_pro` expands a model whose logits (and cached generation)
equal the original's; `use_llama_pro` with freeze trains the expanded blocks and nothing else, with
lora puts the adapters on their linear layers only."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.llama_pro import expand_model, expanded_blocks, main
from tuneforge.workflows import train


def _model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: biases, and a layer_types list
def test_an_expanded_model_computes_what_the_original_does(kind):
    model = _model(kind)
    expanded = copy.deepcopy(model)
    expand_model(expanded, 2)  # after layers 1 and 3: a copy with o_proj / down_proj zero
    assert expanded.config.num_hidden_layers == len(expanded.model.layers) == 6
    if getattr(model.config, "layer_types", None):
        assert len(expanded.config.layer_types) == 6
    new = expanded.model.layers[2]
    assert not new.self_attn.o_proj.weight.any() and not new.mlp.down_proj.weight.any()
    assert torch.equal(new.self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expanded(input_ids=ids).logits)
        # generation with the KV cache: each new block has its own cache slot (layer_idx)
        assert [m.self_attn.layer_idx for m in expanded.model.layers] == list(range(6))
        same = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(model.generate(ids, **same), expanded.generate(ids, **same))


def test_expand_on_disk_then_train_only_the_expanded_blocks(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pro"
    assert main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--num_expand", "1"]) == 0
    assert "use_llama_pro: true" in capsys.readouterr().out
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    pro = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert pro.config.num_hidden_layers == 3
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, pro(input_ids=ids).logits)

    trained = tmp_path / "trained"
    train(load_config(None, {
        "model_name_or_path": str(out), "dataset": "arith", "dataset_dir": str(tiny_data_dir),
        "output_dir": str(trained), "finetuning_type": "freeze", "use_llama_pro": True,
        "freeze_trainable_layers": 1, "cutoff_len": 48, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
        "max_steps": 2, "disable_tqdm": True, "bf16": False}))
    before, after = load_file(str(out / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    assert changed and all(k.startswith("model.layers.2.") for k in changed)  # the expanded block only

    lora = tmp_path / "lora"  # LoRA: adapters on the expanded block's linear layers only
    train(load_config(None, {
        "model_name_or_path": str(out), "dataset": "arith", "dataset_dir": str(tiny_data_dir),
        "output_dir": str(lora), "finetuning_type": "lora", "lora_target": "q_proj,v_proj", "use_llama_pro": True,
        "freeze_trainable_layers": 1, "cutoff_len": 48, "per_device_train_batch_size": 4, "max_steps": 1,
        "disable_tqdm": True, "bf16": False}))
    adapter = load_file(str(lora / "adapter_model.safetensors"))
    assert sorted(adapter) == [f"base_model.model.model.layers.2.self_attn.{m}.lora_{ab}.weight"
                               for m in ("q_proj", "v_proj") for ab in "AB"]


def test_lora_targets_are_the_expanded_blocks_linear_layers():
    from tuneforge.llama_pro import expanded_targets

    model = _model("llama")
    expand_model(model, 2)  # expanded blocks at 2 and 5
    names = expanded_targets(model, "all-linear", 2)
    assert len(names) == 14 and {n.split(".")[2] for n in names} == {"2", "5"}
    assert expanded_targets(model, ["o_proj"], 2) == ["model.layers.2.self_attn.o_proj", "model.layers.5.self_attn.o_proj"]
    with pytest.raises(ConfigError, match=r"^config key 'lora_target' \(\['nothing'\]\) names no linear layer"):
        expanded_targets(model, ["nothing"], 2)


def test_the_trained_layers_must_be_the_expansion_count():
    layers = [torch.nn.Linear(1, 1) for _ in range(6)]
    assert expanded_blocks(layers, 2) == layers[2::3] and expanded_blocks(layers, 3) == layers[1::2]
    with pytest.raises(ConfigError, match=r"^config key 'freeze_trainable_layers' \(4\) must divide the model's 6 "
                                          r"layers with use_llama_pro"):
        expanded_blocks(layers, 4)


def test_expansion_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "x"),
                 "--num_expand", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("tuneforge: error: llama_pro: --num_expand (3) must divide the "
                                               "model's 2 layers")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "full"),
                 "--num_expand", "1"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^config key 'use_llama_pro' trains the expanded blocks .*\(got loha\)"):
        load_config(None, {"use_llama_pro": True, "finetuning_type": "loha"})
