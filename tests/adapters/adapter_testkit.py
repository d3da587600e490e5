"""Tiny transformers models from configs (fixed seeds) and helpers shared by tests/adapters."""

from __future__ import annotations

import torch

VOCAB = 256


def make_model(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh tiny model; the same (kind, seed) always gives the same weights."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, **overrides,
        )  # fmt: skip
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":  # q/k/v projections carry biases
        cfg = Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, **overrides,
        )  # fmt: skip
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random (non-zero) biases so that bias training shows up
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(std=0.1)
    elif kind == "gpt2":  # transformers' Conv1D layers
        cfg = GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides,
        )  # fmt: skip
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def tokens(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_steps(model: torch.nn.Module, steps: int = 3, lr: float = 1e-2, opt: str = "adamw") -> None:
    """A few optimizer steps on the trainable parameters (random tokens, LM loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    optim = torch.optim.AdamW(params, lr=lr) if opt == "adamw" else torch.optim.SGD(params, lr=lr)
    model.train()
    for step in range(steps):
        ids = tokens(seed=100 + step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()


def fit_losses(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW on the trainable parameters, the same batch every step; the loss of each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def peft_lora_modules(peft_model) -> dict[str, torch.nn.Module]:
    """peft's LoRA layers by base-model module name."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    return {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}


def copy_ours_to_peft(ours: torch.nn.Module, peft_model, name: str = "default", peft_name: str = "default") -> None:
    from tuneforge.adapters.core import lora_layers

    theirs = peft_lora_modules(peft_model)
    with torch.no_grad():
        for path, layer in lora_layers(ours, name):
            theirs[path].lora_A[peft_name].weight.copy_(layer.lora_A[name])
            theirs[path].lora_B[peft_name].weight.copy_(layer.lora_B[name])


def assert_export_equals_chat(model_dir, adapter_dir, export_dir) -> None:
    """`tuneforge export` of the trained adapter (merged, fp32) holds no adapter weights and gives the
    logits `tuneforge chat` gives with the adapter unmerged, which differ from the base model's."""
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load_config
    from tuneforge.workflows import chat_model, export

    values = {"model_name_or_path": str(model_dir), "adapter_name_or_path": str(adapter_dir),
              "infer_dtype": "float32", "export_dir": str(export_dir), "export_dtype": "float32"}
    merged = AutoModelForCausalLM.from_pretrained(export(load_config(None, values))).eval()
    assert not any("lora" in name for name in merged.state_dict())
    chat = chat_model(load_config(None, values))
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids).logits
        got, want = merged(ids).logits, chat.model(ids).logits
    assert (want - plain).abs().max() > 1e-4, "the trained adapter changes nothing"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
