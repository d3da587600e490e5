"""Maths and config checks shared by the orthogonal methods, OFT (oft.py) and BOFT (boft.py).

Both rotate a layer's input by an orthogonal matrix built from skew-symmetric blocks with the
Cayley transform (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning";
Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization"), as peft's
`tuners/oft` and `tuners/boft` compute it:

    cayley(Q)                  (I - Q)(I + Q)^-1, exact (a linear solve), for Q of shape (b, n, n)
    cayley_neumann(Q, terms)   peft OFT's truncated Neumann series I + 2Q + 2Q^2 + ... + Q^k
    skew_from_upper(v, n)      (b, n(n-1)/2) upper-triangle entries -> (b, n, n) skew-symmetric
    rotate_blocks(x, R)        x (..., b * n) with each n-slice multiplied by its block R[i] (b, n, n)
    drop_blocks(R, p)          peft's multiplicative dropout: int(p * b) random blocks set to identity
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.errors import ConfigError

from .config import ALL_LINEAR, _layer_indices, _names_or_regex


def skew_from_upper(vec: torch.Tensor, n: int) -> torch.Tensor:
    """(b, n(n-1)/2) strict upper-triangle entries, row by row -> (b, n, n) skew-symmetric Q = U - U^T."""
    rows, cols = torch.triu_indices(n, n, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], n, n)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def upper_of(q: torch.Tensor) -> torch.Tensor:
    """The inverse of skew_from_upper: (b, n, n) -> (b, n(n-1)/2)."""
    n = q.shape[-1]
    rows, cols = torch.triu_indices(n, n, 1, device=q.device)
    return q[:, rows, cols]


def cayley(q: torch.Tensor) -> torch.Tensor:
    """The Cayley transform (I - Q)(I + Q)^-1 of skew-symmetric blocks Q (b, n, n); orthogonal, exact."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """peft OFT's Cayley-Neumann rotation (peft >= 0.18) of skew-symmetric blocks Q (b, n, n).

    terms=1: I; 2: I + 2Q; k >= 3: I + 2Q + ... + 2Q^(m-1) + Q^m with m = max(3, k - 1) (peft's
    count: 3 and 4 terms give the same series). Only approximately orthogonal."""
    out = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).repeat(q.shape[0], 1, 1)
    if terms > 1:
        out = out + 2.0 * q
    if terms > 2:
        power = q
        for _ in range(2, max(3, terms - 1)):
            power = torch.bmm(power, q)
            out = out + 2.0 * power
        out = out + torch.bmm(power, q)
    return out


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (..., b * n) times block_diag(blocks) (blocks: (b, n, n), or (1, n, n) shared by all b):
    each n-slice of the last dimension becomes `slice @ blocks[i]`."""
    n = blocks.shape[-1]
    parts = x.reshape(*x.shape[:-1], x.shape[-1] // n, n)
    if blocks.shape[0] == 1:
        blocks = blocks.expand(parts.shape[-2], n, n)
    return torch.einsum("...rk,rkc->...rc", parts, blocks).reshape(x.shape)


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """peft's MultiplicativeDropoutLayer on (b, n, n): int(p * b) blocks, chosen at random, become
    the identity (a rotation that does nothing); a single shared block is never dropped."""
    b, n = blocks.shape[0], blocks.shape[-1]
    k = int(p * b)
    if b == 1 or k == 0:
        return blocks
    mask = torch.zeros(b, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(b, device=blocks.device)[:k]] = 1.0
    mask = mask.view(b, 1, 1)
    eye = torch.eye(n, device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


def base_device(module: torch.nn.Module) -> torch.device:
    """The device of a base layer's own tensors (a Linear's weight, a QuantLinear's codes)."""
    for t in (*module._parameters.values(), *module._buffers.values()):
        if t is not None:
            return t.device
    return torch.device("cpu")


def check_selection(cfg: Any, bias_modes: tuple[str, ...]) -> None:
    """Check (and normalise in place) the fields peft's OFT and BOFT configs share with LoRA's:
    target_modules, exclude_modules, modules_to_save, layers_to_transform, layers_pattern, bias,
    fan_in_fan_out, init_weights. ConfigError names the field."""
    cfg.target_modules = _names_or_regex("target_modules", cfg.target_modules)
    cfg.exclude_modules = _names_or_regex("exclude_modules", cfg.exclude_modules)
    if isinstance(cfg.modules_to_save, str):
        cfg.modules_to_save = [cfg.modules_to_save]
    if cfg.modules_to_save is not None:
        cfg.modules_to_save = _names_or_regex("modules_to_save", cfg.modules_to_save) or None
    if cfg.bias not in bias_modes:
        raise ConfigError(f"bias must be one of {list(bias_modes)}, got {cfg.bias!r}")
    for key in ("fan_in_fan_out", "init_weights"):
        if not isinstance(getattr(cfg, key), bool):
            raise ConfigError(f"{key} must be true or false, got {getattr(cfg, key)!r}")
    cfg.layers_to_transform = _layer_indices(cfg.layers_to_transform)
    if isinstance(cfg.layers_pattern, str):
        cfg.layers_pattern = cfg.layers_pattern or None
    elif cfg.layers_pattern is not None:
        cfg.layers_pattern = _names_or_regex("layers_pattern", list(cfg.layers_pattern)) or None
    if cfg.layers_pattern is not None and cfg.layers_to_transform is None:
        raise ConfigError("layers_pattern is set but layers_to_transform is not; set both or neither")
    if isinstance(cfg.target_modules, str) and cfg.layers_to_transform is not None:
        what = "'all-linear'" if cfg.target_modules == ALL_LINEAR else f"a regex ({cfg.target_modules!r})"
        raise ConfigError(
            f"layers_to_transform cannot be combined with target_modules {what}; list the module names instead"
        )


def int_field(key: str, v: Any, minimum: int = 0) -> int:
    """An integer config field >= minimum (an integral float is accepted); ConfigError otherwise."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return v


def probability(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ConfigError(f"{key} must be a number in [0, 1), got {v!r}")
    return float(v)
