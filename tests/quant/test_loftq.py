"""LoftQ: the quantized base plus the adapter's start approximates the fp weights better than the
quantized base alone, the codes are exactly the layer's, and a LoftQ run trains, resumes and
reloads (chat / export / peft) onto the same rebuilt base."""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch
from adapter_testkit import logits, make_model, tokens
from safetensors.torch import load_file

from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
from tuneforge.errors import ConfigError
from tuneforge.quant import QuantizationConfig, QuantLinear, dequantize_model, quantize_model
from tuneforge.quant import backends
from tuneforge.quant.loftq import _dequantize, apply_loftq, loftq_decompose

TOL = 1e-5
QCFGS = {
    "nf4": QuantizationConfig(bits=4, compute_dtype="float32"),
    "int8": QuantizationConfig(bits=8, compute_dtype="float32"),
}


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(128, 256, generator=g) * 0.02
    # real-ish: heavy-tailed entries (Student t, 3 dof) plus a few strong directions
    t = torch.distributions.StudentT(3.0).sample((128, 256)) * 0.02
    spikes = torch.randn(128, 4, generator=g) @ torch.randn(4, 256, generator=g) * 0.01
    return {"gaussian": gauss, "heavy_tailed": t + spikes}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("weight", ["gaussian", "heavy_tailed"])
def test_error_falls_strictly_with_iterations(kind, weight):
    torch.manual_seed(0)
    W, qcfg, s = _weights()[weight], QCFGS[kind], 2.0
    errors = []
    for n in (0, 1, 2, 4):
        q, A, B = loftq_decompose(W, 8, s, qcfg, n)
        errors.append(torch.linalg.norm(W - (_dequantize(q) + s * B @ A)).item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # iteration 0 is plain quantization by tuneforge's own quantizer, with no adapter
    backend = backends.resolve(qcfg.backend, W.device, qcfg.bits)
    plain = backends.quantize(W, qcfg.bits, qcfg.quant_type, qcfg.blocksize, qcfg.bits == 4, backend)
    assert errors[0] == pytest.approx(torch.linalg.norm(W - _dequantize(plain)).item(), rel=1e-6)


def test_rank_split_and_scaling():
    W = _weights()["gaussian"]
    q, A, B = loftq_decompose(W, 8, 0.5, QCFGS["nf4"], 1)
    residual = W - _dequantize(q)
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    torch.testing.assert_close(0.5 * B @ A, (U[:, :8] * S[:8]) @ Vh[:8], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(A.norm(dim=1), S[:8].sqrt(), atol=1e-6, rtol=1e-5)  # sqrt(S) on each side


def _lora(model, **kw):
    cfg = dict(r=8, lora_alpha=16, target_modules="all-linear")
    cfg.update(kw)
    return add_adapter(model, LoraConfig(**cfg))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_apply_loftq_beats_plain_qlora_and_stores_the_decomposed_codes(kind):
    qcfg = QCFGS[kind]
    ids = tokens()
    fp = make_model("llama")
    want = logits(fp, ids)
    original = {n: m.weight.detach().clone() for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)}

    plain = _lora(quantize_model(make_model("llama"), config=qcfg))  # B = 0: the quantized base alone
    loftq = apply_loftq(_lora(make_model("llama")), "default", qcfg, 2)
    assert _rel(logits(loftq, ids), want) < 0.8 * _rel(logits(plain, ids), want)

    layer = loftq.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and not isinstance(loftq.lm_head, QuantLinear)
    q, A, B = loftq_decompose(original["model.layers.1.mlp.down_proj"], 8, 2.0, qcfg, 2)
    for mine, theirs in zip(layer.codes().tensors().values(), q.tensors().values()):
        assert torch.equal(mine, theirs)
    assert torch.equal(layer.lora_A["default"], A) and torch.equal(layer.lora_B["default"], B)
    assert layer.lora_A["default"].requires_grad and not layer.qweight.requires_grad
    assert loftq.tuneforge_quantization is qcfg  # non-adapted linears are quantized too
    assert sum(isinstance(m, QuantLinear) for m in loftq.modules()) == len(original) - 1  # all but lm_head


def test_dora_magnitude_is_reinitialised_on_the_loftq_base():
    ids = tokens()
    lora = apply_loftq(_lora(make_model("llama")), "default", QCFGS["nf4"], 1)
    dora = apply_loftq(_lora(make_model("llama"), use_dora=True), "default", QCFGS["nf4"], 1)
    # m = ||dequant(Q) + s B A|| per row: a fresh DoRA adapter computes what its LoRA does
    assert (logits(dora, ids) - logits(lora, ids)).abs().max().item() <= TOL
    layer = dora.model.layers[0].self_attn.q_proj
    row = (layer.dequantize(torch.float32) + 2.0 * layer.lora_B["default"] @ layer.lora_A["default"]).norm(dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), row, atol=1e-5, rtol=1e-5)
    assert layer.lora_magnitude_vector["default"].requires_grad


