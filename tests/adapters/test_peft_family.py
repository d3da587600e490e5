"""The peft-family oracle: IA3, LN tuning, VeRA, OFT, BOFT, LoHa and LoKr checked against peft four
ways (as test_matrix.py does for LoRA), one row a (method, tiny model, config):
1. same weights -> same outputs and the same gradients as peft (compared in peft's file layout), on
   the same adapted layers, every adapter tensor with a gradient;
2. tuneforge trains and saves -> peft loads the file -> same outputs;
3. peft trains and saves -> tuneforge loads the file -> same outputs;
4. merge == unmerged, unmerge restores the base weights, disable == base model (unless biases were
   trained in place, as in peft), unload(merge=True) == trained and leaves no adapter tensor.
A method's checks of one row (VeRA's projections, OFT's rank fit, BOFT's factors, ...) are its
`Method.check`; what only one method has beyond these rows (its maths, init, errors, odd layouts,
two adapters, quantized bases) stays in its own file (test_ia3.py, test_vera.py, ...).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import peft.tuners.boft.layer as peft_boft
import peft.tuners.loha.layer as peft_loha
import pytest
import torch
from peft import BOFTConfig as PeftBOFTConfig
from peft import IA3Config as PeftIA3Config
from peft import LNTuningConfig as PeftLNTuningConfig
from peft import LoHaConfig as PeftLoHaConfig
from peft import LoKrConfig as PeftLoKrConfig
from peft import OFTConfig as PeftOFTConfig
from peft import PeftModel, get_peft_model
from peft import VeraConfig as PeftVeraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from test_matrix import assert_peft_file_loads, assert_same_as_peft, build, evaluate, same_random_adapters, train

from tuneforge.adapters import (
    BOFTConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    OFTConfig,
    VeraConfig,
    add_adapter,
    disable_adapters,
    merge_adapters,
    save_adapter,
    unload,
    unmerge_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.lycoris import tucker
from tuneforge.adapters.peft_format import adapter_state_dict

TOL = 1e-5


# ---- peft's side, where its CPU code is not the maths it runs elsewhere ----------------------------
class FakeFastBlockDiag:
    """peft builds BOFT's block-diagonal matrices with a CUDA extension; where it cannot be built
    (CPU) peft falls back to torch.block_diag and silently trains boft_n_butterfly_factor=1
    whatever the config says (test_boft.py shows it). Rows with one factor compare with that
    fallback; rows with more compare with peft's own code, the extension replaced by this stand-in:
    (N, D, H, H) blocks -> (N, D*H, D*H) block diagonals, and its gradient, as peft runs on CUDA."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*b) for b in blocks])]

    @staticmethod
    def backward(grad, blocks):
        h = blocks.shape[-1]
        return [torch.stack([torch.stack([g[i * h:(i + 1) * h, i * h:(i + 1) * h] for i in range(blocks.shape[1])])
                             for g in grad])]


def boft_backend(monkeypatch, kw: dict) -> None:
    cuda_stand_in = kw.get("boft_n_butterfly_factor", 1) > 1
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", FakeFastBlockDiag if cuda_stand_in else None)
    if not cuda_stand_in:  # the fallback, without trying to compile the extension
        monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)


def loha_autograd_cp(monkeypatch, kw: dict) -> None:
    """peft's LoHa computes the Tucker form (use_effective_conv2d) with a hand-written backward
    whose gradients for hada_w1_a / hada_w2_a are not the derivative of its forward; tuneforge uses
    autograd, so LoHa rows compare with peft's forward maths (unchanged) differentiated by autograd."""

    def make_weight_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
        return tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b) * scale

    monkeypatch.setattr(peft_loha, "make_weight_cp", make_weight_cp)


# ---- each method's own checks of a row (ctx: kind, kw, ours / theirs / g_ours of 1., written) -------
def ln_tuning_check(ctx) -> None:
    trainable = {n for n, p in ctx.ours.named_parameters() if p.requires_grad}
    assert trainable and all(".ln_tuning_layers." in n or "classifier" in n for n in trainable)


