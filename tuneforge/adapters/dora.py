"""DoRA (weight-decomposed LoRA) as a variant of a LoRA adapter, following peft's maths.

An adapter with DoRA keeps A, B and the scaling s, and adds a trained magnitude `m` (one value
per output row, `<module>.lora_magnitude_vector.<adapter>`, fp32). With `W` the base weight as
(out, in) and `f = m / ||W + s B A||_row` (the norm detached from the graph, DoRA §4.3), the
adapter turns the running output `y` (base output plus the adapters added before it, bias `b`) into

    y + (f - 1) * (y - b) + f * s * (x A^T B^T)

which is peft's rule: with several active adapters each one rescales what the adapters before it
produced (while the norm always uses the base weight). When dropout is active in training, peft
uses the base product on the dropped input instead of `y - b`; so do we.

The row norms never form `W + s B A` (an (out, in) matrix) in the forward:
    ||W + sBA||^2_row = ||W||^2_row + 2s rowsum((W A^T) * B) + s^2 rowsum((B A A^T) * B)
with ||W||^2_row cached per weight version. Merging folds `f * (W' + s B A)` into the weight (W'
the weight holding the adapters merged before), the per-row `f` kept so unmerging is exact.

Other layer types (peft's DoraEmbeddingLayer / DoraConv2dLayer) only see W differently as (out, in):
- Embedding: W is stored (num_embeddings, dim), so a "row" is an embedding dimension and the norm
  runs over the vocabulary (as peft); the magnitude is (dim,);
- Conv2d: W (out, in, kh, kw) flattens to (out, in*kh*kw) and s B A, with A flattened to
  (r, in*kh*kw) and B to (out, r), is exactly the flattened composed kernel, so the expansion above
  holds as is (for any kernel size); the magnitude keeps peft's shape (1, out, 1, 1).
Their forwards live in lora_embedding.py / lora_conv2d.py and take `f` from `scale_factor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# weights in another dtype than the adapter are converted in row blocks of at most this many values
_BLOCK = 1 << 22


# ---- layouts ------------------------------------------------------------------------------------
def _transposed(layer) -> bool:
    # Conv1D stores its weight (in, out) (fan_in_fan_out); so does every nn.Embedding, (vocab, dim)
    return bool(layer.fan_in_fan_out) or isinstance(layer, nn.Embedding)


def _out_in(layer, w: torch.Tensor) -> torch.Tensor:
    """`w` (laid out like `layer.weight`) as an (out, in) matrix; a view for contiguous weights."""
    if w.dim() > 2:  # conv kernel (out, in, kh, kw): one row of in*kh*kw values per output channel
        return w.flatten(1)
    return w.t() if _transposed(layer) else w


def _row_factor(layer, f: torch.Tensor) -> torch.Tensor:
    """A per-output-row vector shaped to broadcast over `weight`'s own layout."""
    dim = layer.weight.dim()
    if dim > 2:
        return f.view((-1,) + (1,) * (dim - 1))
    return f.view(1, -1) if _transposed(layer) else f.view(-1, 1)


def _magnitude_shape(layer) -> tuple[int, ...]:
    # peft's shapes: (out,) for linear layers and embeddings, (1, out, 1, 1) for a conv kernel
    dim = layer.weight.dim()
    return (1, -1) + (1,) * (dim - 2) if dim > 2 else (-1,)


