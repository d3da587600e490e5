"""AdaLoRA's training-time parts (adalora.py holds the layer): the orthogonality regulariser and
the rank allocator, run by the training loop through the method hooks `training_loss` and
`after_step` (methods.py). The maths follow Zhang et al. 2023 ("Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning", sections 3.1-3.3) as peft implements them (peft/tuners/adalora:
AdaLoraModel.forward, AdaLoraModel.update_and_allocate, RankAllocator).

Regulariser: R = orth_reg_weight x mean over the adapter's matrices (every lora_A (r, in) and
lora_B (out, r)) of ||A A^T - I_r||_F and ||B^T B - I_r||_F.

Allocator, after optimizer step t (1-based, T = total_step, gradients still in place), for every
element w of lora_A / lora_E / lora_B:
    I = |w * grad w|;  Ibar = beta1 Ibar + (1 - beta1) I;  U = beta2 U + (1 - beta2) |I - Ibar|
    s(w) = Ibar * U
and per singular value i of a matrix: S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji). The budget
b(t) is init_bgt (the rows held at the start) for t <= tinit, target_r x n for t > T - tfinal and
    b(t) = int((init_bgt - target_bgt) * (1 - (t - tinit) / (T - tfinal - tinit))^3 + target_bgt)
between; every deltaT steps there (and once, forced, at t = T - tfinal) the singular values with
S_i <= the (init_bgt - b(t))-th smallest score are masked: lora_E row i set to 0 and the row
marked dropped (saved files then hold only the kept rows and `rank_pattern`). After T - tfinal
the fixed pattern is re-applied each step and scores are no longer updated.

The scores, the masks and the run's total_step / init_bgt are the method's `training_state`, saved
in every checkpoint, so a resumed run allocates exactly as the uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.errors import CheckpointError, ConfigError

from .core import adapter_layers


def check_schedule(cfg: Any, total_step: int) -> None:
    """ConfigError unless tinit < total_step - tfinal (peft: the schedule must leave a budgeting phase)."""
    if cfg.tinit >= total_step - cfg.tfinal:
        raise ConfigError(f"AdaLoRA tinit ({cfg.tinit}) must be below total_step - tfinal ({total_step} - "
                          f"{cfg.tfinal}): no step is left to prune ranks; lower tinit / tfinal or train longer")


def check_run(model, name: str, cfg: Any, total_steps: int) -> None:
    """The schedule check for a run of `total_steps` (cfg.total_step wins), before it starts."""
    check_schedule(cfg, cfg.total_step or total_steps)


def _trainable_layers(model, name: str) -> list:
    layers = list(adapter_layers(model, name))
    return [(p, m) for p, m in layers if m.lora_A[name].requires_grad]


def orthogonal_regulariser(model, name: str, cfg: Any) -> torch.Tensor | None:
    """orth_reg_weight x mean ||A A^T - I||_F, ||B^T B - I||_F over adapter `name`'s trained
    matrices (a 0-dim tensor with autograd); None when the weight is 0 or nothing trains."""
    layers = _trainable_layers(model, name)
    if cfg.orth_reg_weight == 0 or not layers:
        return None
    terms = []
    for _, m in layers:
        for p, left in ((m.lora_A[name], True), (m.lora_B[name], False)):
            cov = p @ p.T if left else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return cfg.orth_reg_weight * torch.stack(terms).mean()


def total_step_used(layers: list, name: str) -> int | None:
    """The total_step the allocator of adapter `name` ran with (None before its first step)."""
    for _, m in layers:
        run = m.ada_scores.get(name, {}).get("run")
        if run is not None:
            return run["total"]
    return None


def budget_schedule(cfg: Any, step: int, total: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """(budget at `step`, whether this step masks to it): the cubic schedule of the paper's eq. (11)."""
    if step <= cfg.tinit:
        return init_bgt, False
    if step > total - cfg.tfinal:
        return target_bgt, True
    mul = 1 - (step - cfg.tinit) / (total - cfg.tfinal - cfg.tinit)
    return int((init_bgt - target_bgt) * mul**3 + target_bgt), step % cfg.deltaT == 0


@torch.no_grad()
def _update_scores(layers: list, name: str, cfg: Any) -> None:
    for _, m in layers:
        state = m.ada_scores[name]
        for attr in m.param_dicts:
            p = getattr(m, attr)[name]
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg, unc = state.get(attr, (torch.zeros_like(p), torch.zeros_like(p)))
            avg = cfg.beta1 * avg + (1 - cfg.beta1) * ipt
            unc = cfg.beta2 * unc + (1 - cfg.beta2) * (ipt - avg).abs()
            state[attr] = (avg, unc)


def _triplet_score(m, name: str) -> torch.Tensor:
    """S_i per singular value of layer `m` (r,): s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)."""
    state = m.ada_scores[name]
    score = {k: state[k][0] * state[k][1] if k in state else torch.zeros_like(getattr(m, k)[name])
             for k in m.param_dicts}  # fmt: skip
    return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))


