"""`finetuning_type: adalora` from a YAML config through the one training loop: the loss falls,
the allocator prunes to the budget by the last step (total_step taken from max_steps), and the
saved adapter (kept ranks + rank_pattern) loads in peft with the same outputs as in tuneforge."""

from __future__ import annotations

import json
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tuneforge.adapters import AdaLoraConfig, list_adapters, load_adapter
from tuneforge.config import load_config
from tuneforge.workflows import train


def test_adalora_trains_from_yaml_and_peft_loads_it(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "adalora.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: arith\ndataset_dir: {tiny_data_dir}\n"
        f"output_dir: {out}\nfinetuning_type: adalora\nlora_target: q_proj,v_proj\ninit_r: 4\ntarget_r: 2\n"
        "tinit: 2\ntfinal: 2\ncutoff_len: 64\nper_device_train_batch_size: 4\nlearning_rate: 2.0e-2\n"
        "max_steps: 12\nlogging_steps: 2\nsave_steps: 100\ndisable_tqdm: true\nbf16: false\n"
    )
    train(load_config(str(cfg)))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 12
    pattern = config["rank_pattern"]
    assert pattern and sum(map(sum, pattern.values())) == 2 * len(pattern)  # target_r x adapted matrices

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    assert isinstance(list_adapters(ours)["default"], AdaLoraConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on rank_pattern keys it resizes by itself
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        got, expected, plain = ours(ids).logits, theirs(ids).logits, base(ids).logits
    assert (got - plain).abs().max() > 1e-4, "the trained adapter changes nothing"
    assert (got - expected).abs().max().item() <= 1e-5


def test_a_resumed_adalora_run_ends_as_the_uninterrupted_one(tiny_model_dir, tiny_data_dir, tmp_path):
    """The allocator's importance scores (EMA of |w grad|, its uncertainty) and the kept-rank masks
    are in every checkpoint (adapter_training_state.safetensors): a run that died after step 4 and
    resumed there prunes the same ranks and ends with the same adapter as the run that did not."""
    import shutil

    from safetensors.torch import load_file

    def run(out, **extra):
        values = {"model_name_or_path": str(tiny_model_dir), "dataset": "arith", "dataset_dir": str(tiny_data_dir),
                  "output_dir": str(out), "finetuning_type": "adalora", "lora_target": "q_proj,v_proj",
                  "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "cutoff_len": 64,
                  "per_device_train_batch_size": 4, "learning_rate": 2e-2, "max_steps": 8, "save_steps": 4,
                  "disable_tqdm": True, "bf16": False, **extra}
        train(load_config(None, values))

    run(tmp_path / "full")
    part = tmp_path / "part"
    run(part)
    assert (part / "checkpoint-4" / "adapter_training_state.safetensors").exists()
    shutil.rmtree(part / "checkpoint-8")  # pretend the run died after step 4
    run(part, resume_from_checkpoint=str(part / "checkpoint-4"))
    full, resumed = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "full", part))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    patterns = [json.loads((d / "adapter_config.json").read_text())["rank_pattern"] for d in (tmp_path / "full", part)]
    assert patterns[0] == patterns[1]
