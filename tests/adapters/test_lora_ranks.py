"""Per-layer LoRA ranks from YAML (issue 16: Distributed LoRA and Hierarchical LoRA).

Oracles: the ranks each module should get are written out by hand below from the model's known
module names (not from tuneforge's level rules); the saved file's A matrices must have exactly
those ranks, peft must load the file (its rank_pattern / alpha_pattern) to the same outputs with
the scaling the YAML asked for, and merging must equal the unmerged adapter. A `tuneforge train`
run writes the same kind of file. Bad entries are one ConfigError line naming key and entry.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from adapter_testkit import VOCAB
from peft import PeftModel
from safetensors.torch import load_file

from tuneforge.adapters import add_adapter, merge_adapters, save_adapter
from tuneforge.adapters.lora import LoraLayer
from tuneforge.adapters.lora_ranks import parse_schedule
from tuneforge.adapters.methods import config_from_finetune_args
from tuneforge.config import load_config
from tuneforge.errors import ConfigError

LAYERS = 4
# per model: its list of layers, attention and MLP modules below a layer, embeddings, head, and the
# YAML that adapts them (BERT: lora_target 'all' would take the classifier, as in peft)
MODELS = {
    "llama": dict(blocks="model.layers", attn=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj"], mlp=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
                  embed="model.embed_tokens", head="lm_head", other=[], mlp_regex=r"mlp\..*", yaml={}),
    "qwen2": dict(blocks="model.layers", attn=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj"], mlp=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
                  embed="model.embed_tokens", head="lm_head", other=[], mlp_regex=r".*mlp.*", yaml={}),
    "gpt2": dict(blocks="transformer.h", attn=["attn.c_attn", "attn.c_proj"], mlp=["mlp.c_fc", "mlp.c_proj"],
                 embed="transformer.wte", head="lm_head", other=[], mlp_regex=r"mlp\.c_(fc|proj)", yaml={}),
    "bert": dict(blocks="bert.encoder.layer", attn=["attention.self.query", "attention.self.key",
                 "attention.self.value", "attention.output.dense"], mlp=["intermediate.dense", "output.dense"],
                 embed="bert.embeddings.word_embeddings", head=None, other=["bert.pooler.dense"],
                 mlp_regex=r"intermediate\.dense|layer\.\d+\.output\.dense",
                 yaml={"lora_target": "query,key,value,dense", "additional_target": "classifier"}),
}


def build(kind: str, layers: int = LAYERS) -> torch.nn.Module:
    """A tiny random model of `kind` with `layers` layers (fixed seed)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind in ("llama", "qwen2"):
        config_class, model_class = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                                     "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[kind]
        model = model_class(config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB,
                                                 n_positions=64, bos_token_id=0, eos_token_id=0,
                                                 tie_word_embeddings=False))
    else:
        model = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=3))
    return model.eval()


def expected_ranks(kind: str, case: str) -> dict[str, int]:
    """The rank of every adapted module, by hand from the YAML of `case` (see CASES)."""
    m = MODELS[kind]
    out = {}
    for i in range(LAYERS):
        for below in m["attn"] + m["mlp"]:
            is_mlp = below in m["mlp"]
            if case == "distributed":  # {"0": 2, "1-2": 6, <mlp regex>: 12}, then linear 4->16: 4 8 12 16
                rank = 2 if i == 0 else 6 if i in (1, 2) else 12 if is_mlp else 16
            else:  # levels: attn linear 2->8 (2 4 6 8), mlp {"0-1": 4, "2-3": 12}
                rank = ({0: 4, 1: 4, 2: 12, 3: 12} if is_mlp else {0: 2, 1: 4, 2: 6, 3: 8})[i]
            out[f"{m['blocks']}.{i}.{below}"] = rank
    for name in m["other"]:
        out[name] = 8  # lora_rank: no entry covers it
    if case == "hierarchical":
        out[m["embed"]] = 4
        if m["head"]:
            out[m["head"]] = 6
    return out


def yaml_keys(kind: str, case: str) -> dict:
    m = MODELS[kind]
    if case == "distributed":
        keys = {"lora_rank_pattern": {"0": 2, "1-2": 6, m["mlp_regex"]: 12}, "lora_rank_schedule": "linear 4->16",
                "lora_alpha": 16}
    else:
        levels = {"attn": "linear 2->8", "mlp": {"0-1": 4, "2-3": 12}, "embed": 4}
        keys = {"lora_rank_levels": {**levels, "head": 6} if m["head"] else levels}
    return {"finetuning_type": "lora", "lora_rank": 8, **m["yaml"], **keys}


