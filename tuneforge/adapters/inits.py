"""PiSSA and OLoRA: initialisations that take the adapter out of the base weight.

Both split the layer's weight `W` (laid out (out, in), fp32) into a rank-r part held by the adapter
and a residual left in the base, so the adapted layer computes `W` again at init:
- PiSSA ("pissa": full SVD; "pissa_niter_N": torch.svd_lowrank with N power iterations):
  `W ~ U S Vh`, `A = sqrt(S_r / s) Vh_r`, `B = U_r sqrt(S_r / s)`;
- OLoRA ("olora"): `W = Q R`, `A = R[:r]`, `B = Q[:, :r]`;
then `W <- W - s * B @ A` (s: the adapter's scaling). Maths as in peft 0.21: decompositions in
fp32, the residual cast back to the weight's dtype. Two deliberate differences: A and B stay fp32
(peft rounds them through a half-precision base dtype first), and OLoRA honours transformers'
Conv1D layout (peft's OLoRA breaks on Conv1D).

Each layer keeps a copy of the initial (A0, B0) in `layer.lora_initial[name]` (plain tensors, not
in the state_dict). They are what turns the trained adapter back into a plain LoRA for the
original weights (convert.py), and what deleting the adapter uses to give the base its weight back.
`initial_state` / `given_initial_state` save and reuse them (e.g. to resume training exactly).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .layer import Conv1D

_NITER = re.compile(r"pissa_niter_(\d+)")
# (A0, B0) per layer object that an init should take instead of decomposing (given_initial_state)
_GIVEN: ContextVar[dict[int, tuple[torch.Tensor, torch.Tensor]] | None] = ContextVar("_GIVEN", default=None)


def is_weight_init(init: object) -> bool:
    """True for the inits that change the base weight ("pissa", "pissa_niter_N", "olora")."""
    return isinstance(init, str) and (init in ("pissa", "olora") or _NITER.fullmatch(init) is not None)


def pissa_niter(init: str) -> int | None:
    """N of "pissa_niter_N"; None for the other inits."""
    m = _NITER.fullmatch(init) if isinstance(init, str) else None
    return int(m.group(1)) if m else None


def check_init(init: object) -> None:
    """ConfigError for a malformed PiSSA name ('pissa_niter_0', 'pissa_niter_x')."""
    if isinstance(init, str) and init.startswith("pissa") and not is_weight_init(init):
        raise ConfigError(f"init_lora_weights={init!r}: use 'pissa' (full SVD) or 'pissa_niter_N' with N >= 1")
    if pissa_niter(init) == 0:
        raise ConfigError("init_lora_weights='pissa_niter_0': N must be >= 1 (or use 'pissa' for the full SVD)")


def _linear_like(layer: nn.Module) -> bool:
    base = layer._lora_base_class
    return issubclass(base, nn.Linear) or (Conv1D is not None and issubclass(base, Conv1D))


@torch.no_grad()
def init_from_weight(layer: nn.Module, name: str, init: str) -> None:
    """Fill adapter `name` of `layer` by PiSSA / OLoRA and leave the residual in `layer.weight`."""
    if not _linear_like(layer):
        raise ConfigError(
            f"init_lora_weights={init!r} works on Linear and Conv1D layers only, not "
            f"{layer._lora_base_class.__name__}; narrow target_modules to linear layers"
        )
    weight = layer.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(
            f"init_lora_weights={init!r} needs a float32/float16/bfloat16 weight, got {weight.dtype} "
            "(initialise PiSSA/OLoRA before quantizing the residual)"
        )
    r, s = layer.lora_r[name], layer.lora_scaling[name]
    in_f, out_f = layer.in_out_features()
    if r > min(in_f, out_f):
        raise ConfigError(
            f"init_lora_weights={init!r} with r={r} on a ({out_f} x {in_f}) layer: the rank cannot exceed "
            f"{min(in_f, out_f)}; lower r (or rank_pattern for this module)"
        )
    W = weight.detach().to(torch.float32)
    if layer.fan_in_fan_out:
        W = W.T  # a view, as peft takes it: decompose the (out, in) matrix
    given = (_GIVEN.get() or {}).get(id(layer))
    if given is not None:
        A, B = (t.to(device=W.device, dtype=torch.float32) for t in given)
        if A.shape != (r, in_f) or B.shape != (out_f, r):
            raise ConfigError(f"given initial weights for adapter {name!r} do not fit {layer!r} (r={r})")
    elif init == "olora":
        A, B = _olora(W, r)
    else:
        A, B = _pissa(layer, name, W, r, s, pissa_niter(init))
    residual = W - (s * B) @ A  # peft's order of operations, so the residual matches it bit for bit
    weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(weight.dtype))
    layer.lora_A[name].data.copy_(A)
    layer.lora_B[name].data.copy_(B)
    layer.__dict__.setdefault("lora_initial", {})[name] = (A.detach().clone(), B.detach().clone())


def _olora(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def _pissa(layer, name, W, r, s, niter) -> tuple[torch.Tensor, torch.Tensor]:
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        Ur, Sr, Vhr = U[:, :r], S[:r] / s, Vh[:r]
    else:
        # peft first builds A and B as nn.Linear layers, whose default init draws from the RNG;
        # draw the same numbers so that a seeded run gives peft's randomised SVD
        nn.init.kaiming_uniform_(layer.lora_A[name].data, a=math.sqrt(5))
        nn.init.kaiming_uniform_(layer.lora_B[name].data, a=math.sqrt(5))
        Ur, Sr, V = torch.svd_lowrank(W, r, niter=niter)
        Sr, Vhr = Sr / s, V.t()
    root = torch.diag(torch.sqrt(Sr))
    return root @ Vhr, Ur @ root


def initial_weights(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0, B0) recorded when adapter `name` of `layer` was initialised from the weight, or None."""
    return layer.__dict__.get("lora_initial", {}).get(name)


