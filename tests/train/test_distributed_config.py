"""The distributed keys as accelerate receives them (no processes started): LLaMA-Factory's
launcher variables as torchrun's arguments, fsdp / fsdp_config as FSDP2 plugin arguments (as
transformers translates them), a DeepSpeed JSON's "auto" values filled from the config, and
ddp_timeout / ddp_find_unused_parameters as accelerate's kwargs handlers."""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import pytest

from tuneforge.config import load_config
from tuneforge.distributed.deepspeed_config import fill_auto, read_deepspeed_config
from tuneforge.distributed.launch import needs_torchrun, torchrun_command
from tuneforge.distributed.plugins import accelerator_kwargs, fsdp_plugin_args
from tuneforge.errors import ConfigError

ZERO3 = {  # the shape of LLaMA-Factory's examples/deepspeed/ds_z3_offload_config.json
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": 0.1}},
    "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto"},
}


def test_launcher_variables_become_torchrun_arguments():
    env = {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500"}
    command = torchrun_command(["train", "cfg.yaml"], env, devices=0)
    assert command == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
                       "--nproc_per_node", "4", "--master_addr", "10.0.0.1", "--master_port", "29500",
                       "-m", "tuneforge", "train", "cfg.yaml"]
    default = torchrun_command(["train"], {}, devices=3)  # LLaMA-Factory's defaults
    assert default[3:10] == ["--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "3", "--master_addr"]
    assert default[10] == "127.0.0.1" and int(default[12]) > 0  # a free port
    with pytest.raises(ConfigError, match="NODE_RANK=2 must be below NNODES=2"):
        torchrun_command(["train"], {"NNODES": "2", "NODE_RANK": "2"}, devices=0)


@pytest.mark.parametrize("env, devices, expected", [
    ({"FORCE_TORCHRUN": "1"}, 0, True), ({"FORCE_TORCHRUN": "true"}, 1, True), ({}, 2, True), ({}, 1, False),
    ({"FORCE_TORCHRUN": "0"}, 0, False),
    ({"FORCE_TORCHRUN": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, 2, False),  # launched already
])
def test_when_train_relaunches_itself(env, devices, expected):
    assert needs_torchrun(env, devices) is expected


def test_fsdp_options_and_config_as_fsdp2_plugin_arguments(tmp_path):
    from accelerate.utils import FullyShardedDataParallelPlugin

    args = fsdp_plugin_args("full_shard auto_wrap offload", None)
    assert args == {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type":
                    "FULL_STATE_DICT", "reshard_after_forward": True, "cpu_ram_efficient_loading": False,
                    "cpu_offload": True}
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"fsdp_version": 2, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                "fsdp_reshard_after_forward": False, "activation_checkpointing": True}))
    args = fsdp_plugin_args(True, str(path))
    assert args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert args["reshard_after_forward"] is False and args["activation_checkpointing"] is True
    assert fsdp_plugin_args("shard_grad_op", None)["reshard_after_forward"] is False
    plugin = FullyShardedDataParallelPlugin(**args)  # accelerate takes them as they are
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert fsdp_plugin_args(False, None) is None and fsdp_plugin_args("", None) is None
    with pytest.raises(ConfigError, match="'hybrid_shard' is an FSDP1 strategy"):
        fsdp_plugin_args("hybrid_shard", None)


def test_deepspeed_auto_values_filled_from_the_config(tmp_path):
    path = tmp_path / "ds_z3.json"
    path.write_text(json.dumps(ZERO3))
    cfg = load_config(None, {"deepspeed": str(path), "per_device_train_batch_size": 4,
                             "gradient_accumulation_steps": 8, "learning_rate": 2e-5, "max_grad_norm": 0.5})
    filled = fill_auto(read_deepspeed_config(cfg.distributed.deepspeed), cfg.train, world_size=2, precision="bf16")
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 8
    assert filled["train_batch_size"] == 2 * 4 * 8 and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    # the model's hidden size decides these: accelerate fills them when it prepares the model
    assert filled["zero_optimization"]["reduce_bucket_size"] == "auto"
    assert ZERO3["train_batch_size"] == "auto"  # the file's mapping is left as it was
    with pytest.raises(ConfigError, match="does not drive DeepSpeed's engine yet; use fsdp: full_shard"):
        accelerator_kwargs(cfg, "no", cpu=False)  # refused on GPUs as on CPUs, before anything starts
    path.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage must be 0, 1, 2 or 3, got 4"):
        load_config(None, {"deepspeed": str(path)})


def test_ddp_keys_become_accelerate_kwargs_handlers():
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cfg = load_config(None, {"ddp_timeout": 90, "ddp_find_unused_parameters": True})
    handlers = {type(h): h for h in accelerator_kwargs(cfg, "no", cpu=True)["kwargs_handlers"]}
    assert handlers[InitProcessGroupKwargs].timeout == timedelta(seconds=90)
    assert handlers[DistributedDataParallelKwargs].find_unused_parameters is True
    default = accelerator_kwargs(load_config(None, {}), "no", cpu=True)
    assert {type(h): h for h in default["kwargs_handlers"]}[DistributedDataParallelKwargs].find_unused_parameters \
        is False
    assert "fsdp_plugin" not in default and "deepspeed_plugin" not in default


