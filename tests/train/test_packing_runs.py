"""Packing in training runs: the probe, the choice of collator, and runs from YAML. OPT is the
honest counter-example: it takes position_ids but does not give them to its mask, so a packed
row attends across examples there and the probe must refuse it."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.data import PackingCollator, PaddingCollator
from tuneforge.errors import ConfigError
from tuneforge.train.packed_attention import NAME, use_packed_attention
from tuneforge.train.packing import choose_collator, probe_packing
from tuneforge.workflows import train


def tiny_opt(vocab: int = 256, **overrides):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128,
                       dropout=0.0, **overrides)
    return OPTForCausalLM(config).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


def data_args(**values):
    return load_config(None, values).data


def test_choice_on_a_model_where_packing_is_exact():
    model = tiny_llama()
    assert model.config.use_cache is True
    choice = choose_collator(data_args(), model, pad_token_id=0)  # packing empty: auto
    assert isinstance(choice.collate, PackingCollator) and "packing: on" in choice.note
    assert model.config._attn_implementation == NAME and model.config.use_cache is False
    choice.undo()
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is True
    choice = choose_collator(data_args(packing=False), model, pad_token_id=0)
    assert isinstance(choice.collate, PaddingCollator) and choice.note is None
    assert model.config._attn_implementation == "sdpa"


def test_probe_refuses_a_model_whose_mask_ignores_position_ids():
    model = tiny_opt()
    assert "packed logits differ from padded ones" in probe_packing(model)
    # bf16 rounding is tolerated, attention across examples is not
    assert "packed logits differ" in probe_packing(tiny_opt().to(torch.bfloat16))
    llama = tiny_llama().to(torch.bfloat16)
    use_packed_attention(llama)
    assert probe_packing(llama) is None
    choice = choose_collator(data_args(), model, pad_token_id=0)
    assert isinstance(choice.collate, PaddingCollator) and "packing: off" in choice.note
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is True
    for key in ("packing", "neat_packing"):
        with pytest.raises(ConfigError, match=f"config key '{key}' is true, but packed rows do "
                                              "not reproduce the padded batch"):
            choose_collator(data_args(**{key: True}), model, pad_token_id=0)


def test_probe_reports_a_model_that_cannot_take_position_ids():
    class NoPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 4)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, attention_mask=None):  # no position_ids
            return SimpleNamespace(logits=self.embed(input_ids))

    assert "a probe forward failed: TypeError" in probe_packing(NoPositions())


def _yaml(tmp_path, model_dir, data_dir, name, extra=""):
    out = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""model_name_or_path: {model_dir}
dataset: arith
dataset_dir: {data_dir}
output_dir: {out}
cutoff_len: 64
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
learning_rate: 5.0e-3
max_steps: 6
logging_steps: 1
lora_rank: 4
val_size: 4
eval_on_start: true
save_strategy: "no"
disable_tqdm: true
bf16: false
{extra}""")
    return path, out


def _losses(out):
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in log if "loss" in e], [e["eval_loss"] for e in log if "eval_loss" in e]


def test_a_packed_run_trains_and_equals_the_padded_run(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    caplog.set_level(logging.INFO, logger="tuneforge")
    packed_yaml, packed_out = _yaml(tmp_path, tiny_model_dir, tiny_data_dir, "packed", "packing: true\n")
    padded_yaml, padded_out = _yaml(tmp_path, tiny_model_dir, tiny_data_dir, "padded", "packing: false\n")
    train(load_config(packed_yaml))
    assert "packing: on" in caplog.text
    train(load_config(padded_yaml))
    (packed_train, packed_eval), (padded_train, padded_eval) = _losses(packed_out), _losses(padded_out)
    assert packed_train[-1] < packed_train[0] and packed_eval[-1] < packed_eval[0]
    assert packed_train == pytest.approx(padded_train, rel=1e-5)
    assert packed_eval == pytest.approx(padded_eval, rel=1e-5)
    packed, padded = load_file(packed_out / "adapter_model.safetensors"), \
        load_file(padded_out / "adapter_model.safetensors")
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_opt_dir(tmp_path_factory, default_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = tiny_opt(vocab=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-opt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_run_on_such_a_model_pads_or_stops_before_writing(tiny_opt_dir, tiny_data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tuneforge")
    path, out = _yaml(tmp_path, tiny_opt_dir, tiny_data_dir, "strict", "packing: true\n")
    with pytest.raises(ConfigError, match="config key 'packing' is true"):
        train(load_config(path))
    assert not out.exists()  # failed before output_dir was touched
    path, out = _yaml(tmp_path, tiny_opt_dir, tiny_data_dir, "auto")  # packing empty: auto
    train(load_config(path, ["max_steps=2"]))
    assert "packing: off, padding instead (packed logits differ" in caplog.text
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.integration
def test_the_default_model_packs_exactly(shared_data_dir):
    """SmolLM2 (fp32, LoRA) on 4 alpaca_en_demo examples: the probe passes, and the packed
    row's loss and logits at every real position equal the padded batch's."""
    from tuneforge.data import load_datasets
    from tuneforge.models import load_model_and_tokenizer
    from tuneforge.train.methods import prepare_model
    from tuneforge.train.token_loss import TokenLoss

    cfg = load_config(None, {"dataset": "alpaca_en_demo", "dataset_dir": str(shared_data_dir),
                             "max_samples": 4, "cutoff_len": 128, "bf16": False})
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=torch.float32)
    examples = load_datasets(cfg.data, tokenizer, seed=0).train[:4]
    model, _ = prepare_model(model, tokenizer, cfg)
    padded = PaddingCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        reference = model(input_ids=padded["input_ids"],
                          attention_mask=padded["attention_mask"]).logits
        ref_loss, ref_count = TokenLoss(model, model, "sparse")(padded)
    choice = choose_collator(cfg.data, model, tokenizer.pad_token_id)
    assert isinstance(choice.collate, PackingCollator)
    packed = choice.collate(examples)
    with torch.no_grad():
        got = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        loss, count = TokenLoss(model, model, "sparse")(packed)
    start = 0
    for row, n in enumerate(padded["attention_mask"].sum(1).tolist()):
        torch.testing.assert_close(got[start:start + n], reference[row, :n], atol=2e-4, rtol=1e-4)
        start += n
    assert count == ref_count
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-5)


def test_the_probes_run_on_one_thread_and_give_the_others_back():
    from tuneforge.train.fused_loss import probe

    model, seen = tiny_llama(), []
    use_packed_attention(model)
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert probe_packing(model) is None
        ids = torch.tensor([[1, 2, 3, 4]])
        assert probe(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) is None
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}
