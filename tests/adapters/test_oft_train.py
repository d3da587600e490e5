"""`finetuning_type: oft` / `boft` from a YAML config: the run trains the rotations only (the loss
falls), saves a peft adapter (OFT: peft loads it to the same outputs), and `tuneforge export`
merges it into a model that answers as base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.adapters import list_adapters, load_adapter
from tuneforge.config import load_config
from tuneforge.workflows import export, train

RUNS = {
    "oft": ("OFT", "oft_block_size: 16\noft_target: q_proj,v_proj,down_proj\nmodule_dropout: 0.1\n"),
    "boft": ("BOFT", "boft_block_size: 8\nboft_n_butterfly_factor: 2\nlora_target: all\n"),
}


@pytest.mark.parametrize("method", list(RUNS))
def test_trains_from_yaml_and_exports_merged(tiny_model_dir, tiny_data_dir, tmp_path, method):
    peft_type, keys = RUNS[method]
    out = tmp_path / "run"
    cfg = tmp_path / f"{method}.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: arith\ndataset_dir: {tiny_data_dir}\n"
        f"output_dir: {out}\nfinetuning_type: {method}\n{keys}cutoff_len: 64\n"
        "per_device_train_batch_size: 4\nlearning_rate: 2.0e-2\nmax_steps: 12\nlogging_steps: 2\n"
        "save_steps: 100\ndisable_tqdm: true\nbf16: false\n"
    )
    train(load_config(str(cfg)))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == peft_type

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    assert type(list_adapters(ours)["default"]).__name__ == f"{peft_type}Config"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        got, plain = ours(ids).logits, base(ids).logits
    assert (got - plain).abs().max() > 1e-4, "the trained adapter changes nothing"
    if method == "oft":
        from peft import PeftModel

        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
        with torch.no_grad():
            assert (theirs(ids).logits - got).abs().max().item() <= 1e-5

    merged_dir = export(load_config(None, {
        "model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out),
        "export_dir": str(tmp_path / "merged"), "export_dtype": "float32"}))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any(method in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, got, atol=1e-4, rtol=1e-4)