@torch.no_grad()
def _mask_to_budget(layers: list, name: str, init_bgt: int, budget: int) -> None:
    scores = [_triplet_score(m, name) for _, m in layers]
    k = init_bgt - budget
    if k <= 0:
        return
    threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores]), k=k)[0].item()
    for (_, m), s in zip(layers, scores):
        keep = s > threshold
        m.ada_keep[name] = keep
        m.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)


@torch.no_grad()
def _apply_pattern(layers: list, name: str) -> None:
    for _, m in layers:
        keep = m.ada_keep.get(name)
        if keep is not None:
            m.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)


def update_and_allocate(model, name: str, cfg: Any, step: int, total_steps: int) -> None:
    """The allocator's work after optimizer step `step` (1-based) of `total_steps` (the loop's count,
    used when cfg.total_step is None): update the importance scores and mask lora_E rows to the
    budget (module docstring). Call it before the gradients are cleared.

    Raises ConfigError when tinit / tfinal leave no step to prune within the run."""
    layers = _trainable_layers(model, name)
    if not layers:
        return
    run = total_step_used(layers, name)
    if run is None:
        total = cfg.total_step or total_steps
        check_schedule(cfg, total)
        shared = {"total": total, "init_bgt": sum(m.lyco_r[name] for _, m in layers)}
        for _, m in layers:
            m.ada_scores[name]["run"] = shared
            zero = m.lora_E[name].detach().view(-1) == 0
            if step > 1 and bool(zero.any()):  # a resumed run: its masked rows are the zero ones
                m.ada_keep[name] = ~zero
    shared = layers[0][1].ada_scores[name]["run"]
    total, init_bgt = shared["total"], shared["init_bgt"]
    target_bgt = cfg.target_r * len(layers)
    last = total - cfg.tfinal
    if step < last:
        _update_scores(layers, name, cfg)
        budget, mask = budget_schedule(cfg, step, total, init_bgt, target_bgt)
        if mask:
            _mask_to_budget(layers, name, init_bgt, budget)
    elif step == last:
        budget, _ = budget_schedule(cfg, step, total, init_bgt, target_bgt)
        _mask_to_budget(layers, name, init_bgt, budget)
        for _, m in layers:  # the pattern is final: drop the scores (peft's reset_ipt)
            m.ada_scores[name] = {"run": shared}
    else:
        _apply_pattern(layers, name)


def training_state(model, name: str, cfg: Any) -> dict[str, torch.Tensor]:
    """What the allocator of adapter `name` holds outside the weights, as tensors: 'run.total',
    'run.init_bgt' (0-dim int64), and per layer path '<path>.<lora_A|lora_E|lora_B>.avg' / '.unc'
    (the score EMAs, each shaped as its parameter) and '<path>.keep' (bool (r,), the kept rows)."""
    layers = _trainable_layers(model, name)
    out: dict[str, torch.Tensor] = {}
    run = layers[0][1].ada_scores.get(name, {}).get("run") if layers else None
    if run is not None:
        out["run.total"], out["run.init_bgt"] = (torch.tensor(run[k]) for k in ("total", "init_bgt"))
    for path, m in layers:
        for attr, (avg, unc) in ((k, v) for k, v in m.ada_scores[name].items() if k != "run"):
            out[f"{path}.{attr}.avg"], out[f"{path}.{attr}.unc"] = avg, unc
        if m.ada_keep.get(name) is not None:
            out[f"{path}.keep"] = m.ada_keep[name]
    return out


def load_training_state(model, name: str, cfg: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Put `training_state`'s tensors back into adapter `name`'s layers (a resumed run). Raises
    CheckpointError when a tensor's shape differs from the layer it belongs to."""
    layers = _trainable_layers(model, name)
    shared = ({"total": int(tensors["run.total"]), "init_bgt": int(tensors["run.init_bgt"])}
              if "run.total" in tensors else None)
    for path, m in layers:
        state: dict = {} if shared is None else {"run": shared}
        for attr in m.param_dicts:
            if f"{path}.{attr}.avg" not in tensors:
                continue
            pair = tuple(tensors[f"{path}.{attr}.{part}"] for part in ("avg", "unc"))
            param = getattr(m, attr)[name]
            if any(t.shape != param.shape for t in pair):
                raise CheckpointError(f"checkpoint: AdaLoRA scores for {path}.{attr} have shape "
                                      f"{tuple(pair[0].shape)}, the adapter {tuple(param.shape)}; resume with the "
                                      "setup that wrote it")
            state[attr] = tuple(t.to(param.device, param.dtype) for t in pair)
        m.ada_scores[name] = state
        if f"{path}.keep" in tensors:
            m.ada_keep[name] = tensors[f"{path}.keep"].to(m.lora_E[name].device)
