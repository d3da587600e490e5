"""Target selection, ranks and scalings match peft's choices; base names and trainability."""

import pytest
import torch
from adapter_testkit import make_model, peft_lora_modules
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file

from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
from tuneforge.adapters.core import lora_layers

CONFIGS = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=r"model\.layers\.\d\.(self_attn\.(q|k)_proj|mlp\.gate_proj)")),
    ("llama", dict(target_modules=["q_proj", "mlp.up_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["o_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], layers_to_transform=[1], layers_pattern=["h"])),
    ("llama", dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules="all-linear", exclude_modules=["k_proj", "model.layers.1.mlp.up_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*")),
    ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"], bias="all")),
    (
        "llama",
        dict(
            r=8, lora_alpha=16, target_modules="all-linear",
            rank_pattern={r"^model.layers.0.self_attn.q_proj": 2, "v_proj": 6, r"layers\.1\..*proj": 3},
            alpha_pattern={"o_proj": 32, r"mlp\.(up|down)_proj": 5},
        ),
    ),  # fmt: skip
    ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj"], bias="lora_only", use_rslora=True)),
]


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_same_modules_ranks_scalings_and_file_as_peft(tmp_path, kind, kw):
    ours = add_adapter(make_model(kind), LoraConfig(**kw))
    theirs = get_peft_model(make_model(kind), PeftLoraConfig(**kw))
    ref = peft_lora_modules(theirs)
    mine = dict(lora_layers(ours))
    assert sorted(mine) == sorted(ref)
    for path, layer in mine.items():
        assert layer.lora_r["default"] == ref[path].r["default"], path
        assert layer.lora_scaling["default"] == pytest.approx(ref[path].scaling["default"]), path

    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "peft"))
    a = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}


def test_all_linear_skips_head_without_get_output_embeddings():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
            self.lm_head = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.lm_head(self.body(x))

    model = add_adapter(Tiny(), LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(n for n, _ in lora_layers(model)) == ["body.0", "body.2"]
    model(torch.randn(3, 8)).sum().backward()


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(target_modules=["q_proj", "v_proj"]), {"lora_A.default", "lora_B.default"}),
        (dict(target_modules=["q_proj"], bias="lora_only"), {"lora_A.default", "lora_B.default", "q_proj.bias"}),
        (dict(target_modules=["o_proj"], bias="all"), {"lora_A.default", "lora_B.default", "bias"}),
        (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
         {"lora_A.default", "lora_B.default", "lm_head.modules_to_save.default.weight"}),
    ],
)  # fmt: skip
def test_base_names_unchanged_and_only_adapter_params_trainable(kw, expected):
    base_keys = list(make_model("qwen2").state_dict())
    model = add_adapter(make_model("qwen2"), LoraConfig(r=4, **kw))
    keys = list(model.state_dict())
    assert [k for k in keys if k in base_keys] == base_keys  # every base name kept, in order
    new = [k for k in keys if k not in base_keys]
    assert new
    assert all(".lora_A.default" in k or ".lora_B.default" in k or ".modules_to_save.default." in k for k in new)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n in trainable:
        assert any(n.endswith(e) for e in expected), n
    lora_params = {n for n in keys if ".lora_A." in n or ".lora_B." in n}
    assert lora_params <= set(trainable)
    if kw.get("bias") == "all":
        assert {n for n, _ in model.named_parameters() if n.endswith(".bias")} <= set(trainable)
    if kw.get("bias") == "lora_only":
        assert "model.layers.0.self_attn.k_proj.bias" not in trainable
        assert "model.layers.0.self_attn.q_proj.bias" in trainable
    if "modules_to_save" in kw:
        assert "lm_head.weight" not in trainable and "lm_head.modules_to_save.default.weight" in trainable


def test_a_list_name_that_matches_nothing_is_named_in_a_warning(caplog):
    """A typo beside a right name ('v_prj' next to 'q_proj') must not shrink the adapter silently:
    the adapter goes on q_proj (as peft) and one warning names v_prj; a clean list warns nothing."""
    with caplog.at_level("WARNING", logger="tuneforge"):
        model = add_adapter(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_prj"]))
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)}) == ["q_proj"]
    warned = [r.getMessage() for r in caplog.records if "matched no module" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("target_modules: v_prj matched no module"), warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="tuneforge"):
        add_adapter(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "model.layers.0.mlp.up_proj"]))
    assert not [r for r in caplog.records if "matched no module" in r.getMessage()]