def vera_check(ctx) -> None:
    """The shared projections are drawn as peft draws them; saved only with save_projection."""
    proj = next(m for _, m in adapter_layers(ctx.ours)).vera_projections["default"]
    torch.testing.assert_close(proj.vera_A, ctx.theirs.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(proj.vera_B, ctx.theirs.base_model.vera_B["default"], atol=0, rtol=0)
    assert ("base_model.vera_A" in adapter_state_dict(ctx.ours)) == ctx.kw.get("save_projection", True)
    assert ctx.written["r"] == ctx.kw["r"]


def oft_check(ctx) -> None:
    """peft's fit of a rank that does not divide in_features; the embedding's own tensor name."""
    fitted = any("does not divide in_features=64; using r=4" in str(w.message) for w in ctx.caught)
    assert fitted == (ctx.kw.get("r") == 5)
    embedding = any(k.endswith("embed_tokens.oft_embedding_R.weight") for k in ctx.g_ours)
    assert embedding == ("embed_tokens" in ctx.kw["target_modules"])
    assert ctx.written["target_modules"] == ctx.kw["target_modules"]


def boft_check(ctx) -> None:
    factors = ctx.kw.get("boft_n_butterfly_factor", 1)
    assert {tuple(t.shape)[0] for k, t in adapter_state_dict(ctx.ours).items() if k.endswith("boft_R")} == {factors}
    assert ctx.written["boft_n_butterfly_factor"] == factors


@dataclass(frozen=True)
class Method:
    ours: type  # tuneforge's config class
    theirs: type  # peft's config class
    peft_type: str
    prefix: str  # names the method's tensors in state-dict keys
    restore: tuple[float, float]  # (atol, rtol) to which unmerge restores the base weights
    trained: str = ""  # names the tensors that must get gradients (default: prefix)
    pair_kw: dict = field(default_factory=dict)  # config overrides of the same-weights pair (1.)
    setup: Callable | None = None  # (monkeypatch, kw): peft's side for a row
    check: Callable | None = None  # (ctx): the method's own checks of a row


METHODS = {
    "ia3": Method(IA3Config, PeftIA3Config, "IA3", "ia3_", (1e-6, 1e-6)),
    "ln_tuning": Method(LNTuningConfig, PeftLNTuningConfig, "LN_TUNING", "ln_tuning", (0, 0), check=ln_tuning_check),
    "vera": Method(VeraConfig, PeftVeraConfig, "VERA", "vera_", (1e-6, 1e-6), trained=".vera_lambda", check=vera_check),
    "oft": Method(OFTConfig, PeftOFTConfig, "OFT", "oft_", (1e-5, 1e-5), trained="_R.weight", check=oft_check),
    "boft": Method(BOFTConfig, PeftBOFTConfig, "BOFT", "boft_", (1e-5, 1e-5), setup=boft_backend, check=boft_check),
    "loha": Method(LoHaConfig, PeftLoHaConfig, "LOHA", ".hada_", (1e-6, 0), pair_kw=dict(init_weights=False),
                   setup=loha_autograd_cp),
    "lokr": Method(LoKrConfig, PeftLoKrConfig, "LOKR", ".lokr_", (1e-6, 0), pair_kw=dict(init_weights=False)),
}  # fmt: skip


# ---- the rows: (method, case id, model kind, config) -----------------------------------------------
def bert_head(kind: str, kw: dict) -> dict:
    return {**kw, "modules_to_save": ["classifier"]} if kind == "bert" else kw


IA3_EXPLICIT = {  # peft's default targets, and these
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj"]),
    "qwen2": dict(target_modules=["k_proj", "o_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    "bert": dict(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"]),
}
IA3 = {f"{k}-{v}": bert_head(k, kw if v == "explicit" else {}) for k, kw in IA3_EXPLICIT.items()
       for v in ("default", "explicit")}  # fmt: skip
# peft's defaults for Llama (RMSNorm), Qwen2, GPT-2; BERT has none, so its LayerNorms are named
LN_TUNING = {"llama": {}, "qwen2": {}, "gpt2": {}, "bert": dict(target_modules=["LayerNorm"],
                                                               modules_to_save=["classifier"])}
VERA = {  # q/v of different widths: the shared projections are sliced
    "llama": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "qwen2": dict(r=4, target_modules=["q_proj", "v_proj"], bias="vera_only"),
    "gpt2": dict(r=4, target_modules=["c_attn", "mlp.c_proj"]),
    "bert": dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    "llama-no-projection": dict(r=8, target_modules=["k_proj", "o_proj"], save_projection=False,
                                projection_prng_key=7, layers_to_transform=[1], layers_pattern="layers"),
}
ROTATED = {  # GPT-2's Conv1D has no OFT / BOFT layer in peft, and tuneforge refuses it too
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "o_proj"],
    "bert": ["query", "value", "output.dense"],
}
OFT_VARIANTS = {
    "block": dict(oft_block_size=8),  # with the Neumann series
    "rank-exact": dict(r=5, oft_block_size=0, use_cayley_neumann=False),  # r=5 fits to 4 (peft's rule)
    "share-coft-bias": dict(oft_block_size=16, block_share=True, coft=True, eps=0.5, bias="oft_only"),
}
OFT = {f"{k}-{v}": bert_head(k, dict(vkw, target_modules=ROTATED[k] + ["embed_tokens"] * (k == "llama")))
       for k in ROTATED for v, vkw in OFT_VARIANTS.items()}  # fmt: skip
