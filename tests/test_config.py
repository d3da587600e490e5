"""Config: LLaMA-Factory's keys, overrides, type checks, helpful errors."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tuneforge.adapter_methods import METHOD_KEYS
from tuneforge.config import SECTIONS, load_config
from tuneforge.errors import ConfigError
from tuneforge.train.stages import STAGE_KEYS
from tuneforge.train.optimizers import keys as optimizer_keys

# LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, as users have it
LLAMA_FACTORY_YAML = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def test_llama_factory_yaml_loads_unchanged(tmp_path):
    path = tmp_path / "llama3_lora_sft.yaml"
    path.write_text(LLAMA_FACTORY_YAML)
    cfg = load_config(path)
    assert cfg.finetune.lora_target == "all" and cfg.data.dataset == "identity,alpaca_en_demo"
    assert cfg.train.learning_rate == 1e-4 and cfg.train.num_train_epochs == 3.0
    assert cfg.train.resume_from_checkpoint is None and cfg.data.val_size == 0.1


# LLaMA-Factory's inference, merge and eval examples (examples/inference/llama3_lora_sft.yaml,
# examples/merge_lora/qwen3_lora_sft.yaml, examples/train_lora/llama3_lora_eval.yaml)
LLAMA_FACTORY_OTHER_YAMLS = [
    "model_name_or_path: m\nadapter_name_or_path: saves/sft\ntemplate: llama3\nfinetuning_type: lora\n"
    "trust_remote_code: true\ninfer_backend: huggingface\n",
    "model_name_or_path: m\nadapter_name_or_path: saves/sft\ntemplate: qwen\ntrust_remote_code: true\n"
    "export_dir: out\nexport_size: 5\nexport_device: cpu\nexport_legacy_format: false\n",
    "model_name_or_path: m\nadapter_name_or_path: saves/sft\ntrust_remote_code: true\nfinetuning_type: lora\n"
    "task: mmlu_test\ntemplate: fewshot\nlang: en\nn_shot: 5\nsave_dir: saves/eval\nbatch_size: 4\n",
]


@pytest.mark.parametrize("text", LLAMA_FACTORY_OTHER_YAMLS)
def test_llama_factory_inference_merge_eval_yamls_load(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.model.adapter_name_or_path == "saves/sft"


def test_overrides_win_and_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 8\nlearning_rate: 1e-4\n")  # YAML leaves 1e-4 a string
    cfg = load_config(path, ["lora_rank=16", "resume_from_checkpoint=true", "dataset=[a, b]",
                             "output_dir=out/x"])
    assert cfg.finetune.lora_rank == 16 and cfg.train.learning_rate == 1e-4
    assert cfg.train.resume_from_checkpoint is True and cfg.data.dataset == "a,b"
    cfg = load_config(None, ["save_strategy=no", "eval_strategy=no"])  # YAML reads `no` as false
    assert cfg.train.save_strategy == "no" and cfg.train.eval_strategy == "no"
    cfg = load_config(None, ["resume_from_checkpoint=out/checkpoint-5"])
    assert cfg.train.resume_from_checkpoint == "out/checkpoint-5"


@pytest.mark.parametrize("overrides, message", [
    (["learning_rat=1e-4"], "unknown config key 'learning_rat'; did you mean 'learning_rate'?"),
    (["lora_rank=eight"], "config key 'lora_rank' expects an integer, got 'eight'"),
    (["lora_rank=0"], "config key 'lora_rank' must be positive; got 0"),
    (["finetuning_type=lorra"], "config key 'finetuning_type' must be one of lora, freeze, full"),
    (["deepspeed=ds.json"], "config key 'deepspeed': file 'ds.json' does not exist"),
    (["neat_packing=true", "packing=false"], "'neat_packing' is true but packing is false"),
    (["quantization_bit=3"], "config key 'quantization_bit' must be one of 4, 8; got '3'"),
    (["loraplus_lr_ratio=0"], "config key 'loraplus_lr_ratio' must be positive"),
    (["loraplus_lr_ratio=16", "finetuning_type=full"], "'loraplus_lr_ratio' needs finetuning_type: lora"),
    (["use_dora=true", "finetuning_type=freeze"], "'use_dora' needs finetuning_type: lora"),
    (["pissa_iter=0", "pissa_init=true"], "'pissa_iter' must be -1 (full SVD) or at least 1"),
    (["pissa_convert=true"], "'pissa_convert' needs pissa_init: true"),
    (["pissa_init=true", "adapter_name_or_path=a"], "set create_new_adapter: true"),
    (["bf16=true", "fp16=true"], "'bf16' and 'fp16' are both true"),
    (["nonsense"], "override 'nonsense' must look like key=value"),
    (["infer_backend=vllm"], "config key 'infer_backend' must be one of huggingface; got 'vllm'"),
    (["export_device=gpu"], "config key 'export_device' must be one of cpu, auto; got 'gpu'"),
    (["lang=fr"], "config key 'lang' must be one of en, zh; got 'fr'"),
    (["n_shot=-1"], "config key 'n_shot' must be >= 0"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_bad_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora_rank: 8\nlora_alpha: [16\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_help():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f.name


def test_keys_are_unique_across_sections():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))


def _bounded_fields():
    return [(f.name, f.metadata["bounds"]) for cls in SECTIONS.values()
            for f in dataclasses.fields(cls) if "bounds" in f.metadata]


@pytest.mark.parametrize("key, bounds", _bounded_fields())
def test_every_bounded_key_refuses_values_outside(key, bounds):
    """Each key with an interval: its default lies inside, the edges behave as written, and a
    value just outside is one ConfigError line naming the key."""
    from tuneforge.config_checks import _parse_bounds

    low, high, low_closed, high_closed = _parse_bounds(bounds)
    kind = next(f.type for cls in SECTIONS.values() for f in dataclasses.fields(cls) if f.name == key)
    step = 1 if "int" in str(kind) else 1e-3
    above = high + (step if step == 1 else max(step, abs(high) * 1e-6))  # still counts at 1e10
    outside = [v for v in (low - step if low_closed else low, above if high_closed else high)
               if v not in (float("inf"), float("-inf"))]
    # a method's own key is read with its method only
    method = {"finetuning_type": METHOD_KEYS[key]["methods"][0]} if key in METHOD_KEYS else {}
    if key in STAGE_KEYS:  # and a stage's own key with its stage
        method = {"stage": STAGE_KEYS[key]["stages"][0]}
    method.update(optimizer_keys.read_with(key))  # and an optimizer's key with its optimizer (galore_rank)
    for value in outside:
        with pytest.raises(ConfigError, match=f"config key '{key}' must be "):
            load_config(None, {key: value, **method})
    if low_closed:
        load_config(None, {key: low, "max_steps": 1, **method})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_float_keys_refuse_non_finite(value):
    with pytest.raises(ConfigError, match="config key 'learning_rate' expects a finite number"):
        load_config(None, [f"learning_rate={value}"])
    with pytest.raises(ConfigError, match="config key 'loraplus_lr_ratio' expects a finite number"):
        load_config(None, [f"loraplus_lr_ratio={value}"])


def test_seed_outside_numpy_range():
    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=r"config key 'seed' must be in \[0, 4294967295\]"):
            load_config(None, {"seed": seed})


@pytest.mark.parametrize("override, expected", [
    ("output_dir=on", "on"),                  # YAML would read a bool
    ("output_dir=2024", "2024"),              # or a number
    ("output_dir=/tmp/a\nb", "/tmp/a\nb"),    # or fold the newline into a space
    ("output_dir=null", None),                # null still unsets
    ("dataset=123", "123"),                 # (template= must name a template: checked with the config)
])
def test_text_keys_keep_the_text_as_typed(override, expected):
    key = override.split("=", 1)[0]
    cfg = load_config(None, [override])
    section = "train" if key == "output_dir" else "data"
    assert getattr(getattr(cfg, section), key) == expected


def test_a_yaml_bool_for_a_text_key_says_to_quote_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: on\n")
    with pytest.raises(ConfigError, match=r"expects a string, got True \(YAML reads on/off/yes/no"):
        load_config(path)


@pytest.mark.parametrize("value, kind", [(["a", "b"], "a list"), ({"x": 1}, "a dict"),
                                         (None, "nothing (null)"), (True, "a bool")])
def test_placeholders_must_be_text(value, kind):
    with pytest.raises(ConfigError, match=f"the value of .name. must be text .* got {re.escape(kind)}"):
        load_config(None, {"placeholders": {"name": value}})
    assert load_config(None, {"placeholders": {"name": "Ember", "year": 2026}})


def test_an_adapter_listed_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="lists 'a' twice; it would be applied twice"):
        load_config(None, ["adapter_name_or_path=a,b,a"])
    (tmp_path / "ad").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ad")
    with pytest.raises(ConfigError, match=r"lists '.*link' twice \(as '.*ad'\)"):
        load_config(None, {"adapter_name_or_path": f"{tmp_path / 'ad'},{tmp_path / 'link'}"})


def test_export_quantization_belongs_to_gguf():
    with pytest.raises(ConfigError, match="'export_quantization' is for export_format: gguf"):
        load_config(None, ["export_quantization=q4_0"])
    load_config(None, ["export_quantization=q4_0", "export_format=gguf"])
    load_config(None, ["export_format=hf"])  # the default export_quantization conflicts with nothing


@pytest.mark.parametrize("alias, key", [("lr", "learning_rate"), ("epochs", "num_train_epochs"),
                                        ("modules_to_save", "additional_target"), ("r", "lora_rank")])
def test_other_tools_names_suggest_ours(alias, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{alias}'; did you mean '{key}'"):
        load_config(None, {alias: 1})


def test_every_alias_names_a_real_key():
    from tuneforge.config import KEY_ALIASES, all_fields

    assert set(KEY_ALIASES.values()) <= set(all_fields())
    assert not set(KEY_ALIASES) & set(all_fields())