@torch.no_grad()
def restore_base(layer: nn.Module, name: str) -> None:
    """Add `s * B0 @ A0` back into the weight and forget the record (used when the adapter is deleted)."""
    got = layer.__dict__.get("lora_initial", {}).pop(name, None)
    if got is None:
        return
    A0, B0 = (t.to(layer.weight.device) for t in got)
    delta = (layer.lora_scaling[name] * B0) @ A0
    w = layer.weight
    w.copy_((w.detach().float() + (delta.T if layer.fan_in_fan_out else delta)).to(w.dtype))


def initial_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The recorded (A0, B0) of adapter `name` as `{<module>.lora_A.<name>: A0, <module>.lora_B.<name>: B0}`
    (empty when the adapter was not initialised from the weights)."""
    out = {}
    for path, m in model.named_modules():
        got = initial_weights(m, name)
        if got is not None:
            out[f"{path}.lora_A.{name}"], out[f"{path}.lora_B.{name}"] = got
    return out


@contextmanager
def given_initial_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]):
    """Inside the block, PiSSA/OLoRA inits of adapter `name` on `model` take (A0, B0) from `state`
    (as `initial_state` returns it) instead of decomposing the weight: the residual is then the one
    the recorded run had, bit for bit, even for the randomised 'pissa_niter_N'."""
    given = {}
    for path, m in model.named_modules():
        a, b = state.get(f"{path}.lora_A.{name}"), state.get(f"{path}.lora_B.{name}")
        if a is not None and b is not None:
            given[id(m)] = (a, b)  # the module object survives its class swap to a LoRA layer
    token = _GIVEN.set(given)
    try:
        yield
    finally:
        _GIVEN.reset(token)


# ---- as a plain LoRA for the original weights (save_adapter(..., convert_pissa=True), convert.py) --
def check_convertible(cfg: Any, name: str, layers: list[nn.Module]) -> None:
    """ConfigError unless adapter `name` (config `cfg`, on `layers`) is a PiSSA / OLoRA adapter whose
    initial (A0, B0) were recorded."""
    if not is_weight_init(getattr(cfg, "init_lora_weights", None)):
        raise ConfigError(
            f"adapter {name!r} was initialised with init_lora_weights={getattr(cfg, 'init_lora_weights', None)!r}; "
            "only PiSSA / OLoRA adapters ('pissa', 'pissa_niter_N', 'olora') need converting"
        )
    if not any(initial_weights(m, name) is not None for m in layers):
        raise ConfigError(
            f"adapter {name!r} has no initial PiSSA/OLoRA weights recorded; convert in the process that "
            "created or loaded the adapter"
        )


def converted_tensors(layer: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The layer's file tensors (peft suffix -> tensor) with A and B replaced by the rank-2r pair.

    A layer the init left alone (an embedding: peft gives it the default init, its base unchanged)
    gets zeros as (A0, B0): its delta is B A on the original weight already.
    """
    A, B = layer.lora_A[name], layer.lora_B[name]
    got = initial_weights(layer, name)
    if got is None:
        A0, B0 = torch.zeros_like(A, dtype=torch.float32), torch.zeros_like(B, dtype=torch.float32)
    else:
        A0, B0 = (t.to(device=A.device, dtype=torch.float32) for t in got)
    out = {}
    for suffix, t in layer.peft_tensors(name).items():
        if t is A:
            out[suffix] = torch.cat([A.detach().float(), A0], dim=0)
        elif t is B:
            out[suffix] = torch.cat([B.detach().float(), -B0], dim=1)
        else:  # e.g. DoRA's magnitude: W_res + s B A equals W + s B' A', so it carries over as is
            out[suffix] = t
    return out


def converted_config(config: dict[str, Any]) -> dict[str, Any]:
    """peft's adapter_config.json of the converted adapter (rank doubled, same scaling, plain init)."""
    out = dict(config)
    factor = math.sqrt(2) if out.get("use_rslora") else 2  # s = alpha / r, or alpha / sqrt(r) (rsLoRA)
    out["r"] = 2 * out["r"]
    out["lora_alpha"] = out["lora_alpha"] * factor
    out["rank_pattern"] = {k: 2 * v for k, v in (out.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: v * factor for k, v in (out.get("alpha_pattern") or {}).items()}
    out["init_lora_weights"] = True
    return out
