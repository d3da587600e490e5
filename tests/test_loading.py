"""loading.load_for_use, the one road to a model for chat / eval, api, export and training: what
each purpose asks of the loader (dtype, deferred quantization for LoftQ, template, adapters), and
that every adapter path is checked before the model loads. The model load itself is stubbed here;
tests/api/test_road.py and tests/quant/test_loftq.py run the real thing."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge import loading, models
from tuneforge.config import load_config
from tuneforge.errors import ModelError


class _Loaded(Exception):
    """Raised by the stub in place of loading a model: carries what the road asked for."""


@pytest.fixture
def asked(monkeypatch):
    def stub(model_args, dtype=None, defer_quantization=False):
        raise _Loaded({"dtype": dtype, "defer": defer_quantization})

    monkeypatch.setattr(models, "load_model_and_tokenizer", stub)


def _adapter(folder):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return str(folder)


def _ask(purpose, dtype=None, **values):
    with pytest.raises(_Loaded) as got:
        loading.load_for_use(load_config(None, values), purpose, dtype=dtype)
    return got.value.args[0]


@pytest.mark.parametrize("purpose", ["chat", "serve", "export"])
def test_every_adapter_path_is_checked_before_the_model_loads(asked, tmp_path, purpose):
    good = _adapter(tmp_path / "good")
    (tmp_path / "not_an_adapter").mkdir()
    (tmp_path / "weights.bin").write_text("x")
    for bad, words in ((tmp_path / "gone", "does not exist"),
                       (tmp_path / "not_an_adapter", "has no adapter_config.json"),
                       (tmp_path / "weights.bin", "is a file")):
        with pytest.raises(ModelError, match=words):
            loading.load_for_use(load_config(None, {"adapter_name_or_path": f"{good},{bad}"}), purpose)
    assert _ask(purpose, adapter_name_or_path=good)  # a good list reaches the model load


def test_each_purpose_asks_for_its_dtype_and_defers_quantization_only_for_loftq(asked, tmp_path):
    adapter = _adapter(tmp_path / "a")
    loftq = {"quantization_bit": 4, "loftq_iter": 2}
    assert _ask("chat") == {"dtype": None, "defer": False}  # None: infer_dtype
    assert _ask("serve", **loftq) == {"dtype": None, "defer": False}  # no adapter to wait for
    assert _ask("chat", adapter_name_or_path=adapter, **loftq) == {"dtype": None, "defer": True}
    assert _ask("serve", adapter_name_or_path=adapter, **loftq) == {"dtype": None, "defer": True}
    assert _ask("export", adapter_name_or_path=adapter) == {"dtype": torch.float32, "defer": False}
    assert _ask("export", adapter_name_or_path=adapter, **loftq) == {"dtype": torch.float32, "defer": True}
    # training: the new adapter may be LoftQ's, and prepare_model attaches adapter_name_or_path
    assert _ask("train", torch.bfloat16, **loftq) == {"dtype": torch.bfloat16, "defer": True}
    assert _ask("train", torch.float32, adapter_name_or_path=str(tmp_path / "gone")) == {
        "dtype": torch.float32, "defer": False}


def test_an_unknown_purpose_is_a_value_error():
    with pytest.raises(ValueError, match="unknown purpose 'merge'; one of chat, serve, export, train"):
        loading.load_for_use(load_config(None, {}), "merge")


def test_chat_stacks_the_adapters_and_is_ready_to_generate(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters import LoraConfig, add_adapter, list_adapters, save_adapter

    for name in ("first", "last"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
        save_adapter(model, tmp_path / name)
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir),
                             "adapter_name_or_path": f"{tmp_path / 'first'},{tmp_path / 'last'}"})
    chat = loading.load_for_use(cfg, "chat")
    assert list(list_adapters(chat.model)) == ["default"]  # the first merged, the last kept
    assert not chat.model.training and chat.model.config.use_cache and chat.served == {}
    served = loading.load_for_use(cfg, "serve")
    assert served.served == {"first": "serve_0", "last": "serve_1"}
    assert list(list_adapters(served.model)) == ["serve_0", "serve_1"]
    train = loading.load_for_use(cfg, "train", dtype=torch.float32)  # prepare_model attaches them
    assert list_adapters(train.model) == {} and not train.model.config.use_cache