# ---- norms --------------------------------------------------------------------------------------
def _rows(layer, weight: torch.Tensor, dtype: torch.dtype):
    """(start, stop, rows of W as (rows, in) in `dtype`) covering all output rows of `weight`.

    Same dtype: one block, a view (nothing copied). Otherwise blocks bounded by `_BLOCK` values,
    so a bf16 base never gets a full fp32 copy.
    """
    rows = _out_in(layer, weight)
    out_f, in_f = rows.shape
    if weight.dtype == dtype:
        yield 0, out_f, rows
        return
    step = max(1, _BLOCK // max(in_f, 1))
    for j in range(0, out_f, step):
        block = rows[j : j + step]
        yield j, j + block.shape[0], block.to(dtype)


def _weight_sq_norms(layer, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = []
    for _, _, rows in _rows(layer, weight, dtype):
        out.append(torch.linalg.vector_norm(rows, dim=1).square())
    return out[0] if len(out) == 1 else torch.cat(out)


def _cached_sq_norms(layer, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # keyed on the tensor's identity and version: merge, load_state_dict, .to() and in-place
    # edits all give another key, so a stale value is never used
    try:
        version = weight._version
    except RuntimeError:  # an inference-mode tensor has no version counter: do not cache
        return _weight_sq_norms(layer, weight, dtype)
    key = (weight.data_ptr(), version, weight.dtype, weight.device, tuple(weight.shape), dtype)
    cache = layer._dora_cache
    hit = cache.get("w_sq")
    if hit is not None and hit[0] == key:
        return hit[1]
    value = _weight_sq_norms(layer, weight, dtype)
    cache["w_sq"] = (key, value)
    return value


@torch.no_grad()
def weight_norm(layer, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s B A|| per output row (fp32, detached), without forming the (out, in) sum.

    `base` is the base weight when `layer.weight` holds merged adapters (then nothing is cached).
    """
    A = layer.lora_A[name].detach()
    B = layer.lora_B[name].detach()
    A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)  # conv: (r, in*kh*kw), (out, r)
    s = layer.lora_scaling[name]
    dt = A.dtype
    weight = layer.weight if base is None else base
    with torch.autocast(A.device.type, enabled=False):
        w_sq = _cached_sq_norms(layer, weight, dt) if base is None else _weight_sq_norms(layer, weight, dt)
        cross = torch.empty_like(w_sq)
        for j, k, rows in _rows(layer, weight, dt):
            cross[j:k] = (rows @ A.t()).mul_(B[j:k]).sum(1)  # rowsum((W A^T) * B)
        quad = (B @ (A @ A.t())).mul_(B).sum(1)  # rowsum((B A A^T) * B)
        sq = w_sq + cross.mul_(2 * s) + quad.mul_(s * s)
        return sq.clamp_min_(0).sqrt_()


def init_magnitude(layer, name: str) -> None:
    """peft's start: m = ||W + s B A||_row, so a fresh DoRA adapter computes what its LoRA would."""
    m = weight_norm(layer, name, base_weight(layer) if layer.lora_merged else None)
    m = m.to(torch.float32).reshape(_magnitude_shape(layer))
    layer.lora_magnitude_vector[name] = nn.Parameter(m.clone())


def scale_factor(layer, name: str, base_w: torch.Tensor | None = None) -> torch.Tensor:
    """f = m / ||W + s B A||_row of adapter `name`, shaped like its magnitude (gradient to m only)."""
    m = layer.lora_magnitude_vector[name]
    return m / weight_norm(layer, name, base_w).view(m.shape)


# ---- forward ------------------------------------------------------------------------------------
def add_adapters(layer, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """`out` plus the adapters `names` in order, some of them DoRA (peft's sequential rule)."""
    autocast = torch.is_autocast_enabled(x.device.type)
    mags = layer.lora_magnitude_vector
    out_shape = out.shape
    acc = out.reshape(-1, out_shape[-1])
    adapter_dtype = layer.lora_A[names[0]].dtype
    if not autocast and acc.dtype != adapter_dtype:
        acc = acc.to(adapter_dtype)  # peft adds in the adapter dtype (fp32), then casts back
    x2 = x.reshape(-1, x.shape[-1])
    base_w = base_weight(layer) if layer.lora_merged else None
    bias = layer.bias
    for name in names:
        A, B = layer.lora_A[name], layer.lora_B[name]
        s = layer.lora_scaling[name]
        h = x2 if autocast or x2.dtype == A.dtype else x2.to(A.dtype)
        p = layer.lora_dropout[name]
        dropped = p > 0.0 and layer.training
        if dropped:
            h = F.dropout(h, p=p, training=True)
        t = h @ A.t()
        if name not in mags:  # plain LoRA adapter among DoRA ones
            acc = acc + ((t @ B.t()) * s).to(acc.dtype)
            continue
        f = mags[name] / weight_norm(layer, name, base_w)
        # f * s * (t B^T) == t (diag(f s) B)^T: scale the (out, r) B, not the (N, out) product
        lora_w = B * (f * s).unsqueeze(1)
        if dropped:
            base_out = _base_product(layer, h, base_w)
            mixed = acc + (base_out * (f - 1)).to(acc.dtype)
        else:
            # y + (f - 1)(y - b) == f y + (1 - f) b
            shift = bias.to(f.dtype) * (1 - f) if bias is not None else None
            mixed = acc * f if shift is None else torch.addcmul(shift, acc, f)
            mixed = mixed.to(acc.dtype)
        if autocast:
            acc = mixed + (t @ lora_w.t()).to(mixed.dtype)
        else:
            acc = torch.addmm(mixed, t.to(lora_w.dtype), lora_w.t())
    if acc.dtype != out.dtype:
        acc = acc.to(out.dtype)
    return acc.view(out_shape)


def add_adapters_conv2d(layer, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """peft's DoraConv2dLayer rule on a LoRA Conv2d: `y + (f - 1)(y - b) + f s B(A(x))` per DoRA
    adapter, `f` shaped (1, out, 1, 1); with dropout in training the base conv of the dropped input
    replaces `y - b`. Plain adapters among them add `s B(A(x))`."""
    out_dtype = out.dtype
    mags = layer.lora_magnitude_vector
    base_w = base_weight(layer) if layer.lora_merged else None  # the norm is of the base weight
    for name in names:
        h, lora = layer._lora_conv(x, name)
        if name not in mags:
            out = out + lora * layer.lora_scaling[name]
            continue
        f = scale_factor(layer, name, base_w)  # (1, out, 1, 1)
        if layer.lora_dropout[name] > 0.0 and layer.training:  # peft: base conv of the dropped input
            base_out = layer._base_conv(h, base_w)
        else:
            base_out = out if layer.bias is None else out - layer.bias.view(1, -1, 1, 1)
        out = out + (f - 1) * base_out + f * lora * layer.lora_scaling[name]
    return out.to(out_dtype)


def add_adapters_embedding(layer, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """peft's DoraEmbeddingLayer rule on a LoRA Embedding: no bias, no dropout, so a DoRA adapter turns
    `y` into `f * y + f * s * A.T[ids] B^T` (the adapter part times embed_scale), `f` per dimension."""
    out_dtype = out.dtype
    scale = layer._embed_scale()
    mags = layer.lora_magnitude_vector
    base_w = base_weight(layer) if layer.lora_merged else None
    for name in names:
        delta = layer._lora_rows(x, name)
        if name in mags:
            f = scale_factor(layer, name, base_w)
            delta = f * delta
            out = f * out
        if scale is not None:
            delta = delta * scale.to(delta.dtype)
        out = out + delta
    return out.to(out_dtype)


def _base_product(layer, h: torch.Tensor, base_w: torch.Tensor | None) -> torch.Tensor:
    """x W^T without bias, for the dropped-out input (computed in the weight's dtype, like the base)."""
    w = layer.weight if base_w is None else base_w
    hw = h if h.dtype == w.dtype or torch.is_autocast_enabled(h.device.type) else h.to(w.dtype)
    y = hw @ w if layer.fan_in_fan_out else F.linear(hw, w)
    return y if y.dtype == h.dtype else y.to(h.dtype)


# ---- merge ----------------------------------------------------------------------------------------
def _apply(layer, w: torch.Tensor, name: str, undo: bool = False) -> torch.Tensor:
    """One step of the merge stack on the fp32 weight `w`: LoRA adds its delta, DoRA f * (w + delta)."""
    delta = layer.delta_weight(name).to(w.device)
    f = layer._dora_factors.get(name)
    if f is None:
        return w - delta if undo else w + delta
    f = _row_factor(layer, f.to(w.device))
    return w / f - delta if undo else (w + delta) * f


def base_weight(layer) -> torch.Tensor:
    """The unmerged base weight (fp32 copy), rebuilt by undoing the merged adapters newest first."""
    w = layer.weight.detach().float().clone()
    for n in reversed(layer.lora_merged):
        w = _apply(layer, w, n, undo=True)
    return w


@torch.no_grad()
def merged_weight(layer, todo: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(fp32 weight with `todo` merged on top of the current one, per-row factors of the DoRA ones)."""
    base = base_weight(layer) if layer.lora_merged else layer.weight.detach().float()
    base_oi = _out_in(layer, base)
    w = layer.weight.detach().float()
    factors = {}
    for n in todo:
        delta = layer.delta_weight(n).to(w.device)
        if n in layer.lora_magnitude_vector:
            # the norm is the one the forward uses: of the base weight plus this adapter alone
            norm = torch.linalg.vector_norm(base_oi + _out_in(layer, delta), dim=1)
            f = layer.lora_magnitude_vector[n].detach().float().to(w.device).reshape(-1) / norm
            factors[n] = f
            w = (w + delta) * _row_factor(layer, f)
        else:
            w = w + delta
    return w, factors


@torch.no_grad()
def unmerged_weight(layer, names: list[str] | None) -> tuple[torch.Tensor, list[str]]:
    """(fp32 weight without the merged adapters `names` (all by default), names removed).

    Merging DoRA does not commute, so the stack is undone from the newest entry down to the
    oldest one asked for, and the others in that range are merged again with their kept factors.
    """
    stack = layer.lora_merged
    hit = [i for i, n in enumerate(stack) if names is None or n in names]
    if not hit:
        return layer.weight.detach().float(), []
    w = layer.weight.detach().float()
    for n in reversed(stack[hit[0] :]):
        w = _apply(layer, w, n, undo=True)
    removed = [stack[i] for i in hit]
    for n in stack[hit[0] :]:
        if n not in removed:
            w = _apply(layer, w, n)
    return w, list(reversed(removed))
