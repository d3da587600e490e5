"""`finetuning_type: lora` with `adaptive: moe` from a YAML config: trains through the one loop (loss
falls), the load-balancing loss of every micro-batch reaches the routers (exactly: the step's router
gradient is the mean of the micro-batches' aux gradients), the run saves a LORA_MOE adapter that
loads with equal outputs, and `tuneforge export` refuses to merge it in one line."""

from __future__ import annotations

import json
import logging

import torch
from test_ln_tuning_train import train_from_yaml
from transformers import AutoModelForCausalLM

from tuneforge.adapters import load_adapter, training_hooks
from tuneforge.adapters.core import adapter_layers
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.workflows import chat_model, train

IDS = torch.tensor([[1, 520, 33, 4077, 17, 902, 3, 88]])
MOE = "finetuning_type: lora\nadaptive: moe\nnum_experts: 3\nmoe_top_k: 2\nlora_rank: 4\nlora_target: all\n"


def test_lora_adaptive_moe_trains_from_yaml_saves_loads_and_export_refuses(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                           capsys):
    out = tmp_path / "run"
    config = train_from_yaml(tiny_model_dir, tiny_data_dir, out, MOE + "learning_rate: 2.0e-2\n"
                             "gradient_accumulation_steps: 2\nper_device_train_batch_size: 2\n")
    assert (config["peft_type"], config["num_experts"], config["top_k"], config["r"]) == ("LORA_MOE", 3, 2, 4)

    chat = chat_model(load_config(None, {"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out),
                                         "infer_dtype": "float32"}))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base = plain(IDS).logits
        want = load_adapter(plain, out).eval()(IDS).logits
        got = chat.model(IDS).logits
    assert (want - base).abs().max() > 1e-4, "the trained adapter changes nothing"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    code = main(["export", f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={out}",
                 f"export_dir={tmp_path / 'merged'}"])
    logging.getLogger().handlers.clear()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tuneforge: error:")]
    assert code == 2 and errors == [
        f"tuneforge: error: adapter '{out}' is a MoE LoRA adapter, which cannot be merged into the model: an adaptive "
        "(MoE) LoRA mixes its experts per token by a learned router, so its update depends on the input and no "
        "single weight can hold it; export it as an adapter instead (export_format: adapter)"]


def test_each_micro_batch_adds_the_aux_loss_of_its_own_routing(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """Step 1: every B_e is zero, so the language-model loss gives the routers no gradient and their
    gradient is the aux loss's alone: the mean over the 2 micro-batches of each one's own aux gradient."""
    original, want, seen = training_hooks.forward_loss, {}, {}

    def forward_loss(model):
        term = original(model)
        routers = {p: m.lora_router["default"] for p, m in adapter_layers(model)}
        grads = torch.autograd.grad(term, list(routers.values()), retain_graph=True)
        for p, g in zip(routers, grads):
            want[p] = want.get(p, 0) + g / 2
        return term

    def after_step(model, step, total):
        if step == 1:
            seen.update({p: m.lora_router["default"].grad.clone() for p, m in adapter_layers(model)})

    monkeypatch.setattr(training_hooks, "forward_loss", forward_loss)
    monkeypatch.setattr(training_hooks, "after_step", after_step)
    cfg = tmp_path / "aux.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: arith\ndataset_dir: {tiny_data_dir}\n"
                   f"output_dir: {tmp_path / 'out'}\ncutoff_len: 64\nper_device_train_batch_size: 2\n"
                   "gradient_accumulation_steps: 2\nmax_steps: 1\nmax_grad_norm: 0\nrouter_aux_loss_coef: 0.5\n"
                   f"save_steps: 100\ndisable_tqdm: true\nbf16: false\n{MOE}")
    train(load_config(str(cfg)))
    assert seen.keys() == want.keys() and len(seen) > 0
    assert all(seen[p].abs().sum() > 0 for p in seen)
    for p in seen:
        torch.testing.assert_close(seen[p], want[p], atol=1e-7, rtol=1e-5)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["router_aux_loss_coef"] == 0.5
