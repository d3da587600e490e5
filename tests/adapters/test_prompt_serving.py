"""The continuous batcher (infer/batcher.py) with virtual-token adapters: rows of a prompt-tuning,
a prefix-tuning, a P-tuning, a UniPELT (gated prefix) and a LoRA adapter and the base share batches, prefilled together and
joining a running batch, and each answers what greedy generate() gives for it alone."""

from __future__ import annotations

import torch
from test_matrix import build

from tuneforge.adapters import (
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    UniPeltConfig,
    add_adapter,
    route_adapters,
)
from tuneforge.infer.batcher import END, Batcher, Job

NEW = 6


def model_with_adapters():
    model = build("llama")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=3), "p")
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True), "x")
    add_adapter(model, PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="LSTM"), "e")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "l")
    add_adapter(model, UniPeltConfig(r=4, target_modules=["k_proj"], num_virtual_tokens=4, adapter_size=8,
                                     init_weights=None), "u")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model.eval()


def alone(model, name: str, ids: torch.Tensor) -> list[int]:
    with torch.no_grad(), route_adapters(model, [name]):
        out = model.generate(input_ids=ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def collect(job: Job) -> list[int]:
    tokens = []
    while (item := job.out.get(timeout=60)) is not END:
        assert not isinstance(item, Exception), item
        tokens.append(item)
    return tokens


def test_batcher_answers_each_virtual_token_adapter_as_alone():
    model = model_with_adapters()
    g = torch.Generator().manual_seed(5)
    # the UniPELT row that runs first is left-padded when the longer rows join: its prefix moves
    names = ["p", "x", "u", "e", "l", "__base__", "x", "u"]
    prompts = [torch.randint(1, 256, (1, n), generator=g) for n in (5, 8, 3, 3, 6, 4, 7, 9)]
    expect = [alone(model, n, ids) for n, ids in zip(names, prompts)]
    assert len({tuple(e) for e in expect}) >= 4  # the adapters answer differently
    batcher = Batcher(model, pad_token_id=0, eos_ids=set(), routed=True, max_batch_size=8)
    kwargs = {"max_new_tokens": NEW, "do_sample": False}
    jobs = [Job(ids, name, dict(kwargs)) for name, ids in zip(names, prompts)]
    with batcher.lock:  # the first three are prefilled together
        batcher.submit(*jobs[:3])
    first = [jobs[0].out.get(timeout=60)]  # ... and running when the others join
    batcher.submit(*jobs[3:])
    got = [first + collect(jobs[0])] + [collect(j) for j in jobs[1:]]
    assert got == expect
    assert batcher.joined_running >= 1
