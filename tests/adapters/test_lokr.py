"""LoKr beyond the peft oracle (test_peft_family.py: Llama with full factors, decompose_both and
decompose_factor, Qwen2 with LyCORIS init, GPT-2's head, BERT, a CNN with low-rank, full and
Tucker w2, a Conv1d net): its factorization, factor shapes, LyCORIS init, rank dropout, refusals.
"""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization
from test_matrix import build

import tuneforge
from tuneforge.adapters import LoKrConfig, add_adapter
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.lokr import factorization
from tuneforge.errors import ConfigError


def test_factorization_matches_peft():
    for dim in (1, 2, 7, 12, 64, 96, 127, 128, 576, 1536):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 32):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_lokr_lycoris_init_starts_at_zero_with_w1_drawn():
    """init_weights='lycoris' is a no-op start too, with the zero on w2's side, not w1's."""
    model = add_adapter(build("qwen2"), LoKrConfig(r=4, target_modules="all-linear", init_weights="lycoris"))
    layers = list(adapter_layers(model))
    assert layers
    for _, layer in layers:
        assert layer.delta_weight("default").abs().max() == 0
        assert layer.lokr_w1["default"].abs().max() > 0


def test_lokr_shapes_follow_rank_and_decompose_both():
    """q_proj 64 x 64 splits 8 x 8: rank 4 keeps both factors full; r=1 with decompose_both writes
    both as rank-1 products (the tensors a file must hold)."""
    layer = dict(adapter_layers(add_adapter(build("llama"), LoKrConfig(r=4, target_modules=["q_proj"]))))
    assert sorted(layer["model.layers.0.self_attn.q_proj"].peft_tensors("default")) == ["lokr_w1", "lokr_w2"]
    model = add_adapter(build("llama"), LoKrConfig(r=1, decompose_both=True, target_modules=["q_proj"]))
    tensors = dict(adapter_layers(model))["model.layers.0.self_attn.q_proj"].peft_tensors("default")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "lokr_w1_a": (8, 1), "lokr_w1_b": (1, 8), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}


@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "r must be a positive integer \\(the LoKr rank\\), got 0"),
    (dict(init_weights="gaussian"), "init_weights must be true, false or 'lycoris', got 'gaussian'"),
    (dict(decompose_factor=0), "decompose_factor must be -1 .* or a positive integer, got 0"),
    (dict(decompose_both="yes"), "decompose_both must be true or false, got 'yes'"),
    (dict(module_dropout=-0.1), "module_dropout must be a number in \\[0, 1\\), got -0.1"),
])  # fmt: skip
def test_lokr_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoKrConfig(**kw)


def test_lokr_refuses_conv1d_and_is_exported():
    with pytest.raises(ConfigError, match="c_fc is a Conv1D, which LoKr does not support yet"):
        add_adapter(build("gpt2"), LoKrConfig(target_modules=["c_fc"]))
    assert tuneforge.LoKrConfig is LoKrConfig


@pytest.mark.parametrize("scale", [False, True])
def test_lokr_rank_dropout_rescales_only_with_rank_dropout_scale(scale):
    model = add_adapter(build("llama"), LoKrConfig(r=4, target_modules=["q_proj"], init_weights=False,
                                                    rank_dropout=0.5, rank_dropout_scale=scale))
    layer = dict(adapter_layers(model))["model.layers.0.self_attn.q_proj"]
    full = layer.delta_weight("default").detach()  # eval / merge: no dropout
    torch.manual_seed(0)
    rows = layer.delta_weight("default", rank_dropout=True).detach()
    kept = rows.abs().sum(1) > 0
    assert 0 < kept.sum() < rows.shape[0]
    factor = rows.shape[0] / kept.sum() if scale else 1.0
    torch.testing.assert_close(rows[kept], full[kept] * factor, rtol=1e-5, atol=1e-7)
