"""`tuneforge api` loads its model by the road chat uses (loading.load_for_use): a LoftQ adapter is
served on the LoftQ base it was trained on, rebuilt from the fp weights, and answers as
`tuneforge chat` does; plain adapters on a quantized base serve as chat runs them; a LoftQ adapter
beside others, or without the keys that rebuild its base, is refused in one line."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import save_moved_adapter
from tuneforge.adapters.routing import route_adapters
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.infer import ChatModel
from tuneforge.infer.engine import Engine

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]
IDS = torch.tensor([[1, 520, 33, 4077, 17, 902, 3, 88, 250, 7]])
TOL = 1e-5


def _adapter(model_dir, out, seed, loftq_iter=0):
    """A LoRA adapter with random B (so it changes the output); with loftq_iter, started by LoftQ
    on a 4-bit nf4 base (two iterations and more give a base that plain quantization does not)."""
    from tuneforge.adapters import LoraConfig
    from tuneforge.adapters.loftq import apply_loftq
    from tuneforge.quant import QuantizationConfig

    def loftq(model):
        if loftq_iter:
            apply_loftq(model, "default", QuantizationConfig(bits=4, compute_dtype="float32"), loftq_iter)

    return save_moved_adapter(model_dir, out, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), seed,
                              scale=0.05, moved=("lora_B",), prepare=loftq)


def _cfg(model_dir, adapters, **values):
    return load_config(None, {"model_name_or_path": str(model_dir), "adapter_name_or_path": adapters,
                              "do_sample": False, "infer_dtype": "float32", "compute_dtype": "float32",
                              **values})


def _logits(model, adapter=None):
    with torch.no_grad():
        if adapter is None:
            return model(IDS, use_cache=False).logits
        with route_adapters(model, [adapter]):
            return model(IDS, use_cache=False).logits


def _served(engine, name, max_tokens=12):
    return "".join(engine.generate(name, MESSAGES, temperature=0, max_tokens=max_tokens))


@pytest.fixture(scope="module")
def loftq(tiny_model_dir, tmp_path_factory):
    return _adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "loftq", 3, loftq_iter=2)


def test_a_loftq_adapter_is_served_on_its_own_base_as_chat_runs_it(tiny_model_dir, loftq):
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters import load_adapter
    from tuneforge.quant import QuantizationConfig, quantize_model

    cfg = _cfg(tiny_model_dir, str(loftq), quantization_bit=4, loftq_iter=2)
    chat = ChatModel(cfg)
    want = _logits(chat.model)
    engine = Engine.from_config(cfg)
    assert engine.model_ids() == [engine.base_name, "loftq"]
    got = _logits(engine.model, engine.adapters["loftq"])
    assert (got - want).abs().max().item() <= TOL
    assert _served(engine, "loftq") == chat.answer(MESSAGES, max_new_tokens=12)
    # what the API did before: the file's A/B on the plainly quantized base compute something else
    plain = quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           config=QuantizationConfig(bits=4, compute_dtype="float32"))
    assert (_logits(load_adapter(plain, loftq)) - want).abs().max().item() > 1e-3


def test_a_loftq_adapter_without_its_keys_or_beside_another_is_refused(tiny_model_dir, loftq, tmp_path):
    with pytest.raises(ConfigError, match="set quantization_bit: 4 and loftq_iter: 2 in the config"):
        Engine.from_config(_cfg(tiny_model_dir, str(loftq)))
    with pytest.raises(ConfigError, match="set quantization_bit: 4 and loftq_iter: 2 in the config"):
        Engine.from_config(_cfg(tiny_model_dir, str(loftq), quantization_bit=4))
    other = _adapter(tiny_model_dir, tmp_path / "other", 4)
    for adapters in (f"{other},{loftq}", f"{loftq},{other}"):
        with pytest.raises(ConfigError) as err:
            Engine.from_config(_cfg(tiny_model_dir, adapters, quantization_bit=4, loftq_iter=2))
        assert str(err.value) == (
            f"adapter '{loftq}' was trained on a LoftQ base built for it alone, which the base model "
            "and the other adapters cannot share; serve it by itself (adapter_name_or_path: that "
            "folder only)")


@pytest.mark.parametrize("loftq_iter", [0, 1])
def test_plain_adapters_side_by_side_on_a_quantized_base_answer_as_chat(tiny_model_dir, tmp_path,
                                                                         loftq_iter):
    # loftq_iter with adapters that did not start from LoftQ: their base is quantized plainly
    a, b = (_adapter(tiny_model_dir, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2)))
    engine = Engine.from_config(_cfg(tiny_model_dir, f"{a},{b}", quantization_bit=4,
                                     loftq_iter=loftq_iter))
    assert engine.model_ids() == [engine.base_name, "a", "b"]
    for name, path in (("a", a), ("b", b)):
        chat = ChatModel(_cfg(tiny_model_dir, str(path), quantization_bit=4))
        got = _logits(engine.model, engine.adapters[name])
        assert (got - _logits(chat.model)).abs().max().item() <= TOL
        assert _served(engine, name) == chat.answer(MESSAGES, max_new_tokens=12)
    base = ChatModel(_cfg(tiny_model_dir, None, quantization_bit=4))
    assert (_logits(engine.model, "__base__") - _logits(base.model)).abs().max().item() <= TOL


@pytest.mark.parametrize("purpose", ["chat", "export", "serve"])
def test_a_reward_models_adapter_is_used_with_a_warning_about_its_value_head(tiny_model_dir, tmp_path, caplog,
                                                                          purpose):
    from safetensors.torch import save_file

    from tuneforge.loading import load_for_use

    path = _adapter(tiny_model_dir, tmp_path / "rm", 5)
    save_file({"v_head.summary.weight": torch.zeros(1, 8), "v_head.summary.bias": torch.zeros(1)},
              str(path / "value_head.safetensors"))
    with caplog.at_level("WARNING", logger="tuneforge"):
        load_for_use(_cfg(tiny_model_dir, str(path)), purpose)
    assert [r.getMessage() for r in caplog.records if "value head" in r.getMessage()] == [
        f"adapter '{path}' is a reward model's (stage: rm): {purpose} uses its adapter and ignores its value head "
        "(value_head.safetensors); to score texts use tuneforge.train.reward.load_reward_model"]


def test_two_adapters_of_different_methods_on_one_layer_are_refused_as_a_clash(tiny_model_dir, tmp_path):
    """one layer takes adapters of one method: the line names the clash, not a model mismatch"""
    import tuneforge
    from tuneforge.errors import ModelError
    from tuneforge.loading import load_for_use

    lora = _adapter(tiny_model_dir, tmp_path / "lora", 6)
    ia3 = save_moved_adapter(tiny_model_dir, tmp_path / "ia3", tuneforge.IA3Config(), 7)
    with pytest.raises(ModelError) as refused:
        load_for_use(_cfg(tiny_model_dir, f"{lora},{ia3}"), "serve")
    assert str(refused.value).startswith(f"adapter '{ia3}' cannot be added to LlamaForCausalLM beside the "
                                         f"adapter(s) '{lora}' already on it: ")
    assert "already carries a lora adapter" in str(refused.value)