def test_checkpoint_keeps_every_process_rng_states(tmp_path):
    """rng_state.pt of a run in several processes: each process resumes with its own states."""
    import torch

    from tuneforge.train import checkpoint as ckpt

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(ckpt.rng_state())
    path = ckpt.save_checkpoint(tmp_path, ckpt.TrainerState(global_step=1, total_steps=2), model, optimizer,
                                scheduler, rng_states=states)
    saved = torch.load(path / ckpt.RNG, weights_only=True)
    for rank, seed in enumerate((1, 2)):
        ckpt.set_rng_state(ckpt.rank_rng_state(saved, rank))
        drawn = torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(drawn, torch.rand(3))
    single = {"torch": torch.get_rng_state()}  # a one-process checkpoint's file: itself for rank 0
    assert ckpt.rank_rng_state(single, 0) is single


def test_layers_to_wrap_leave_out_the_class_holding_the_input_embedding():
    """BERT's _no_split_modules names BertEmbeddings, which holds the word embedding that accelerate
    shards as a unit of its own (fully_shard failed there: stage cls under fsdp); Llama's layers
    are kept; a user's transformer_layer_cls_to_wrap wins."""
    from types import SimpleNamespace

    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from tuneforge.distributed.plugins import name_layers_to_wrap

    def wrapped(model, names=None):
        plugin = SimpleNamespace(transformer_cls_names_to_wrap=names)
        name_layers_to_wrap(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), model)
        return plugin.transformer_cls_names_to_wrap

    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
    assert "BertEmbeddings" in bert._no_split_modules
    assert wrapped(bert) == ["BertLayer"]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    assert wrapped(llama) == ["LlamaDecoderLayer"]
    assert wrapped(bert, ["BertEmbeddings"]) == ["BertEmbeddings"]
    name_layers_to_wrap(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None)), bert)  # no FSDP: nothing


def test_a_launched_input_error_is_printed_once_and_exits_2(tmp_path, monkeypatch):
    """Under relaunch every process meets the same config error: rank 0 prints it, each notes it
    in the launcher's file, and the launcher exits 2 (torchrun itself says 1)."""
    import subprocess

    from tuneforge.distributed import launch

    marker = tmp_path / "user_error"
    env = {launch.USER_ERROR_FILE: str(marker)}
    assert launch.note_user_error(True, {**env, "RANK": "0"}) is True
    assert launch.note_user_error(True, {**env, "RANK": "1"}) is False  # the same line: rank 0 prints it
    assert launch.note_user_error(False, {**env, "RANK": "1"}) is True  # an error of its own: printed
    assert marker.read_text().split() == ["0", "1", "1"]
    assert launch.note_user_error(True, {}) is True  # not launched: prints as always

    def fake_run(command, check, env):
        if "--fail-input" in command:
            with open(env[launch.USER_ERROR_FILE], "a") as f:
                f.write("0\n")
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    assert launch.relaunch(["train", "cfg.yaml", "--fail-input"]) == 2
    assert launch.relaunch(["train", "cfg.yaml"]) == 1  # another failure: torchrun's code


def test_info_lines_are_left_to_rank_0():
    """Every launched process reads the same config, data and model: rank 0 prints the info lines
    (dataset_dir, quantized layers, fused cross-entropy off, ...), the others only warnings and
    errors (test_distributed.py checks a real two-process run prints each line once)."""
    import logging

    from tuneforge.distributed.launch import info_on_rank_zero

    logger = logging.getLogger("tuneforge")
    before = logger.level
    try:
        assert info_on_rank_zero({}) is False and info_on_rank_zero({"RANK": "0"}) is False
        assert logger.level == before
        assert info_on_rank_zero({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}) is True
        child = logging.getLogger("tuneforge.data.registry")  # the modules' own loggers follow it
        assert not child.isEnabledFor(logging.INFO) and child.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(before)


def test_every_fsdp_config_problem_is_named_at_once():
    """fsdp_config's wrong settings in one line, each named (was: the first only); fsdp's in its own."""
    from tuneforge.errors import ConfigErrors

    with pytest.raises(ConfigError) as one:
        fsdp_plugin_args(True, {"fsdp_version": 1, "cpu_offload": "maybe", "transformer_layer_cls_to_wrap": [3]})
    assert str(one.value).startswith("config key 'fsdp_config': version 1 is not available")
    for words in ("cpu_offload must be true or false, got 'maybe'",
                  "transformer_layer_cls_to_wrap must be a layer class name or a list of them, got [3]"):
        assert words in str(one.value)
    with pytest.raises(ConfigErrors) as two:
        fsdp_plugin_args("no_shard,bogus", {"min_num_params": "many"})
    assert two.value.messages == [
        "config key 'fsdp_config': min_num_params must be a whole number of parameters, got 'many'",
        "config key 'fsdp': 'no_shard' is an FSDP1 strategy; unknown option 'bogus'; FSDP2 has full_shard, "
        "shard_grad_op, offload, auto_wrap (e.g. fsdp: 'full_shard auto_wrap')"]
