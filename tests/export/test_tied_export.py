"""An export computes what the trained model (base + adapter, unmerged) computes, also when the
adapter trained one side of a tied embedding (tie_word_embeddings, as SmolLM2): HF folders
loaded back by transformers match to 1e-5, GGUF files to f16 rounding."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.workflows import export

IDS = torch.tensor([[1, 17, 230, 4012, 9, 77, 1200, 2]])

# adapter kind -> (LoraConfig fields, whether the export must be untied)
KINDS = {
    "head_trained": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), True),
    "embedding_trained": (dict(target_modules=["v_proj"], modules_to_save=["embed_tokens"]), True),
    "both_trained": (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), True),
    "lora_on_embedding": (dict(target_modules=["embed_tokens", "q_proj"]), True),
    "lora_on_head": (dict(target_modules=["lm_head"]), True),
    "dora": (dict(target_modules="all-linear", use_dora=True), False),
    "lora_inside_only": (dict(target_modules=["q_proj", "down_proj"], use_rslora=True), False),
}


def _make_adapter(base, folder, fields):
    """An adapter whose every trained tensor differs from a fresh one (as after training)."""
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters import LoraConfig, add_adapter, save_adapter

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **fields))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter(model, folder)
    return folder


def _trained_logits(base, adapter):
    """What the trained model computes: base + adapter as tuneforge runs it, nothing merged."""
    from tuneforge.workflows import chat_model

    cfg = load_config(None, {"model_name_or_path": str(base), "adapter_name_or_path": str(adapter),
                             "infer_dtype": "float32"})
    with torch.no_grad():
        return chat_model(cfg).model(IDS).logits


def _export(base, adapter, out, **extra):
    return export(load_config(None, {"model_name_or_path": str(base), "adapter_name_or_path": str(adapter),
                                     "export_dir": str(out), "export_dtype": "float32", **extra}))


@pytest.mark.parametrize("kind", list(KINDS))
def test_hf_export_computes_what_the_trained_model_does(tiny_model_dir, tmp_path, kind):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    fields, untied = KINDS[kind]
    adapter = _make_adapter(tiny_model_dir, tmp_path / "adapter", fields)
    out = _export(tiny_model_dir, adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, _trained_logits(tiny_model_dir, adapter),
                                   atol=1e-5, rtol=1e-5)
    config = json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert config["tie_word_embeddings"] is (not untied)
    assert ("lm_head.weight" in saved) is untied  # tied: one tensor, as the base had it


def test_gguf_export_of_a_trained_head_has_its_own_output_weight(tiny_model_dir, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    adapter = _make_adapter(tiny_model_dir, tmp_path / "adapter", KINDS["head_trained"][0])
    hf = AutoModelForCausalLM.from_pretrained(_export(tiny_model_dir, adapter, tmp_path / "hf"),
                                              dtype=torch.float32)
    out = _export(tiny_model_dir, adapter, tmp_path / "gguf", export_format="gguf")
    path = out / "gguf.f16.gguf"
    assert "output.weight" in {t.name for t in GGUFReader(path).tensors}
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32)
    reference = hf.half().float()  # the f16 rounding the file applies
    with torch.no_grad():
        a, b = back(IDS).logits, reference(IDS).logits
        trained = _trained_logits(tiny_model_dir, adapter)
    assert (a - b).abs().max() < 1e-3 * max(b.abs().max().item(), 1.0)
    # the old export (trained head copied into the embedding, still tied) was far off
    assert (a - trained).abs().max() < 0.05 * trained.abs().max()