BOFT_VARIANTS = {  # more than one butterfly factor: peft with the CUDA stand-in
    "m1": dict(boft_block_size=8),
    "m2-num-bias": dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2, bias="boft_only"),
    "m3": dict(boft_block_size=4, boft_n_butterfly_factor=3),
}
BOFT = {f"{k}-{v}": bert_head(k, dict(vkw, target_modules=list(ROTATED[k])))
        for k in ROTATED for v, vkw in BOFT_VARIANTS.items()}  # fmt: skip
CNN = ["conv1", "conv2", "mix", "fc"]
LOHA = {  # GPT-2: its Linear head (its Conv1D layers are refused, as peft refuses them)
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                  alpha_pattern={"v_proj": 3}, layers_to_transform=[1], layers_pattern="layers"),
    "qwen2": dict(target_modules="all-linear"),
    "gpt2": dict(target_modules=["lm_head"]),
    "bert": dict(target_modules=["query", "value", "output.dense"], modules_to_save=["classifier"]),
    "cnn": dict(target_modules=CNN),
    "cnn-effective": dict(target_modules=CNN, use_effective_conv2d=True),  # FedPara's Tucker form
    "conv1d-effective": dict(target_modules=["conv", "point", "fc"], use_effective_conv2d=True),
}
LOKR = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "llama-decompose_both": dict(r=1, decompose_both=True, target_modules=["q_proj", "down_proj"]),
    "llama-factor": dict(decompose_factor=4, target_modules=["q_proj", "v_proj", "down_proj"],
                         rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3}, layers_to_transform=[0],
                         layers_pattern="layers"),
    "qwen2": dict(target_modules="all-linear", init_weights="lycoris"),
    "gpt2": dict(target_modules=["lm_head"]),
    "bert": dict(target_modules=["query", "value", "output.dense"], modules_to_save=["classifier"]),
    "cnn-lowrank": dict(r=1, target_modules=CNN),
    "cnn-full": dict(r=8, target_modules=CNN),  # w2 in full
    "cnn-effective": dict(r=1, target_modules=CNN, use_effective_conv2d=True),  # w2 in Tucker form
    "conv1d-effective": dict(r=1, target_modules=["conv", "point", "fc"], use_effective_conv2d=True),
}
LYCORIS_DEFAULTS = dict(r=4, alpha=8)
TABLE = {"ia3": IA3, "ln_tuning": LN_TUNING, "vera": VERA, "oft": OFT, "boft": BOFT,
         "loha": {c: {**LYCORIS_DEFAULTS, **kw} for c, kw in LOHA.items()},
         "lokr": {c: {**LYCORIS_DEFAULTS, **kw} for c, kw in LOKR.items()}}  # fmt: skip
