"""Adaptive (MoE) LoRA (`finetuning_type: lora_moe`, or lora with `adaptive: moe`; lora_moe.py).

Oracles: the routing weights of every token sum to one over exactly top_k non-zero experts, which
are the router's top_k with their softmax probabilities renormalised; one expert with top_k 1 is
plain LoRA (same tensors: outputs and gradients, on Llama, Qwen2 and GPT-2's Conv1D); the layer's
output is the hand sum base(x) + sum_e w_e s B_e A_e x; the load-balancing loss equals the hand
formula num_experts * sum_e f_e P_e (token loops) and its gradient reaches the router; saving and
loading give equal outputs; merging is refused in one line; a quantized base gives what the
dequantized one gives.
"""

from __future__ import annotations

import json

import pytest
import torch
from adapter_testkit import make_model, tokens
from torch import nn

from tuneforge import LoraConfig, LoraMoeConfig
from tuneforge.adapters import add_adapter, load_adapter, merge_adapters, save_adapter
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.lora_moe import LoraMoeLayer, aux_loss, balance_loss, route
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.quant import dequantize_model, quantize_model

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "o_proj"],
           "gpt2": ["c_attn", "c_fc"]}


class Toy(nn.Module):
    def __init__(self, d_in: int = 6, d_out: int = 5) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def _toy(**kw) -> tuple[Toy, LoraMoeLayer]:
    torch.manual_seed(0)
    model = add_adapter(Toy(), LoraMoeConfig(r=2, lora_alpha=3, target_modules=["proj"], init_lora_weights=False, **kw))
    return model, model.proj


@pytest.mark.parametrize("num_experts, top_k", [(4, 2), (5, 3), (3, 1), (3, 3)])
def test_routing_weights_sum_to_one_over_exactly_top_k_experts(num_experts, top_k):
    _, layer = _toy(num_experts=num_experts, top_k=top_k)
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(1))
    weights, probs, chosen = layer.routing("default", x)
    assert weights.shape == probs.shape == (3, 7, num_experts) and chosen.shape == (3, 7, top_k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 7))
    assert ((weights > 0).sum(-1) == top_k).all()
    # the non-zero ones are the router's top_k, their softmax probabilities renormalised
    p = torch.softmax(x @ layer.lora_router["default"].detach().t(), -1)
    for w_tok, p_tok in zip(weights.reshape(-1, num_experts), p.reshape(-1, num_experts)):
        top = sorted(range(num_experts), key=lambda e: -p_tok[e].item())[:top_k]
        assert set(torch.nonzero(w_tok).flatten().tolist()) == set(top)
        torch.testing.assert_close(w_tok[top], p_tok[top] / p_tok[top].sum())


