"""A model folder whose weights do not cover the model its config.json builds, whose weights hold
NaN or inf, or whose config.json transformers cannot use, is refused at load with one line naming
the folder, file, tensor or key (tuneforge/loadcheck.py, weightfiles.load_model_config): nothing is
randomly initialised in silence, and nothing fails later in training or sampling."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuneforge import loadcheck, models
from tuneforge.config import ModelArguments
from tuneforge.errors import ModelError


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _load(path, dtype=None):
    return models.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(path)), dtype=dtype)


def _edit_weights(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _refusal(folder, **kwargs) -> str:
    with pytest.raises(ModelError) as err:
        _load(folder, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


FIT = "the weights in '{}' do not fit its config.json (LlamaForCausalLM, model_type 'llama'): "
AGAIN = ("; the weight files are incomplete, or they and config.json come from different models: download, "
         "copy or save the model again")


@pytest.mark.parametrize("deleted,first,count", [
    (["model.layers.1.mlp.down_proj.weight"], "model.layers.1.mlp.down_proj.weight", 1),
    (["model.norm.weight", "model.layers.0.self_attn.q_proj.weight"], "model.layers.0.self_attn.q_proj.weight", 2),
    # lm_head is tied to embed_tokens: with its source gone it is missing too
    (["model.embed_tokens.weight"], "model.embed_tokens.weight", 2),
])
def test_weights_missing_from_the_files_are_refused(model_copy, deleted, first, count):
    _edit_weights(model_copy, lambda state: [state.pop(name) for name in deleted])
    noun = "weight" if count == 1 else "weights"
    assert _refusal(model_copy) == (FIT.format(model_copy) + f"{count} {noun} missing from the files "
                                    f"(first: {first})" + AGAIN)


def test_tied_lm_head_and_buffers_missing_from_the_file_are_fine(model_copy):
    # the tiny model ties lm_head to embed_tokens and keeps rotary inv_freq as a non-persistent
    # buffer: neither is in its file, and both are what transformers itself lets pass
    names = set(load_file(str(model_copy / "model.safetensors")))
    assert "lm_head.weight" not in names and not any("inv_freq" in n for n in names)
    model, _ = _load(model_copy)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_config_with_more_or_fewer_layers_than_the_files(model_copy):
    _edit_config(model_copy, num_hidden_layers=1)
    assert _refusal(model_copy) == (FIT.format(model_copy) + "9 tensors in the files that the model has no "
                                    "place for (first: model.layers.1.input_layernorm.weight)" + AGAIN)
    _edit_config(model_copy, num_hidden_layers=3)
    assert _refusal(model_copy) == (FIT.format(model_copy) + "9 weights missing from the files (first: "
                                    "model.layers.2.self_attn.q_proj.weight)" + AGAIN)


def test_tensors_of_another_shape_are_refused_with_both_shapes(model_copy):
    _edit_config(model_copy, intermediate_size=96)
    assert _refusal(model_copy) == (FIT.format(model_copy) + "6 tensors of another shape (first: "
                                    "model.layers.0.mlp.gate_proj.weight is (128, 64) in the files, (96, 64) "
                                    "in the model)" + AGAIN)


def test_another_model_type_over_the_same_weights_is_refused(model_copy):
    _edit_config(model_copy, model_type="bert", architectures=["BertModel"])
    message = _refusal(model_copy)
    assert message.startswith(f"the weights in '{model_copy}' do not fit its config.json (BertLMHeadModel, "
                              "model_type 'bert'): ")
    assert "weights missing from the files (first: bert.embeddings.word_embeddings.weight)" in message
    assert "tensors in the files that the model has no place for (first: model.embed_tokens.weight)" in message


@pytest.mark.parametrize("model_type", ["t5", "clip", "vit"])
def test_a_model_type_with_no_causal_lm_is_refused_before_loading(model_copy, model_type):
    _edit_config(model_copy, model_type=model_type)
    assert _refusal(model_copy) == (
        f"model config '{model_copy / 'config.json'}' describes a {model_type!r} model, which is not a causal "
        "language model (transformers has no AutoModelForCausalLM class for it); tuneforge fine-tunes and "
        "chats with causal (decoder) language models")


def test_an_unknown_extra_tensor_is_ignored_with_a_warning(model_copy, caplog):
    _edit_weights(model_copy, lambda state: state.update({"vision_tower.proj.weight": torch.zeros(2, 2)}))
    with caplog.at_level(logging.WARNING):
        model, _ = _load(model_copy)
    assert model.config.hidden_size == 64
    assert (f"'{model_copy}': 1 tensor(s) in its weight files are not part of LlamaForCausalLM and are ignored "
            "(first: vision_tower.proj.weight)") in caplog.text


@pytest.mark.parametrize("name,index,value,kind,count", [
    ("model.layers.0.self_attn.q_proj.weight", 0, float("nan"), "NaN", 1),
    ("model.norm.weight", 5, float("-inf"), "inf", 1),
    ("model.embed_tokens.weight", slice(0, 3), float("inf"), "inf", 3),
])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(model_copy, name, index, value, kind, count):
    def poison(state):
        state[name].view(-1)[index] = value

    _edit_weights(model_copy, poison)
    size = load_file(str(model_copy / "model.safetensors"))[name].numel()
    assert _refusal(model_copy) == (f"model file '{model_copy / 'model.safetensors'}' holds {kind} in {name} "
                                    f"({count} of {size} values); the weights are damaged: download, copy or "
                                    "save them again")


def test_two_bad_tensors_are_counted(model_copy):
    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        state["model.layers.0.mlp.up_proj.weight"][1, 1] = float("nan")

    _edit_weights(model_copy, poison)
    assert "holds NaN in model.layers.0.mlp.up_proj.weight (1 of 8192 values; 1 more tensor(s) hold NaN or " \
           "inf too)" in _refusal(model_copy)


def test_values_beyond_float16_say_so(model_copy):
    _edit_weights(model_copy, lambda state: state["model.norm.weight"].__setitem__(0, 1e6))
    _load(model_copy, dtype="float32")  # a large but finite weight is fine where it fits
    assert _refusal(model_copy, dtype="float16").endswith(
        "holds inf in model.norm.weight (1 of 64 values); its values exceed float16's range (65504): load it "
        "in bfloat16 or float32 (infer_dtype, or bf16 instead of fp16 for training)")


def test_check_finite_does_not_mistake_huge_finite_weights_for_damage():
    huge = torch.full((4,), 3e38)  # its float32 sum overflows, its values do not
    loadcheck.check_finite([("w", huge), ("ids", torch.arange(3))], "weights")
    with pytest.raises(ModelError, match=r"^weights holds NaN in v \(1 of 2 values\); "):
        loadcheck.check_finite([("w", huge), ("v", torch.tensor([1.0, float("nan")]))], "weights")


@pytest.mark.parametrize("changes,message", [
    ({"dtype": "float99"}, "dtype 'float99' is not a torch dtype; use float32, bfloat16 or float16 (or remove the key)"),
    ({"dtype": None, "torch_dtype": "float99"}, "torch_dtype 'float99' is not a torch dtype; use float32, "
     "bfloat16 or float16 (or remove the key)"),
    ({"dtype": 16}, "dtype 16 is not a torch dtype; use float32, bfloat16 or float16 (or remove the key)"),
    ({"dtype": "Tensor"}, "dtype 'Tensor' is not a torch dtype; use float32, bfloat16 or float16 (or remove the key)"),
    ({"text_config": {"dtype": "half-ish"}}, "dtype 'half-ish' is not a torch dtype; use float32, bfloat16 or "
     "float16 (or remove the key)"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be at least 1, got -1; fix config.json (or copy the "
     "model again)"),
    ({"num_attention_heads": 0}, "num_attention_heads must be at least 1, got 0; fix config.json (or copy the "
     "model again)"),
    ({"vocab_size": 0}, "vocab_size must be at least 1, got 0; fix config.json (or copy the model again)"),
])
def test_config_values_transformers_would_crash_on(model_copy, changes, message):
    _edit_config(model_copy, **changes)
    assert _refusal(model_copy) == f"model config '{model_copy / 'config.json'}': {message}"


@pytest.mark.parametrize("changes,cause", [
    ({"hidden_act": "swishy"}, "KeyError: 'swishy'"),
    ({"rope_parameters": {"rope_type": "spiral", "rope_theta": 1.0}}, "KeyError: 'spiral'"),
])
def test_a_config_transformers_cannot_build_a_model_from_names_config_json(model_copy, changes, cause):
    _edit_config(model_copy, **changes)
    with pytest.raises(ModelError) as err:
        _load(model_copy)
    assert str(err.value) == (f"model config '{model_copy / 'config.json'}' does not describe a model "
                              f"transformers can build ({cause}); fix or replace config.json")
    assert err.value.__cause__ is not None  # `--debug` shows where transformers failed


def test_a_failure_that_is_not_the_config_is_raised_as_it_is(model_copy, monkeypatch):
    from transformers import AutoModelForCausalLM

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a bad file")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        _load(model_copy)


@pytest.mark.parametrize("quant, needs", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "optimum and gptqmodel"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}, "gptqmodel (AutoAWQ's format)"),
    ({"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 1,
      "nbits_per_codebook": 16}, "aqlm"),
])
def test_a_checkpoint_quantized_by_gptq_awq_or_aqlm_is_one_line(model_copy, quant, needs):
    """LLaMA-Factory's train_qlora/*_gptq|awq|aqlm examples: refused before any weight is read
    (transformers would raise an ImportError for the missing package, a traceback)."""
    _edit_config(model_copy, quantization_config=quant)
    assert _refusal(model_copy) == (
        f"model '{model_copy}' is already quantized with {quant['quant_method']} (quantization_config in "
        f"config.json); loading it needs {needs}, and tuneforge's adapters cannot train or merge its layers: "
        "use the unquantized model (with quantization_bit: 4 for QLoRA) instead")


def test_a_package_transformers_asks_for_is_one_line(model_copy, monkeypatch):
    from transformers import AutoModelForCausalLM

    def needs(*args, **kwargs):
        raise ImportError("Loading this model requires frobnicate (`pip install frobnicate`)")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", needs)
    with pytest.raises(ModelError, match=r"cannot load a model from .*: Loading this model requires frobnicate"):
        _load(model_copy)