def test_saved_config_records_loftq_and_peft_loads_it_as_a_plain_adapter(tmp_path):
    from peft import PeftModel

    from tuneforge.adapters import load_adapter, unload

    ids = tokens()
    model = apply_loftq(_lora(make_model("llama")), "default", QCFGS["nf4"], 2)
    save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["init_lora_weights"] is True
    assert raw["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2, "quant_type": "nf4", "blocksize": 64,
                                   "double_quant": True}
    ours = logits(model, ids)
    base = dequantize_model(unload(copy.deepcopy(model), merge=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "loftq_config specified but will be ignored"
        reference = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    assert (logits(reference, ids) - ours).abs().max().item() <= TOL
    # tuneforge reads the record back into the adapter's config
    again = load_adapter(make_model("llama"), tmp_path / "a")
    from tuneforge.adapters import list_adapters

    assert list_adapters(again)["default"].loftq_config["loftq_iter"] == 2


# ---- real runs ----------------------------------------------------------------------------------
def _cfg(model_dir, data_dir, out, **overrides):
    from tuneforge.config import load_config

    values = {
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "max_steps": 6, "logging_steps": 1,
        "save_steps": 100, "lora_rank": 4, "lora_target": "all", "disable_tqdm": True,
        "eval_on_start": False, "bf16": False, "quantization_bit": 4, "loftq_iter": 1,
        "compute_dtype": "float32",
    }
    values.update(overrides)
    return load_config(None, values)


def _ids():
    return torch.tensor([[1, 520, 33, 4077, 17, 902, 3, 88, 250, 7]])


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_run_trains_and_reloads_onto_the_same_base(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                         iters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge import workflows
    from tuneforge.adapters import unload
    from tuneforge.infer import ChatModel
    from tuneforge.train import methods

    captured = {}
    prepare = methods.prepare_model

    def keep(model, *args, **kwargs):
        captured["model"], setup = prepare(model, *args, **kwargs)
        return captured["model"], setup

    monkeypatch.setattr(methods, "prepare_model", keep)
    out = tmp_path / "out"
    workflows.train(_cfg(tiny_model_dir, tiny_data_dir, out, loftq_iter=iters))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0], losses
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["loftq_config"]["loftq_iter"] == iters and raw["init_lora_weights"] is True
    assert all("lora_" in k for k in load_file(str(out / "adapter_model.safetensors")))

    trained = captured["model"].eval()
    assert any(isinstance(m, QuantLinear) for m in trained.modules())
    want = logits(trained, _ids())

    # chat: quantization_bit + loftq_iter rebuild the LoftQ base, then the file's A/B go on top
    chat_cfg = _cfg(tiny_model_dir, tiny_data_dir, out, adapter_name_or_path=str(out), infer_dtype="float32",
                    loftq_iter=iters)
    chat = ChatModel(chat_cfg).model
    chat.config.use_cache = False
    assert (logits(chat, _ids()) - want).abs().max().item() <= TOL
    # one iteration quantizes W itself; from two on, the base differs from plain quantization's,
    # and the same file on the plainly quantized base computes something else
    from tuneforge.adapters import load_adapter

    plain = quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config=QCFGS["nf4"])
    off = (logits(load_adapter(plain, out), _ids()) - want).abs().max().item()
    assert off > 1e-3 if iters > 1 else off <= TOL

    # peft, given that base dequantized, computes the same from the file
    base = dequantize_model(unload(copy.deepcopy(chat), merge=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(base, str(out)).eval()
    assert (logits(reference, _ids()) - want).abs().max().item() <= 1e-4

    # export merges into dequant(LoftQ base): the merged model computes the trained one
    workflows.export(_cfg(tiny_model_dir, tiny_data_dir, out, adapter_name_or_path=str(out), loftq_iter=iters,
                          export_dir=str(tmp_path / "merged"), export_dtype="float32"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged, _ids()) - want).abs().max().item() <= 1e-4

    # without loftq_iter the base would be plainly quantized: refused with the key to set
    with pytest.raises(ConfigError, match=f"loftq_iter: {iters} in the config"):
        ChatModel(_cfg(tiny_model_dir, tiny_data_dir, out, adapter_name_or_path=str(out), loftq_iter=0))
    with pytest.raises(ConfigError, match="LoftQ base of 4-bit nf4.*asks for 8-bit"):
        ChatModel(_cfg(tiny_model_dir, tiny_data_dir, out, adapter_name_or_path=str(out), quantization_bit=8))
    # a copy of the LoftQ adapter listed before it would be merged into the original weights
    first = tmp_path / "first"
    shutil.copytree(out, first)
    with pytest.raises(ConfigError, match="only be the last entry"):
        ChatModel(_cfg(tiny_model_dir, tiny_data_dir, out, adapter_name_or_path=f"{first},{out}"))


def test_resuming_a_loftq_run_rebuilds_the_same_base(tiny_model_dir, tiny_data_dir, tmp_path):
    from tuneforge.workflows import train

    common = dict(max_steps=4, save_steps=2, loftq_iter=2)
    train(_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "full", **common))
    part = tmp_path / "part"
    train(_cfg(tiny_model_dir, tiny_data_dir, part, **common))
    shutil.rmtree(part / "checkpoint-4")  # pretend the run died after step 2
    train(_cfg(tiny_model_dir, tiny_data_dir, part, resume_from_checkpoint=str(part / "checkpoint-2"), **common))
    full, resumed = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "full", part))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_training_a_loftq_adapter_further_starts_from_the_trained_model(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                         monkeypatch):
    from tuneforge.train import methods
    from tuneforge.workflows import train

    seen = []
    prepare = methods.prepare_model

    def keep(model, *args, **kwargs):
        model, setup = prepare(model, *args, **kwargs)
        seen.append((model, logits(model.eval(), _ids())))
        return model, setup

    monkeypatch.setattr(methods, "prepare_model", keep)
    first = tmp_path / "first"
    train(_cfg(tiny_model_dir, tiny_data_dir, first, max_steps=2, loftq_iter=2))
    trained = logits(seen[0][0].eval(), _ids())
    train(_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "second", max_steps=1, loftq_iter=2,
               adapter_name_or_path=str(first)))
    model, start = seen[1]
    assert (start - trained).abs().max().item() <= TOL
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)
