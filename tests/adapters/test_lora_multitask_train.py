"""`finetuning_type: lora_multitask` with `multitask: true` from YAML: the loss falls on two tasks
trained in packed rows that mix them, the eval loss is reported per task, output_dir holds the multi-task adapter and a plain peft LoRA
per task, and each task's folder loads in peft, in `tuneforge chat`'s loader and in `export`."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.conftest import write_dataset
from tuneforge.adapters import load_adapter
from tuneforge.adapters.lora_multitask import task_ids
from tuneforge.config import load_config
from tuneforge.infer import ChatModel
from tuneforge.workflows import export, train


def test_multitask_trains_from_yaml_and_each_task_loads_alone(tiny_model_dir, tiny_data_dir, tmp_path):
    records = [{"instruction": f"Say {w} twice.", "input": "", "output": f"{w} {w}."}
               for w in ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree") * 3]
    write_dataset(tiny_data_dir, "echo", records)
    out = tmp_path / "run"
    cfg = tmp_path / "mt.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: arith,echo\nmultitask: true\ndataset_dir: {tiny_data_dir}\n"
        f"output_dir: {out}\nfinetuning_type: lora_multitask\nlora_rank: 4\nmultitask_rank: 2\nlora_target: all\n"
        "cutoff_len: 64\nper_device_train_batch_size: 4\nlearning_rate: 2.0e-2\nmax_steps: 10\nlogging_steps: 2\n"
        "packing: true\nsave_steps: 100\ndisable_tqdm: true\nbf16: false\nval_size: 8\n"
    )
    results = train(load_config(str(cfg)))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    assert results["eval_loss"] < results["eval_loss_before"]
    # the eval loss per task, from the same forwards: the whole is their token-weighted mean
    low, high = sorted((results["eval_loss_arith"], results["eval_loss_echo"]))
    assert low <= results["eval_loss"] <= high and "eval_loss_arith_before" in results
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA_MULTITASK"

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    multi = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    answers = {}
    for t, task in enumerate(("arith", "echo")):
        config = json.loads((out / task / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4 + 2
        with torch.no_grad(), task_ids(multi, torch.tensor([t, t])):
            want = multi(ids).logits
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / task))
        chat = ChatModel(load_config(None, {"model_name_or_path": str(tiny_model_dir), "infer_dtype": "float32",
                                            "adapter_name_or_path": str(out / task), "do_sample": False}))
        with torch.no_grad():
            assert (theirs.eval()(ids).logits - want).abs().max().item() <= 1e-4
            assert (chat.model(ids, use_cache=False).logits - want).abs().max().item() <= 1e-4
        answers[task] = chat.answer([{"role": "user", "content": "What is 3 plus 3?"}], max_new_tokens=6)
    merged = tmp_path / "merged"
    export(load_config(None, {"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out / "echo"),
                              "export_dir": str(merged)}))
    with torch.no_grad(), task_ids(multi, torch.tensor([1, 1])):
        want = multi(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    assert (got - want).abs().max().item() <= 1e-4
