"""`combine_adapters`: a new LoRA adapter made from a weighted combination of loaded ones.

    combine_adapters(model, ["a", "b"], weights=[0.7, 0.3], name="ab", method="linear")

Semantics and maths follow peft's `LoraModel.add_weighted_adapter` (peft 0.21.2), per module
that carries at least one of the sources (modules carrying only some sources use those):
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine the A's and the B's
  element-wise; source i enters as sqrt(|w_i * s_i|) on both A and B with the sign of w_i * s_i
  on A only (s_i its scaling): `linear` is peft's cheap approximation of sum w_i s_i B_i A_i
  (exact for one source). They need equal ranks per module.
- `cat` stacks the weighted A's and the B's: rank = sum of the source ranks, exact sum.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` combine the full
  deltas s_i B_i A_i and keep the top `svd_rank` singular directions (default: largest source rank).
The new adapter has lora_alpha = r, so its scaling is 1 (the sources' scalings are folded into
A and B). It is added beside the others, frozen and not activated, as peft does; save it with
`save_adapter(model, path, name=...)`.

Where peft 0.21.2 is wrong we do the right thing instead:
- sources with use_rslora: peft copies use_rslora into the new config, which scales the result
  by sqrt(r) (fixed upstream later); the new adapter here never uses rsLoRA.
- sources with rank_pattern under an element-wise method: peft writes a config whose ranks do
  not match the tensors; here the per-module ranks go into the new config's rank_pattern.
- DoRA sources are refused (peft silently drops their magnitude vectors), and so are sources
  initialised from the base weights (PiSSA, OLoRA: peft would re-run that init on the base).
- the new adapter targets exactly the modules that carry a source (peft re-matches the union of
  the target names under the first source's layers_to_transform, which can lose modules).
modules_to_save: as in peft, the new adapter takes the first source's `modules_to_save` list
with fresh copies of the base modules (trained copies are not combined; a warning says so), and
two sources with a copy of the same module are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from numbers import Real

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .config import LoraConfig
from .core import (
    AdapterState,
    add_adapter,
    delete_adapter,
    lora_layers,
    require_state,
    saved_modules,
    set_active_adapters,
    set_trainable,
)
from .lora import LoraLayer
from .targets import candidate_modules, minimal_suffixes

ELEMENTWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*ELEMENTWISE, "cat", *SVD)
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # (and their _svd forms) need density
_SIGN_METHODS = ("total", "frequency")
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


def combine_adapters(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    name: str,
    method: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> nn.Module:
    """Add adapter `name` = the weighted combination of `adapters` (see the module docstring).

    density: fraction of values kept by the pruning methods (ties, dare_*, magnitude_prune*), in (0, 1].
    majority_sign_method: 'total' (sign of the sum) or 'frequency' (most frequent sign) for *ties.
    svd_rank / svd_clamp / svd_full_matrices / svd_driver: options of the *svd methods (clamp is a
    quantile in (0, 1] applied to the factors; driver is torch.linalg.svd's, CUDA only).
    """
    st = require_state(model)
    adapters, weights = _check_args(
        st, adapters, weights, name, method, density, majority_sign_method, svd_rank, svd_clamp, svd_driver
    )
    kind = "linear" if len(adapters) == 1 else method  # peft: one source is always combined linearly
    layers = [(p, m) for p, m in lora_layers(model) if any(a in m.lora_A for a in adapters)]
    if not layers:
        raise ConfigError(f"adapters {adapters} have no LoRA layers to combine")
    for path, m in layers:
        grouped = [a for a in adapters if a in m.lora_B and m.lora_B[a].shape[1] != m.lora_r[a]]
        if grouped:  # a grouped Conv2d's B is (out, r // groups): no (out, r) @ (r, in) update to combine
            raise ConfigError(f"{path} is a grouped convolution; its adapters {grouped} cannot be combined")
    r, rank_pattern = _plan_rank(st, layers, adapters, kind, method, svd_rank)
    _check_saved_modules(model, adapters)
    first = st.configs[adapters[0]]
    paths = [p for p, _ in layers]
    cfg = dataclasses.replace(
        first,
        r=r,
        lora_alpha=r,
        target_modules=minimal_suffixes(paths, [n for n, _ in candidate_modules(model)]),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),  # alpha = rank per module: scaling 1 everywhere
        use_rslora=False,
    )
    active = list(st.active)
    with _rng_untouched(model):  # the new tensors are overwritten; only DARE may draw random numbers
        add_adapter(model, cfg, name)
    try:
        set_trainable(model, name, False)  # peft freezes the new adapter ...
        set_active_adapters(model, active)  # ... and leaves the active adapters as they were
        opts = dict(density=density, sign=majority_sign_method)
        svd_opts = dict(clamp=svd_clamp, full_matrices=svd_full_matrices, driver=svd_driver)
        with torch.no_grad():
            for _, layer in layers:
                _fill_layer(layer, name, adapters, weights, kind, opts, svd_opts)
    except BaseException:
        delete_adapter(model, name)
        raise
    return model


# ---- checks -------------------------------------------------------------------------------------
def _check_args(st: AdapterState, adapters, weights, name, method, density, sign, svd_rank, svd_clamp, driver):
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ConfigError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    adapters = list(adapters)
    unknown = [a for a in adapters if a not in st.configs]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; this model has {sorted(st.configs)}")
    other = [a for a in adapters if not isinstance(st.configs[a], LoraConfig)]
    if other:
        raise ConfigError(f"combine_adapters combines LoRA adapters; {other} are of another method")
    twice = sorted({a for a in adapters if adapters.count(a) > 1})
    if twice:
        raise ConfigError(f"adapters lists {twice} more than once; give each adapter once with its total weight")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ConfigError(f"weights must be a list of numbers, one per adapter, got {weights!r}")
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(weights)} weights for {len(adapters)} adapters {adapters}; give one weight each")
    bad = [w for w in weights if not isinstance(w, Real) or isinstance(w, bool) or not math.isfinite(w)]
    if bad:
        raise ConfigError(f"weights must be finite numbers, got {bad}")
    if name in st.configs:
        raise ConfigError(
            f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or choose another name"
        )
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not one of {list(METHODS)}")
    dora = [a for a in adapters if getattr(st.configs[a], "use_dora", False)]
    if dora:
        raise ConfigError(
            f"adapters {dora} use DoRA, whose magnitude vectors have no weighted combination; "
            "combine plain LoRA adapters only"
        )
    # string inits other than 'gaussian' (pissa, olora, ...) moved part of the base weight into the
    # adapter: its A, B are not an update of the base, and re-running the init would change the base again
    from_weight = [a for a in adapters if isinstance(st.configs[a].init_lora_weights, str)
                   and st.configs[a].init_lora_weights != "gaussian"]  # fmt: skip
    if from_weight:
        raise ConfigError(
            f"adapters {from_weight} were initialised from the base weights "
            f"(init_lora_weights={st.configs[from_weight[0]].init_lora_weights!r}); save them with "
            "save_adapter(..., convert_pissa=True), load those plain LoRAs on the original base and combine them"
        )
    pruning = method.removesuffix("_svd") in _PRUNING
    if pruning:
        if density is None:
            raise ConfigError(f"method={method!r} needs density (the fraction of values kept, in (0, 1])")
        if not isinstance(density, Real) or isinstance(density, bool) or not 0.0 < density <= 1.0:
            raise ConfigError(f"density must be a number in (0, 1], got {density!r}")
    elif density is not None:
        raise ConfigError(
            f"density is only used by the pruning methods (ties, dare_*, magnitude_prune*), not {method!r}"
        )
    if sign not in _SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be one of {list(_SIGN_METHODS)}, got {sign!r}")
    if method not in SVD:
        svd_args = (("svd_rank", svd_rank), ("svd_clamp", svd_clamp), ("svd_driver", driver))
        given = [k for k, v in svd_args if v is not None]
        if given:
            raise ConfigError(f"{given} only apply to the svd methods {list(SVD)}, not {method!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        raise ConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and (not isinstance(svd_clamp, Real) or not 0.0 < svd_clamp <= 1.0):
        raise ConfigError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}")
    if driver not in _SVD_DRIVERS:
        raise ConfigError(f"svd_driver must be one of {list(_SVD_DRIVERS)}, got {driver!r}")
    return adapters, [float(w) for w in weights]


def _plan_rank(st, layers, adapters, kind, method, svd_rank) -> tuple[int, dict[str, int]]:
    """The new adapter's r and rank_pattern (peft's rules; per-module ranks for element-wise methods)."""
    # peft sizes a source by its largest rank anywhere
    sizes = [max([st.configs[a].r, *st.configs[a].rank_pattern.values()]) for a in adapters]
    if kind == "cat":
        return sum(sizes), {}
    if kind in SVD:
        return svd_rank or max(sizes), {}
    per_layer = {}
    for path, m in layers:
        ranks = {a: m.lora_r[a] for a in adapters if a in m.lora_A}
        if len(set(ranks.values())) > 1:
            raise ConfigError(
                f"method={method!r} combines A and B element-wise and needs equal ranks, but {path} has "
                f"{ranks}; use method='cat' or 'svd' for adapters of different ranks"
            )
        per_layer[path] = next(iter(ranks.values()))
    r = Counter(per_layer.values()).most_common(1)[0][0]
    return r, {re.escape(p): k for p, k in per_layer.items() if k != r}


def _check_saved_modules(model: nn.Module, adapters: list[str]) -> None:
    for path, m in saved_modules(model):
        owners = [a for a in adapters if a in m.modules_to_save]
        if len(owners) > 1:
            raise ConfigError(
                f"adapters {owners} each have their own copy of {path} (modules_to_save), which cannot be "
                "combined; combine adapters that do not share a modules_to_save module"
            )
        if owners:
            # peft gives the new adapter the first source's modules_to_save list, as fresh base copies
            fate = "a fresh copy of the base module" if owners[0] == adapters[0] else "no copy"
            warnings.warn(
                f"combine_adapters: {owners[0]!r}'s trained copy of {path} (modules_to_save) is not combined; "
                f"the new adapter gets {fate} (as with peft)",
                stacklevel=3,
            )


@contextmanager
def _rng_untouched(model: nn.Module):
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


# ---- maths --------------------------------------------------------------------------------------
def _fill_layer(layer: LoraLayer, name, adapters, weights, kind, opts, svd_opts) -> None:
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
    dst_A, dst_B = layer.lora_A[name], layer.lora_B[name]
    if kind == "cat":
        A = torch.cat([layer.lora_A[a].float() * (w * layer.lora_scaling[a]) for a, w in present], dim=0)
        B = torch.cat([layer.lora_B[a].float() for a, _ in present], dim=1)
        new_A, new_B = torch.zeros_like(dst_A, dtype=A.dtype), torch.zeros_like(dst_B, dtype=B.dtype)
        new_A[: A.shape[0]] = A  # modules with fewer or smaller sources keep zero rows
        new_B[:, : B.shape[1]] = B
    elif kind in SVD:
        new_A, new_B = _svd_factors(layer, present, dst_A, dst_B, kind.removesuffix("_svd"), opts, **svd_opts)
    else:
        # the sign goes on A only, else two negative factors would cancel it
        ws = [w * layer.lora_scaling[a] for a, w in present]
        on_A = torch.tensor([math.sqrt(abs(v)) * (1.0 if v >= 0 else -1.0) for v in ws])
        on_B = torch.tensor([math.sqrt(abs(v)) for v in ws])
        new_A = merge_tensors([layer.lora_A[a].float() for a, _ in present], on_A, kind, **opts)
        new_B = merge_tensors([layer.lora_B[a].float() for a, _ in present], on_B, kind, **opts)
    dst_A.copy_(new_A)
    dst_B.copy_(new_B)


def _svd_factors(layer, present, dst_A, dst_B, kind, opts, clamp, full_matrices, driver):
    # a module's update B @ A as a matrix: (out, r) @ (r, in...) covers Linear, Conv1D, Embedding and Conv
    deltas = [
        (layer.lora_B[a].float().flatten(1) @ layer.lora_A[a].float().flatten(1)) * layer.lora_scaling[a]
        for a, _ in present
    ]
    weights = torch.tensor([w for _, w in present])
    delta = merge_tensors(deltas, weights, "linear" if kind == "svd" else kind, **opts)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    r = dst_A.shape[0]
    k = min(r, S.numel())
    U = U[:, :k] @ torch.diag(S[:k])
    Vh = Vh[:k, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    new_A = torch.zeros(r, delta.shape[1], dtype=delta.dtype, device=delta.device)
    new_B = torch.zeros(delta.shape[0], r, dtype=delta.dtype, device=delta.device)
    new_A[:k], new_B[:, :k] = Vh, U  # a rank above the module's size leaves zero directions
    return new_A.reshape(dst_A.shape), new_B.reshape(dst_B.shape)


def merge_tensors(
    tensors: list[torch.Tensor], weights: torch.Tensor, kind: str, density: float | None = None, sign: str = "total"
) -> torch.Tensor:
    """peft's merge rules on same-shaped tensors: 'linear' (weighted sum), 'magnitude_prune' (keep the
    largest `density` fraction of each, then sum), 'ties' (prune, elect a sign per entry, average the
    weighted entries that agree), 'dare_linear' / 'dare_ties' (random drop with rescale, then sum / ties)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    w = weights.to(stacked).view(-1, *([1] * (stacked.dim() - 1)))
    if kind not in ("ties", "dare_ties"):
        return (stacked * w).sum(dim=0)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0)  # the sign of the (unweighted) pruned values
    kept = (stacked * w * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    keep = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().flatten(), k=keep).indices] = 1
    return t * mask.view(t.shape)


def _prune_random(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    # one Bernoulli draw per tensor from the global generator, in peft's order (torch.manual_seed reproduces it)
    return t * torch.bernoulli(torch.full_like(t, density)) / density