ROWS = [(method, case) for method, cases in TABLE.items() for case in cases]


def pair(method: Method, kind: str, kw: dict):
    """(ours, peft) with identical base weights and identical random adapter tensors."""
    kw = {**kw, **method.pair_kw}
    ours = add_adapter(build(kind), method.ours(**kw))
    theirs = get_peft_model(build(kind), method.theirs(**kw))
    return same_random_adapters(ours, theirs, std=0.2)


@pytest.mark.filterwarnings("ignore:Invalid `r`")  # peft's own warning for OFT's r=5
@pytest.mark.filterwarnings("ignore:Specified to not")  # peft: VeRA with save_projection=False
@pytest.mark.parametrize("name,case", ROWS, ids=[f"{m}-{c}" for m, c in ROWS])
def test_matches_peft(tmp_path, monkeypatch, name, case):
    method, kw, kind = METHODS[name], TABLE[name][case], case.split("-")[0]
    if method.setup:
        method.setup(monkeypatch, kw)
    # biases trained in place (as in peft): only where the model has them
    trains_bias = kw.get("bias", "none") != "none" and kind != "llama"

    # 1. same weights: same layers, outputs and gradients
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours1, theirs1 = pair(method, kind, kw)
    assert {n for n, _ in adapter_layers(ours1)} == {
        n.removeprefix("base_model.model.") for n, m in theirs1.named_modules() if isinstance(m, BaseTunerLayer)
    }
    base = evaluate(build(kind), kind)
    g_ours = assert_same_as_peft(ours1, theirs1, kind, base)
    adapter_grads = [g for k, g in g_ours.items() if (method.trained or method.prefix) in k]
    assert adapter_grads and all(g.abs().max() > 0 for g in adapter_grads)
    assert any(k.endswith(".base_layer.bias") for k in g_ours) == trains_bias

    # 2. tuneforge trains and saves; peft loads the file
    ours = add_adapter(build(kind), method.ours(**kw))
    train(ours, kind)
    trained = evaluate(ours, kind)
    assert (trained - base).abs().max() > 1e-4, "training changed nothing"
    save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == method.peft_type
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "ours")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL
    if method.check:
        method.check(SimpleNamespace(kind=kind, kw=kw, ours=ours1, theirs=theirs1, g_ours=g_ours, caught=caught,
                                     written=written))

    # 3. peft trains and saves; tuneforge loads the file
    assert_peft_file_loads(get_peft_model(build(kind), method.theirs(**kw)), kind, method.ours, tmp_path)

    # 4. merge == unmerged; unmerge restores the base; disable == base; unload(merge=True) == trained
    weights = {k: v.clone() for k, v in ours.state_dict().items()
               if method.prefix not in k and "modules_to_save" not in k}  # fmt: skip
    merge_adapters(ours)
    assert (evaluate(ours, kind) - trained).abs().max().item() <= TOL
    unmerge_adapters(ours)
    restored = ours.state_dict()
    atol, rtol = method.restore
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=atol, rtol=rtol, msg=k)
    with disable_adapters(ours):
        off = evaluate(ours, kind)
    assert ((off - base).abs().max().item() <= 1e-6) == (not trains_bias)
    assert (evaluate(ours, kind) - trained).abs().max().item() <= max(atol, 1e-6)
    merged = evaluate(unload(ours, merge=True), kind)
    assert (merged - trained).abs().max().item() <= TOL
    assert not any(method.prefix in k for k in ours.state_dict())