def inputs(kind: str) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def out(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs(kind)).logits


def file_ranks(directory) -> dict[str, int]:
    """module name -> rank, read off the saved A matrices' shapes (Linear: (r, in); Embedding: (r, vocab))."""
    ranks = {}
    for key, tensor in load_file(str(directory / "adapter_model.safetensors")).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_(?:embedding_)?A(?:\.weight)?", key)
        if m:
            ranks[m.group(1)] = tensor.shape[0]
    return ranks


CASES = [(k, c) for c in ("distributed", "hierarchical") for k in MODELS]


@pytest.mark.parametrize("kind,case", CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_saved_ranks_equal_the_pattern_and_peft_agrees(kind, case, tmp_path):
    finetune = load_config(None, yaml_keys(kind, case)).finetune
    model = build(kind)
    add_adapter(model, config_from_finetune_args(finetune, model))
    with torch.no_grad():  # B != 0, as after training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ours = out(model, kind)
    assert (ours - out(build(kind), kind)).abs().max() > 1e-3, "the adapter changes nothing"
    save_adapter(model, tmp_path)

    want = expected_ranks(kind, case)
    assert file_ranks(tmp_path) == want
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["r"] == 8 and written["rank_pattern"]
    # lora_alpha empty: alpha = 2 x each module's rank; set: kept for every module (scaling alpha / r_i)
    assert written["lora_alpha"] == 16  # distributed: as set; hierarchical: 2 x lora_rank
    assert written["alpha_pattern"] == ({} if case == "distributed"
                                        else {k: 2 * r for k, r in written["rank_pattern"].items()})

    theirs = PeftModel.from_pretrained(build(kind), str(tmp_path)).eval()
    assert (out(theirs, kind) - ours).abs().max().item() <= 1e-5
    peft_layers = {n.removeprefix("base_model.model."): mod for n, mod in theirs.named_modules()
                   if hasattr(mod, "r") and isinstance(getattr(mod, "r"), dict) and "default" in mod.r}
    assert {n: mod.r["default"] for n, mod in peft_layers.items()} == want
    for name, mod in peft_layers.items():
        scale = 16 / want[name] if case == "distributed" else 2.0
        assert mod.scaling["default"] == pytest.approx(scale), name

    merge_adapters(model)  # a per-layer rank merges like any LoRA
    assert (out(model, kind) - ours).abs().max().item() <= 1e-5


def test_schedules_by_hand():
    # linear: 4 + 12 * i / 4 = 4, 7, 10, 13, 16; cosine: 4 + 12 * (1 - cos(pi i / 4)) / 2 = 4, 5.76, 10, 14.24, 16
    assert parse_schedule("k", "linear 4->16", 5) == [4, 7, 10, 13, 16]
    assert parse_schedule("k", "cosine 4->16", 5) == [4, 6, 10, 14, 16]
    assert parse_schedule("k", " Linear 16 -> 4 ", 5) == [16, 13, 10, 7, 4]
    assert parse_schedule("k", "linear 4->5", 4) == [4, 4, 5, 5]  # 4.33 -> 4, 4.67 -> 5; halves go up:
    assert parse_schedule("k", "linear 1->2", 3) == [1, 2, 2]  # 1.5 -> 2
    assert parse_schedule("k", "linear 4->16", 1) == [4]


def test_no_rank_key_leaves_the_config_alone():
    finetune = load_config(None, {"finetuning_type": "lora"}).finetune
    cfg = config_from_finetune_args(finetune, build("llama", 2))
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {} and cfg.target_modules == "all-linear"


BAD = [
    ({"lora_rank_pattern": {"0-9": 4}}, "config key 'lora_rank_pattern': entry '0-9' names layer 9, but the model "
                                        "has 4 layers (0-3)"),
    ({"lora_rank_pattern": {"3-1": 4}}, "entry '3-1' is a range from 3 down to 1; write the smaller index first"),
    ({"lora_rank_pattern": {"(q_proj": 4}}, "entry '(q_proj' is neither a layer index, a range such as '0-7', "
                                           "nor a valid regex"),
    ({"lora_rank_pattern": {"0": 0}}, "entry '0': the rank must be a positive integer, got 0"),
    ({"lora_rank_pattern": {"gate_projj": 4}}, "entry 'gate_projj' matches no module that lora_target adapts"),
    ({"lora_rank_pattern": {".*": 4, "1": 8}}, "entry '1' sets no rank: every module it matches takes its rank "
                                               "from 'lora_rank_pattern': entry '.*' first"),
    ({"lora_rank_schedule": "linear 4-16"}, "config key 'lora_rank_schedule' must look like 'linear 4->16'"),
    ({"lora_rank_schedule": "linear 0->16"}, "config key 'lora_rank_schedule': the ranks must be positive"),
    ({"lora_rank_levels": {"ffn": 8}}, "level 'ffn' is not one of embed, attn, mlp, head"),
    ({"lora_rank_levels": {"mlp": 8}, "lora_target": "q_proj,v_proj"},
     "config key 'lora_rank_levels': level 'mlp' matches no module that lora_target adapts"),
    ({"lora_rank_levels": {"attn": {"x": 4}}}, "level 'attn': entry 'x' must be a layer index or a range"),
    ({"lora_rank_levels": {"embed": "linear 2->4"}}, "level 'embed': the rank must be a positive integer"),
    ({"lora_rank_levels": {"head": 4}, "additional_target": "lm_head"},
     "level 'head': 'lm_head' is in additional_target (trained in full)"),
]


@pytest.mark.parametrize("keys,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_entries_are_one_line_naming_key_and_entry(keys, message):
    finetune = load_config(None, {"finetuning_type": "lora", **keys}).finetune
    model = build("llama")
    with pytest.raises(ConfigError) as e:
        config_from_finetune_args(finetune, model)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_head_level_without_an_output_head():
    finetune = load_config(None, {"finetuning_type": "lora", "lora_rank_levels": {"head": 4},
                                  **MODELS["bert"]["yaml"]}).finetune
    with pytest.raises(ConfigError, match=r"level 'head': this model has no output head"):
        config_from_finetune_args(finetune, build("bert"))


def test_trains_from_yaml_and_writes_the_pattern(tiny_model_dir, tiny_data_dir, tmp_path):
    """`tuneforge train` with lora_rank_levels + lora_rank_schedule on the 2-layer tiny Llama."""
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters import load_adapter
    from tuneforge.workflows import train

    run = tmp_path / "run"
    cfg = tmp_path / "ranks.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: arith\ndataset_dir: {tiny_data_dir}\n"
        f"output_dir: {run}\nfinetuning_type: lora\nlora_rank: 8\ncutoff_len: 64\n"
        "lora_rank_schedule: linear 2->6\nlora_rank_levels: {mlp: 12, embed: 4}\n"
        "per_device_train_batch_size: 4\nlearning_rate: 1.0e-2\nmax_steps: 2\nlogging_steps: 1\n"
        "save_steps: 100\ndisable_tqdm: true\nbf16: false\n"
    )
    train(load_config(str(cfg)))
    want = {"model.embed_tokens": 4}
    for i, rank in enumerate((2, 6)):  # attention: the schedule; mlp: its level
        want.update({f"model.layers.{i}.self_attn.{p}_proj": rank for p in "qkvo"})
        want.update({f"model.layers.{i}.mlp.{p}_proj": 12 for p in ("gate", "up", "down")})
    assert file_ranks(run) == want
    written = json.loads((run / "adapter_config.json").read_text())
    assert "embed_tokens" in written["target_modules"] and "lm_head" not in written["target_modules"]

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run).eval()
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run)).eval()
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-5


def test_a_quantized_base_gets_the_same_ranks():
    """quantization_bit: the layers are QuantLinear; levels and the ramp apply to them unchanged."""
    from tuneforge.adapters.lora_quant import LoraQuantLinear
    from tuneforge.quant.model import quantize_model

    finetune = load_config(None, {"finetuning_type": "lora", "quantization_bit": 4,
                                  "lora_rank_levels": {"attn": "linear 2->8", "mlp": {"0-1": 4, "2-3": 12}}}).finetune
    model = quantize_model(build("llama"), bits=4, backend="native", compute_dtype=torch.float32)
    add_adapter(model, config_from_finetune_args(finetune, model))
    got = {n: m.lora_A["default"].shape[0] for n, m in model.named_modules() if isinstance(m, LoraQuantLinear)}
    assert got == {k: v for k, v in expected_ranks("llama", "hierarchical").items() if ".layers." in k}
