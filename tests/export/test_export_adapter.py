"""Adapters that cannot merge, for every method: `tuneforge export` refuses them in one line that
names the method and offers `export_format: adapter`, which writes the adapters themselves in
peft's format (staged and renamed into export_dir like every export)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import save_moved_adapter
from tuneforge.adapters import BottleneckConfig, LoraConfig, add_adapter, load_adapter
from tuneforge.cli import main
from tuneforge.errors import ConfigError
from tuneforge.export.adapter import refuse_unmergeable_layers
from tuneforge.export.target import MANIFEST

IDS = torch.tensor([[1, 520, 33, 4077, 17, 902, 3, 88]])


def _run(capsys, *argv):
    import logging

    code = main(["export", *argv])
    logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("tuneforge: error:")]


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "bn": save_moved_adapter(tiny_model_dir, root / "bn", BottleneckConfig(adapter_type="parallel", adapter_size=8),
                                 1, moved=("adapter_up",)),
        "lora": save_moved_adapter(tiny_model_dir, root / "lora", LoraConfig(r=2, target_modules=["q_proj"]), 2),
    }


def _logits(model_dir, adapter):
    model = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_a_merged_export_of_an_adapter_that_cannot_merge_is_refused_in_one_line(tiny_model_dir, saved, tmp_path, capsys):
    out = tmp_path / "merged"
    for fmt in ("hf", "gguf"):
        code, errors = _run(capsys, f"model_name_or_path={tiny_model_dir}", f"export_dir={out}",
                            f"adapter_name_or_path={saved['lora']},{saved['bn']}", f"export_format={fmt}")
        assert code == 2 and errors == [
            f"tuneforge: error: adapter '{saved['bn']}' is a bottleneck adapter, which cannot be merged into the "
            "model: a bottleneck adapter puts a nonlinearity (relu) between its projections, which no weight "
            "can hold; export it as an adapter instead (export_format: adapter)"]
        assert not out.exists()


@pytest.mark.parametrize("method, label, why", [
    ("prefix", "a prefix tuning", "prefix tuning adds key/value prefixes"),
    ("prompt", "a prompt tuning", "prompt tuning adds virtual tokens"),
    ("ptuning", "a P-tuning", "P-tuning adds virtual tokens"),
    ("unipelt", "a UniPELT", "a UniPELT adapter multiplies each part by a gate"),
])
def test_virtual_token_adapters_are_refused_naming_the_method(tiny_model_dir, tmp_path, capsys, method, label, why):
    import tuneforge

    config = {"prefix": tuneforge.PrefixTuningConfig(num_virtual_tokens=4),
              "prompt": tuneforge.PromptTuningConfig(num_virtual_tokens=4),
              "ptuning": tuneforge.PromptEncoderConfig(num_virtual_tokens=4),
              "unipelt": tuneforge.UniPeltConfig(num_virtual_tokens=4, adapter_size=4)}[method]
    path = save_moved_adapter(tiny_model_dir, tmp_path / method, config, 3, moved=())
    code, errors = _run(capsys, f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}",
                        f"adapter_name_or_path={path}")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"tuneforge: error: adapter '{path}' is {label} adapter, which cannot be merged "
                                f"into the model: {why}") and errors[0].endswith("(export_format: adapter)")
    holder = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tuneforge.PrefixTuningConfig())
    with pytest.raises(ConfigError, match="^cannot merge the virtual-tokens adapter into tuneforge_virtual_tokens: "
                       "prefix tuning adds"):
        refuse_unmergeable_layers(holder)


def test_layers_that_cannot_merge_are_refused_naming_the_method():
    model = add_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), BottleneckConfig(target_modules=["0"]))
    with pytest.raises(ConfigError, match=r"^cannot merge the bottleneck adapter into 0: a bottleneck adapter puts "
                       r"a nonlinearity \(relu\) .*; export it as an adapter instead \(export_format: adapter\)$"):
        refuse_unmergeable_layers(model)
    refuse_unmergeable_layers(add_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(target_modules=["0"])))


def test_export_format_adapter_writes_one_adapter_that_loads_alike(tiny_model_dir, saved, tmp_path, capsys):
    out = tmp_path / "exported"
    args = (f"model_name_or_path={tiny_model_dir}", f"export_dir={out}", "export_format=adapter")
    assert _run(capsys, *args, f"adapter_name_or_path={saved['bn']}") == (0, [])
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", MANIFEST}
    assert json.loads((out / MANIFEST).read_text())["export_format"] == "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["adapter_type"] == "parallel"
    theirs, ours = load_file(saved["bn"] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    torch.testing.assert_close(_logits(tiny_model_dir, out), _logits(tiny_model_dir, saved["bn"]), atol=0, rtol=0)

    # again, with two adapters: the previous export is replaced; one subfolder per adapter folder name
    assert _run(capsys, *args, f"adapter_name_or_path={saved['bn']},{saved['lora']}") == (0, [])
    assert {p.name for p in out.iterdir()} == {"bn", "lora", MANIFEST}
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(_logits(tiny_model_dir, out / "lora"), _logits(tiny_model_dir, saved["lora"]),
                               atol=0, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no staging folder left

    # a folder no export wrote is never written over
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, errors = _run(capsys, f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'mine'}",
                        "export_format=adapter", f"adapter_name_or_path={saved['bn']}")
    assert code == 2 and "has no tuneforge_export.json" in errors[0]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_export_format_adapter_needs_adapters(tiny_model_dir, saved, tmp_path, capsys):
    base = (f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'x'}", "export_format=adapter")
    assert _run(capsys, *base) == (2, [
        "tuneforge: error: export_format: adapter writes the adapters of adapter_name_or_path; set it to the "
        "adapter folder(s) to export"])
    assert _run(capsys, *base, f"adapter_name_or_path={saved['bn']}", "export_quantization_bit=4") == (2, [
        "tuneforge: error: export_quantization_bit is for export_format: hf; an adapter export writes the "
        "adapters' own fp32 tensors"])
    assert not (tmp_path / "x").exists()


def test_an_unmergeable_adapter_before_the_last_is_refused_naming_it(tiny_model_dir, saved):
    """adapter_name_or_path merges all but the last: a bottleneck adapter listed first is refused
    before anything loads, naming the adapter and the fix."""
    from tuneforge.config import load_config
    from tuneforge.infer import ChatModel

    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir),
                             "adapter_name_or_path": f"{saved['bn']},{saved['lora']}", "infer_dtype": "float32"})
    with pytest.raises(ConfigError, match=rf"^adapter '{saved['bn']}' is a bottleneck adapter, which cannot be merged "
                                          r"\(.*\), but adapter_name_or_path merges every adapter but the last: "
                                          "list it last"):
        ChatModel(cfg)
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir),
                             "adapter_name_or_path": f"{saved['lora']},{saved['bn']}", "infer_dtype": "float32"})
    assert ChatModel(cfg).answer([{"role": "user", "content": "Hi"}], max_new_tokens=2) is not None
