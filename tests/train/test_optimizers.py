"""LLaMA-Factory's optimizer keys (use_galore, use_apollo, use_adam_mini, use_muon, use_badam): the
optimizer that steps is the package's own, its state is what that optimizer keeps, a tiny full
fine-tuning run lowers the loss, and a run resumed from a checkpoint ends with the very weights of
the uninterrupted run (the optimizer's state, projectors and BAdam's block position restored)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train.optim import build_optimizer
from tuneforge.workflows import train

# key -> (settings, the package's optimizer class as module:name, a state entry it keeps)
CASES = {
    "galore": ({"use_galore": True, "galore_rank": 4, "galore_update_interval": 3},
               "galore_torch:GaLoreAdamW", "projector"),
    "galore_layerwise": ({"use_galore": True, "galore_layerwise": True, "galore_rank": 4, "galore_update_interval": 3,
                          "gradient_accumulation_steps": 1},
                         "galore_torch:GaLoreAdamW", "projector"),
    "apollo": ({"use_apollo": True, "apollo_rank": 4, "apollo_update_interval": 3},
               "apollo_torch:APOLLOAdamW", "projector"),
    "adam_mini": ({"use_adam_mini": True}, "adam_mini:Adam_mini", "m"),
    "muon": ({"use_muon": True}, "torch.optim:Muon", "momentum_buffer"),
    "badam": ({"use_badam": True, "badam_switch_interval": 4, "badam_switch_mode": "ascending"},
              "badam:BlockOptimizer", "exp_avg"),
}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _finetune(**keys):
    cfg = load_config(None, {"finetuning_type": "full", **keys})
    return cfg.train, cfg.finetune


def _is_a(opt, where: str) -> bool:
    """`opt`, or one of the optimizers it is made of (Muon's two parts), is an instance of the
    class `where` (module:name)."""
    import importlib

    module, _, name = where.partition(":")
    cls = getattr(importlib.import_module(module), name)
    return any(isinstance(o, cls) for o in (opt, *getattr(opt, "parts", ())))


def _step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("name", list(CASES))
def test_the_packages_optimizer_steps_learns_and_resumes(name, tmp_path):
    """Its class (layer-wise: one per weight) and state; the loss of a fixed batch drops over six steps; its state, saved
    as a checkpoint saves it and checked as a resume checks it, restored into a fresh optimizer,
    continues exactly as the optimizer that was not stopped."""
    import copy

    from tuneforge.train.integrity import _check_optimizer
    from tuneforge.train.optim import restore_state

    keys, cls, state_key = CASES[name]
    model = _tiny_llama()
    args, finetune = _finetune(learning_rate=1e-2, **keys)
    opt = build_optimizer(model, args, finetune)
    assert _is_a(opt, cls)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [_step(model, opt, ids)]
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any("layers.0.self_attn.q_proj" in n for n in moved)
    losses.append(_step(model, opt, ids))
    state = opt.state_dict()
    assert state["state"] and any(state_key in entry for entry in state["state"].values())
    torch.save(state, tmp_path / "optimizer.pt")
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)  # plain tensors, numbers, text
    weights = [tuple(p.shape) for p in model.parameters() if p.requires_grad or getattr(p, "trains_in_turns", 0)]
    assert _check_optimizer(tmp_path / "optimizer.pt", saved, weights) is None
    again = copy.deepcopy(model).requires_grad_(True)  # as a resumed run's model, before BAdam picks a block
    resumed = build_optimizer(again, args, finetune)
    restore_state(resumed, saved, tmp_path / "optimizer.pt")
    for _ in range(4):
        losses.append(_step(model, opt, ids))
        _step(again, resumed, ids)
    assert losses[-1] < losses[0]
    for (n, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), n
    if name in ("galore", "apollo", "galore_layerwise"):  # the low-rank group carries the keys' settings
        assert opt.param_groups[-1]["rank"] == 4 and opt.param_groups[-1]["update_proj_gap"] == 3
    if name == "galore_layerwise":  # one optimizer per weight, stepped in the backward pass
        assert len(opt.parts) == sum(1 for p in model.parameters() if p.requires_grad)
    if name == "muon":  # Muon for the hidden 2-D weights, AdamW for embeddings, head and norms
        muon, adamw = opt.parts
        assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
        assert model.model.embed_tokens.weight in adamw.param_groups[0]["params"]


def _config(model_dir, data_dir, out, **extra):
    return load_config(None, {"model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
                              "output_dir": str(out), "cutoff_len": 48, "per_device_train_batch_size": 4,
                              "finetuning_type": "full", "learning_rate": 3e-3, "max_steps": 4, "save_steps": 2,
                              "logging_steps": 1, "disable_tqdm": True, "bf16": False, **extra})


# BAdam: blocks whose requires_grad goes off and on; layer-wise GaLore: steps inside the backward
@pytest.mark.parametrize("name", ["badam", "galore_layerwise"])
def test_a_run_learns_and_resumes_to_the_same_weights(name, tiny_model_dir, tiny_data_dir, tmp_path):
    keys = CASES[name][0]
    out = tmp_path / "out"
    train(_config(tiny_model_dir, tiny_data_dir, out, **keys))
    losses = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]
    full = load_file(str(out / "model.safetensors"))
    saved = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["state"]
    shutil.rmtree(out / "checkpoint-4")
    train(_config(tiny_model_dir, tiny_data_dir, out, resume_from_checkpoint=str(out / "checkpoint-2"), **keys))
    resumed = load_file(str(out / "model.safetensors"))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


@pytest.mark.parametrize("keys, message", [
    ({"use_galore": True, "use_badam": True}, r"^config keys 'use_galore' and 'use_badam' each choose the optimizer"),
    ({"use_galore": True, "finetuning_type": "lora"}, r"^config key 'use_galore' \(GaLore\) trains the model's own "
                                                      r"weights: set finetuning_type: full or freeze"),
    ({"use_adam_mini": True, "finetuning_type": "lora"}, r"^config key 'use_adam_mini' \(Adam-mini\) trains the model's "
                                                         r"own weights"),
    ({"use_badam": True, "finetuning_type": "freeze"}, r"^config key 'use_badam' \(BAdam\) .*full"),
    ({"use_galore": True, "galore_layerwise": True, "gradient_accumulation_steps": 2},
     r"^config key 'galore_layerwise' updates each weight inside the backward pass, which cannot accumulate"),
    ({"use_apollo": True, "apollo_layerwise": True, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0},
     r"^config key 'max_grad_norm' cannot clip with apollo_layerwise"),
    ({"galore_rank": 8}, r"^config key 'galore_rank' is read with use_galore: true"),
    ({"use_apollo": True, "optim": "sgd"}, r"^config key 'optim' \(sgd\) cannot be the base of use_apollo"),
    ({"use_badam": True, "badam_update_ratio": 0.1}, r"^config key 'badam_update_ratio' is read in badam_mode: "
                                                     r"ratio, which tuneforge does not run; drop it$"),
    ({"use_badam": True, "badam_mode": "ratio"}, r"^config key 'badam_mode': ratio updates through sparse gradients"),
    ({"use_badam": True, "badam_switch_interval": 0}, r"^config key 'badam_switch_interval' must be -1"),
])
def test_combinations_that_cannot_run_are_one_line(keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"finetuning_type": "full", **keys})


def test_a_missing_package_names_its_pip_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "galore_torch" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the galore-torch package: pip install galore-torch \(or pip "
                                          r"install 'tuneforge\[galore\]'\)$"):
        load_config(None, {"finetuning_type": "full", "use_galore": True})


def test_galore_targets_only_the_named_layers():
    model = _tiny_llama()
    args, finetune = _finetune(use_galore=True, galore_target="q_proj,v_proj")
    opt = build_optimizer(model, args, finetune)
    low = {id(p) for p in opt.param_groups[-1]["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in low]
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names) and len(names) == 4
    with pytest.raises(ConfigError, match=r"^config key 'galore_target' \(nothing\) names no trainable linear"):
        build_optimizer(model, *_finetune(use_galore=True, galore_target="nothing"))


def test_badam_start_block_past_the_last_block_is_one_line():
    with pytest.raises(ConfigError, match=r"^config key 'badam_start_block' must be below this model's 2 blocks; got 2$"):
        build_optimizer(_tiny_llama(), *_finetune(use_badam=True, badam_start_block=2))


def test_other_optimizer_state_is_refused_on_resume(tmp_path):
    from tuneforge.errors import CheckpointError
    from tuneforge.train.optim import restore_state

    model = _tiny_llama()
    adam = build_optimizer(model, SimpleNamespace(**vars(_finetune()[0])), _finetune()[1])
    badam = build_optimizer(model, *_finetune(use_badam=True))
    with pytest.raises(CheckpointError, match=r"it is not a BAdam \(layer mode\) optimizer state"):
        restore_state(badam, adam.state_dict(), tmp_path / "optimizer.pt")