def test_layer_output_is_the_hand_sum_over_routed_experts():
    model, layer = _toy(num_experts=4, top_k=2)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(2))
    A, B = layer.lora_experts_A["default"].detach(), layer.lora_experts_B["default"].detach()
    W = layer.lora_router["default"].detach()
    want = torch.empty(2, 5, 5)
    for i in range(2):
        for t in range(5):
            xt = x[i, t]
            p = torch.softmax(W @ xt, -1)
            top = p.topk(2).indices
            y = nn.functional.linear(xt, layer.weight, layer.bias)
            for e in top:
                y = y + p[e] / p[top].sum() * (3 / 2) * (B[e] @ (A[e] @ xt))
            want[i, t] = y
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(TARGETS))
def test_one_expert_with_top_1_is_plain_lora(kind):
    lora = add_adapter(make_model(kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind],
                                                    init_lora_weights=False))
    moe = add_adapter(make_model(kind), LoraMoeConfig(r=4, lora_alpha=8, num_experts=1, top_k=1,
                                                      target_modules=TARGETS[kind]))
    plain = dict(adapter_layers(lora))
    with torch.no_grad():
        for path, layer in adapter_layers(moe):
            layer.lora_experts_A["default"][0].copy_(plain[path].lora_A["default"])
            layer.lora_experts_B["default"][0].copy_(plain[path].lora_B["default"])
    ids = tokens()
    for model in (lora, moe):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(moe(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    for path, layer in adapter_layers(moe):
        torch.testing.assert_close(layer.lora_experts_A["default"].grad[0], plain[path].lora_A["default"].grad,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_experts_B["default"].grad[0], plain[path].lora_B["default"].grad,
                                   atol=1e-5, rtol=1e-4)


def _hand_balance(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """num_experts * sum_e f_e P_e with token loops: f_e the share of tokens with e in their top_k."""
    tokens_ = probs.reshape(-1, probs.shape[-1])
    n, T = tokens_.shape[1], tokens_.shape[0]
    total = 0.0
    for e in range(n):
        f = sum(1 for p in tokens_ if e in sorted(range(n), key=lambda j: -p[j].item())[:top_k]) / T
        total = total + f * tokens_[:, e].mean()
    return n * total


def test_balance_loss_is_the_switch_formula_on_a_known_routing():
    # 4 tokens, 2 experts, top-1: three tokens pick expert 0 -> f = (3/4, 1/4)
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    _, _, chosen = route(probs.log(), 1)
    P = probs.mean(0)
    torch.testing.assert_close(balance_loss(probs, chosen), 2 * (0.75 * P[0] + 0.25 * P[1]))
    # perfectly balanced routing gives top_k
    even = torch.full((6, 3), 1 / 3)
    torch.testing.assert_close(balance_loss(even, torch.tensor([[0, 1], [1, 2], [2, 0]] * 2)), torch.tensor(2.0))


def test_aux_loss_equals_the_hand_formula_and_trains_the_router():
    model, layer = _toy(num_experts=4, top_k=2, router_aux_loss_coef=0.5)
    x = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(3))
    model.train()
    model(x)
    got = aux_loss(model)
    W = layer.lora_router["default"]
    want = 0.5 * _hand_balance(torch.softmax(x @ W.t(), -1), 2)  # autograd through the hand formula
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, W)
    (g_want,) = torch.autograd.grad(want, W)
    assert g_got.abs().sum() > 0
    torch.testing.assert_close(g_got, g_want)
    assert aux_loss(model) is None  # the records were claimed
    model.eval()  # nothing is recorded outside training
    model(x)
    assert aux_loss(model) is None


def test_aux_loss_is_the_mean_over_layers_and_each_forward_is_its_own():
    model = add_adapter(make_model("llama"), LoraMoeConfig(r=2, num_experts=3, top_k=1, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = tokens()
    records = []
    hooks = [layer.register_forward_hook(lambda m, i, o: records.append(balance_loss(*m.routing("default", i[0])[1:])))
             for _, layer in adapter_layers(model)]
    model(input_ids=ids)
    first = aux_loss(model)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(first, 0.01 * torch.stack(records).mean())
    model(input_ids=tokens(seed=5))
    second = aux_loss(model)
    assert len(records) == 4 and not torch.equal(first, second)


def test_save_load_gives_equal_outputs_and_merge_is_refused(tmp_path):
    model = add_adapter(make_model("qwen2"), LoraMoeConfig(r=2, num_experts=3, top_k=2, target_modules="all-linear",
                                                           init_lora_weights=False))
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_experts"], config["top_k"]) == ("LORA_MOE", 3, 2)
    loaded = load_adapter(make_model("qwen2"), tmp_path / "moe")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"^cannot merge into model\.layers\.0\.self_attn\.q_proj: an adaptive "
                                          r"\(MoE\) LoRA mixes its experts per token by a learned router"):
        merge_adapters(loaded)


def test_quantized_base_gives_what_the_dequantized_one_gives():
    model = quantize_model(make_model("llama"), bits=4, quant_type="nf4", compute_dtype="float32", backend="native")
    add_adapter(model, LoraMoeConfig(r=2, num_experts=3, top_k=2, target_modules=TARGETS["llama"],
                                     init_lora_weights=False))
    ids = tokens()
    assert type(next(m for _, m in adapter_layers(model))).__name__ == "LoraMoeQuantLinear"
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = dequantize_model(model)(input_ids=ids).logits
    assert type(next(m for _, m in adapter_layers(model))).__name__ == "LoraMoeLinear"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_yaml_lora_with_adaptive_moe_selects_lora_moe():
    cfg = load_config(None, {"finetuning_type": "lora", "adaptive": "moe", "num_experts": 3, "moe_top_k": 1})
    assert (cfg.finetune.finetuning_type, cfg.finetune.num_experts, cfg.finetune.moe_top_k) == ("lora_moe", 3, 1)
    assert load_config(None, {"finetuning_type": "lora_moe"}).finetune.finetuning_type == "lora_moe"
    with pytest.raises(ConfigError, match=r"^config key 'num_experts' needs finetuning_type: lora_moe"):
        load_config(None, {"finetuning_type": "lora", "num_experts": 3})


def test_top_k_as_the_issue_writes_it_sets_the_experts_per_token():
    """`adaptive: moe` with `top_k` (the issue's and the papers' name): the experts per token; sampling's
    top_k keeps its default there. moe_top_k wins when both are set; top_k elsewhere is sampling's."""
    cfg = load_config(None, {"finetuning_type": "lora", "adaptive": "moe", "num_experts": 4, "top_k": 1})
    assert (cfg.finetune.moe_top_k, cfg.generate.top_k) == (1, 50)
    both = load_config(None, {"finetuning_type": "lora_moe", "top_k": 7, "moe_top_k": 3})
    assert (both.finetune.moe_top_k, both.generate.top_k) == (3, 7)
    plain = load_config(None, {"finetuning_type": "lora", "top_k": 7})
    assert (plain.finetune.moe_top_k, plain.generate.top_k) == (2, 7)


def test_activation_checkpointing_recompute_records_no_second_aux_term():
    model = add_adapter(make_model("llama"), LoraMoeConfig(r=2, num_experts=3, top_k=2, target_modules=["q_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    ids = tokens()
    out = model(input_ids=ids, labels=ids)
    aux = aux_loss(model)
    (out.loss + aux).backward()
    assert len(calls) == 2, "the backward pass recomputed the layer"
    assert aux_loss(model) is None  # ... without recording its aux term again
