"""LLaMA-Factory's LoRA variant keys in real (tiny) training runs: use_dora, pissa_init with
pissa_convert, loraplus_lr_ratio, create_new_adapter, and resuming a PiSSA run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.workflows import train

TOL = 1e-5


def tiny_cfg(model_dir, data_dir, out, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "max_steps": 4,
        "logging_steps": 2, "save_steps": 100, "lora_rank": 4, "disable_tqdm": True,
        "eval_on_start": False, "bf16": False,
    }
    values.update(overrides)
    return load_config(None, values)


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 520, 33, 4077, 17, 902, 3, 88, 250, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ours(model_dir, adapter):
    from tuneforge.adapters import load_adapter

    return load_adapter(_base(model_dir), adapter)


def _peft(model_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(model_dir), str(adapter)).eval()


def test_yaml_use_dora_trains_a_dora_adapter(tiny_model_dir, tiny_data_dir, tmp_path):
    yaml = tmp_path / "dora.yaml"
    yaml.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: arith\ndataset_dir: {tiny_data_dir}\n"
                    f"output_dir: {tmp_path / 'out'}\nfinetuning_type: lora\nlora_rank: 4\nuse_dora: true\n"
                    "max_steps: 3\nlearning_rate: 5.0e-3\ncutoff_len: 64\nper_device_train_batch_size: 4\n"
                    "gradient_accumulation_steps: 1\nbf16: false\ndisable_tqdm: true\n")
    out = tmp_path / "out"
    train(load_config(yaml))
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    assert any("lora_magnitude_vector" in k for k in load_file(str(out / "adapter_model.safetensors")))
    ours = _logits(_ours(tiny_model_dir, out))
    assert (ours - _logits(_base(tiny_model_dir))).abs().max() > 1e-4
    assert (ours - _logits(_peft(tiny_model_dir, out))).abs().max().item() <= TOL


def test_pissa_convert_writes_llama_factory_layout_and_a_plain_lora(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, pissa_init=True, pissa_iter=-1, pissa_convert=True))
    for sub in ("pissa_init", "pissa_backup", "pissa_converted"):
        assert (out / sub / "adapter_model.safetensors").is_file(), sub
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    backup = json.loads((out / "pissa_backup" / "adapter_config.json").read_text())
    assert backup["r"] == 4 and backup["init_lora_weights"] == "pissa"

    # the trained model, by peft's own route: the raw adapter re-runs PiSSA on the original weights
    trained = _logits(_peft(tiny_model_dir, out / "pissa_backup"))
    assert (trained - _logits(_base(tiny_model_dir))).abs().max() > 1e-3, "training changed nothing"
    for adapter in (out, out / "pissa_converted"):
        assert (_logits(_ours(tiny_model_dir, adapter)) - trained).abs().max().item() <= TOL
        assert (_logits(_peft(tiny_model_dir, adapter)) - trained).abs().max().item() <= TOL
    untrained = _logits(_ours(tiny_model_dir, out / "pissa_init"))
    assert (untrained - _logits(_base(tiny_model_dir))).abs().max().item() <= TOL


def test_randomised_pissa_converted_adapter_equals_its_parts(tiny_model_dir, tiny_data_dir, tmp_path):
    """pissa_iter: 2 -> the output adapter is W + s (B A - B0 A0), built from the files by hand."""
    out = tmp_path / "out"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, pissa_init=True, pissa_iter=2, pissa_convert=True,
                   lora_target="q_proj,v_proj"))
    init, raw, conv = (load_file(str(out / d / "adapter_model.safetensors"))
                       for d in ("pissa_init", "pissa_backup", "."))
    scale = 8 / 4  # lora_alpha defaults to 2 x lora_rank
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"
    by_hand = raw[key.format("B")] @ raw[key.format("A")] - init[key.format("B")] @ init[key.format("A")]
    converted = conv[key.format("B")] @ conv[key.format("A")]
    assert by_hand.abs().max() > 1e-4
    torch.testing.assert_close(converted * scale, by_hand * scale, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pissa_iter", [2, -1])
def test_resuming_a_pissa_run_continues_exactly(tiny_model_dir, tiny_data_dir, tmp_path, pissa_iter,
                                                monkeypatch):
    common = dict(max_steps=6, save_steps=3, pissa_init=True, pissa_iter=pissa_iter, pissa_convert=True)
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "full", **common))
    part = tmp_path / "part"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, part, **common))
    shutil.rmtree(part / "checkpoint-6")  # pretend the run died after step 3

    def no_new_svd(*args, **kwargs):
        raise AssertionError("the resumed run must take the checkpoint's initial state, not a new SVD")

    monkeypatch.setattr(torch, "svd_lowrank", no_new_svd)
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, part, resume_from_checkpoint=str(part / "checkpoint-3"),
                   **common))
    full, resumed = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "full", part))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_resuming_randomised_pissa_without_its_initial_state_is_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    from tuneforge.errors import CheckpointError

    out = tmp_path / "run"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, max_steps=2, save_steps=1, pissa_init=True))
    (out / "checkpoint-1" / "adapter_initial_state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="randomised SVD.*cannot be redone"):
        train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, max_steps=2, save_steps=1, pissa_init=True,
                       resume_from_checkpoint=str(out / "checkpoint-1")))


def test_loraplus_moves_b_ratio_times_further_in_the_first_adam_step(tiny_model_dir, tiny_data_dir, tmp_path):
    # first Adam step: update = lr * g / (|g| + eps), so each element of B (which starts at 0)
    # moves by its learning rate; A gets no gradient while B is 0
    common = dict(max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, lr_scheduler_type="constant")
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "plain", **common))
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "plus", loraplus_lr_ratio=4.0, **common))
    plain, plus = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("plain", "plus"))
    b_keys = [k for k in plain if "lora_B" in k]
    assert b_keys and all(plain[k].abs().max() > 5e-4 for k in b_keys)
    for k in plain:
        expected = 4.0 * plain[k] if k in b_keys else plain[k]
        torch.testing.assert_close(plus[k], expected, rtol=1e-4, atol=1e-9)


@pytest.mark.filterwarnings("ignore:.*tied weights")
def test_loraplus_groups(tiny_model_dir):
    from types import SimpleNamespace

    from tuneforge.adapters import LoraConfig, add_adapter
    from tuneforge.errors import ConfigError
    from tuneforge.train.optim import build_optimizer

    model = _base(tiny_model_dir)
    try:
        add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["norm"]))
    except ConfigError as e:  # embedding LoRA is another helper's work in progress
        pytest.skip(f"embedding LoRA not available: {e}")
    args = SimpleNamespace(learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-8)
    finetune = SimpleNamespace(loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-6)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in build_optimizer(model, args, finetune).param_groups
             for p in g["params"]}
    named = dict(model.named_parameters())
    layer = "model.layers.0.self_attn.q_proj"
    assert lr_of[id(named[f"{layer}.lora_A.default"])] == (1e-3, 0.1)
    assert lr_of[id(named[f"{layer}.lora_B.default"])] == (16e-3, 0.1)
    assert lr_of[id(named["model.embed_tokens.lora_A.default"])] == (1e-3, 0.1)
    assert lr_of[id(named["model.embed_tokens.lora_B.default"])] == (1e-6, 0.1)
    norm = [p for n, p in named.items() if "norm.modules_to_save" in n]
    assert norm and all(lr_of[id(p)] == (16e-3, 0.0) for p in norm)  # 1-D: B's lr, no decay (LLaMA-Factory)
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())
    plain = build_optimizer(model, args, None).param_groups
    assert all(g["lr"] == 1e-3 for g in plain)


def test_adapter_name_or_path_continues_or_starts_a_new_adapter(tiny_model_dir, tiny_data_dir, tmp_path):
    common = dict(val_size=8, eval_on_start=True, max_steps=3)
    first = train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "first", **common))
    adapter = str(tmp_path / "first")
    # the last listed adapter is trained further: it keeps its rank, training starts where it ended
    cont = train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "cont", lora_rank=2,
                          adapter_name_or_path=adapter, **common))
    assert json.loads((tmp_path / "cont" / "adapter_config.json").read_text())["r"] == 4
    assert cont["eval_loss_before"] == pytest.approx(first["eval_loss"], abs=1e-5)
    # create_new_adapter: the listed adapter is merged into the model and a fresh rank-2 one trains
    new = train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "new", lora_rank=2,
                         adapter_name_or_path=adapter, create_new_adapter=True, **common))
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["r"] == 2
    assert new["eval_loss_before"] == pytest.approx(first["eval_loss"], abs=1e-5)
    weights = load_file(str(tmp_path / "new" / "adapter_model.safetensors"))
    assert all(w.shape[-1] == 2 for k, w in weights.items() if "lora_B" in k)
