"""Multi-task LoRA: one LoRA shared by every task plus a small LoRA per task (issue 16).

For a token of task t (the index of its dataset's name in `dataset:`):

    y = W0 x + s_s B_s A_s x + s_t B_t A_t x        s_s = lora_alpha / shared_r,  s_t = task_alpha / task_r
                                                    (/ sqrt(r) instead of / r with use_rslora)

A_s: (shared_r, in), B_s: (out, shared_r) are trained by every task; A_t: (task_r, in), B_t: (out, task_r)
only by the tokens of task t. All B start at zero (the base model), each A with peft's init for its rank.

    from tuneforge import LoraMultitaskConfig, add_adapter
    add_adapter(model, LoraMultitaskConfig(tasks=["identity", "alpaca_en_demo"], shared_r=8, task_r=4,
                                           lora_alpha=16, target_modules="all-linear"))
    with task_ids(model, ids):      # ids: (batch, seq) long, the task of each token (or (batch,) per row)
        out = model(input_ids)

Storage: one LoRA layer per adapted module of rank R = shared_r + T task_r (T tasks): `lora_A` (R, in)
holds A_s in rows 0 .. shared_r and A_t in rows shared_r + t task_r .. shared_r + (t + 1) task_r;
`lora_B` (out, R) the B's in the same columns. The forward (the `Multitask` LoRA variant) is
`B (m_t * (A x))`, m_t the (R,) vector with s_s on the shared columns, s_t on task t's and zero
elsewhere, taken per token from the batch's `task_ids`; so a batch (or a packed row) mixing tasks
computes for each token exactly what that token's task alone computes, and task t's part gets
gradients from task t's tokens only. The ids reach the layers through the method's `batch_context`
hook (the training loop enters it around each batch's forward and backward) or `task_ids` above;
without ids (probes, inference on the multi-task folder) a layer adds the shared part only.

Files (`save_adapter`, so `tuneforge train`'s output_dir and its checkpoints):
- `<dir>/`: the multi-task adapter itself (peft_type LORA_MULTITASK, tuneforge's own: adapter_config.json
  holds LoRA's fields with r = R plus `tasks`, `shared_r`, `task_r`, `task_alpha`), for further training;
- `<dir>/<task>/` for each task: a plain peft LoRA (peft_type LORA) of rank shared_r + task_r,
  A = [A_s; A_t], B = [s_s B_s, s_t B_t], lora_alpha = r (scaling 1): exactly the multi-task adapter on
  task t's tokens. peft, transformers and `tuneforge chat / api / export` load it as any LoRA.
  A task's folder name is its dataset name with characters other than letters, digits, `.`, `_`, `-`
  replaced by `_`.

Merging the multi-task adapter itself is refused (each task merges differently): export a task's folder.
Layers: nn.Linear, transformers' Conv1D and a quantized base (QuantLinear; merging refused there);
Embedding / Conv2d targets are refused. The update rule is issue 16's; peft has no such method.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError

from .config import LoraConfig
from .core import adapter_layers
from .inits import is_weight_init
from .lora import LoraLayer, init_lora
from .lora_method import FIELDS as LORA_FIELDS
from .lora_method import config_to_peft as lora_config_to_peft
from .methods import AdapterMethod, method_named, register_method
from .peft_config import config_from_raw, yaml_targets
from .sizes import check_adapter_size
from .variants import LoraVariant, register_variant

TASK_FIELDS = ("tasks", "shared_r", "task_r", "task_alpha")


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass
class LoraMultitaskConfig(LoraConfig):
    """A multi-task LoRA: LoraConfig's fields (peft's names) for the shared part and what all parts share
    (target_modules, lora_dropout, use_rslora), plus the tasks and their parts.

    `lora_alpha` is the shared part's alpha; `r` is set to the total rank shared_r + len(tasks) task_r.
    Raises ConfigError (one line naming the field) for fewer than two tasks, a task named twice or
    empty, a rank that is not a positive integer, and for DoRA, PiSSA / OLoRA, LoftQ, rank_pattern /
    alpha_pattern (each part has one rank).
    """

    tasks: list[str] = field(default_factory=list)
    """The task names, in task-id order (YAML: the names in `dataset:`)."""
    shared_r: int = 8
    """Rank of the shared part."""
    task_r: int = 4
    """Rank of each task's part."""
    task_alpha: float | None = None
    """Alpha of each task's part; None: the shared part's scaling, i.e. lora_alpha * task_r / shared_r."""

    def __post_init__(self) -> None:
        tasks = self.tasks
        if not isinstance(tasks, (list, tuple)) or len(tasks) < 2 or not all(
                isinstance(t, str) and t.strip() for t in tasks):
            raise ConfigError(f"tasks must list two or more task names (e.g. the datasets), got {tasks!r}")
        twice = sorted({t for t in tasks if list(tasks).count(t) > 1})
        if twice:
            raise ConfigError(f"tasks names {', '.join(twice)} twice; each task is listed once")
        folders = [task_folder(t) for t in tasks]
        if len(set(folders)) < len(folders):
            raise ConfigError(f"tasks {list(tasks)} would share a folder name ({folders}); rename a dataset")
        self.tasks = list(tasks)
        self.shared_r = _positive_int(self.shared_r, "shared_r")
        self.task_r = _positive_int(self.task_r, "task_r")
        alpha = self.lora_alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {alpha!r}")
        if self.task_alpha is None:
            self.task_alpha = float(alpha) * self.task_r / self.shared_r
        ok = isinstance(self.task_alpha, (int, float)) and not isinstance(self.task_alpha, bool)
        if not ok or not math.isfinite(self.task_alpha) or self.task_alpha <= 0:
            raise ConfigError(f"task_alpha must be a positive number, got {self.task_alpha!r}")
        self.task_alpha = float(self.task_alpha)
        self.r = self.shared_r + len(self.tasks) * self.task_r
        for name in ("rank_pattern", "alpha_pattern", "loftq_config"):
            if getattr(self, name):
                raise ConfigError(f"{name} is not supported for a multi-task LoRA (shared_r and task_r are its "
                                  f"ranks); drop {name}")
        if self.use_dora:
            raise ConfigError("use_dora is not supported for a multi-task LoRA; set use_dora=False")
        if is_weight_init(self.init_lora_weights):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} (taken from the base weight) is not "
                              "supported for a multi-task LoRA; use true or 'gaussian'")
        super().__post_init__()


def task_folder(task: str) -> str:
    """The folder name of `task`'s plain LoRA inside the adapter's folder."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", task.strip())
    return "_" + name if name.startswith(".") or not name else name


class Multitask(LoraVariant):
    """The LoRA variant that gives each token the shared part plus its task's part (see module doc)."""

    key, kind, describe = "multitask", "maths", "multi-task"
    owns_forward = True
    state_attrs = ("lora_task_ids",)  # adapter name -> the current batch's task ids, set by batch_context

    def __init__(self, shared_r: int, task_r: int, n_tasks: int, scales: tuple[float, float], init: Any) -> None:
        self.shared_r, self.task_r, self.n_tasks = shared_r, task_r, n_tasks
        self.scales, self.init_value = scales, init
        self._tables: dict[str, torch.Tensor] = {}

    @classmethod
    def select(cls, cfg):
        if not isinstance(cfg, LoraMultitaskConfig):
            return None
        root = math.sqrt if cfg.use_rslora else (lambda r: r)
        scales = (cfg.lora_alpha / root(cfg.shared_r), cfg.task_alpha / root(cfg.task_r))
        return cls(cfg.shared_r, cfg.task_r, len(cfg.tasks), scales, cfg.init_lora_weights)

    @classmethod
    def setup_layer(cls, layer) -> None:
        layer.lora_task_ids = {}

    def check(self, layer_cls: type, module, path: str) -> None:
        if isinstance(module, (nn.Embedding, nn.Conv2d)):
            raise ConfigError(f"a multi-task LoRA adapts linear layers only; target {path} "
                              f"({type(module).__name__}) cannot take one: narrow lora_target / target_modules")

    def scaling(self, r: int, alpha: float) -> float:
        return 1.0  # the parts' scales are in the per-token mask

    def block(self, task: int) -> slice:
        """Task `task`'s columns of A's rows / B's columns."""
        start = self.shared_r + task * self.task_r
        return slice(start, start + self.task_r)

    def init(self, layer, name: str) -> bool:
        A, B = layer.lora_A[name].data, layer.lora_B[name].data
        init_lora(A[:self.shared_r], B[:, :self.shared_r], self.shared_r, self.init_value)
        for t in range(self.n_tasks):  # peft's start for a LoRA of rank task_r, part by part
            init_lora(A[self.block(t)], B[:, self.block(t)], self.task_r, self.init_value)
        return True

    def after_init(self, layer, name: str) -> None:
        layer.lora_scaling[name] = 1.0

    def table(self, device: torch.device) -> torch.Tensor:
        """(n_tasks + 1, R) fp32: row t the mask m_t of task t, the last row the shared part alone."""
        key = str(device)
        if key not in self._tables:
            table = torch.zeros(self.n_tasks + 1, self.shared_r + self.n_tasks * self.task_r)
            table[:, :self.shared_r] = self.scales[0]
            for t in range(self.n_tasks):
                table[t, self.block(t)] = self.scales[1]
            self._tables[key] = table.to(device)
        return self._tables[key]

    def mask(self, layer, name: str, x: torch.Tensor) -> torch.Tensor:
        """The per-token mask for input `x` (..., in): (..., R) from the batch's task ids, or (R,) (shared
        part only) when none are set. ConfigError when the ids do not cover x's tokens."""
        table = self.table(x.device)
        ids = layer.lora_task_ids.get(name)
        if ids is None:
            return table[-1]
        lead = x.shape[:-1]
        if ids.shape != lead:
            if ids.dim() == 1 and len(lead) >= 1 and ids.shape[0] == lead[0]:  # one task per row
                ids = ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
            elif ids.numel() == math.prod(lead):
                ids = ids.reshape(lead)
            else:
                raise ConfigError(f"multi-task LoRA adapter {name!r}: a layer got input of shape {tuple(x.shape)} "
                                  f"but the task ids have shape {tuple(ids.shape)}; give one task id per token "
                                  "(batch, seq) or per row (batch,)")
        return table[ids.to(x.device)]

    def add_adapters(self, layer, x, out, names):
        for name in names:
            variant = next((v for v in layer.lora_variants[name] if isinstance(v, Multitask)), None)
            if variant is None:  # a plain LoRA adapter active beside this one
                out = layer._add_lora(x, out, (name,))
                continue
            A, B = layer.lora_A[name], layer.lora_B[name]
            h = x if x.dtype == A.dtype or torch.is_autocast_enabled(x.device.type) else x.to(A.dtype)
            p = layer.lora_dropout[name]
            if p > 0.0:
                h = F.dropout(h, p=p, training=layer.training)
            t = h @ A.t()
            t = t * variant.mask(layer, name, x).to(t.dtype)
            out = out + (t @ B.t()).to(out.dtype)
        return out

    def task_tensors(self, layer, name: str, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) fp32 of task `task`'s plain LoRA with scaling 1: ([A_s; A_t], [s_s B_s, s_t B_t])."""
        A, B = layer.lora_A[name].detach().float(), layer.lora_B[name].detach().float()
        part = self.block(task)
        a = torch.cat([A[:self.shared_r], A[part]])
        b = torch.cat([B[:, :self.shared_r] * self.scales[0], B[:, part] * self.scales[1]], dim=1)
        return a, b

    def delta(self, layer, name: str, delta: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"adapter {name!r} is a multi-task LoRA, whose update differs per task; merge a task's "
                          "adapter instead (the plain LoRA saved in <adapter folder>/<task>)")

    def combine_refusal(self, names):
        return (f"adapters {names} are multi-task LoRAs; combine the plain LoRA of a task (saved in "
                "<adapter folder>/<task>)")

    def __repr__(self) -> str:
        return f"Multitask(shared_r={self.shared_r}, task_r={self.task_r}, tasks={self.n_tasks})"


register_variant(Multitask)


@contextmanager
def task_ids(model: nn.Module, ids: torch.Tensor, name: str = "default") -> Iterator[nn.Module]:
    """`with task_ids(model, ids):` the multi-task LoRA adapter `name` routes each token by `ids`, a long
    tensor (batch, seq) (or (batch,): one task per row). ConfigError for an id outside 0 .. tasks - 1 or
    an adapter that is not a multi-task LoRA. The ids are removed from the layers on exit."""
    from .core import require_state

    cfg = require_state(model, name).configs[name]
    if not isinstance(cfg, LoraMultitaskConfig):
        raise ConfigError(f"adapter {name!r} is not a multi-task LoRA (finetuning_type: lora_multitask)")
    if not torch.is_tensor(ids) or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise ConfigError(f"task ids must be a non-empty integer tensor, got {ids!r}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= len(cfg.tasks):
        raise ConfigError(f"task id {high if high >= len(cfg.tasks) else low} is outside 0 .. {len(cfg.tasks) - 1} "
                          f"(adapter {name!r} has tasks {cfg.tasks})")
    layers = [m for _, m in adapter_layers(model, name)]
    try:
        for m in layers:
            m.lora_task_ids[name] = ids
        yield model
    finally:
        for m in layers:
            m.lora_task_ids.pop(name, None)


def _batch_context(model: nn.Module, name: str, cfg: LoraMultitaskConfig, batch: dict):
    ids = batch.get("task_ids")
    if ids is None:
        raise ConfigError(f"adapter {name!r} is a multi-task LoRA but the batches carry no task ids; set "
                          "multitask: true (each dataset of dataset: is a task)")
    return task_ids(model, ids, name)


def _save_tasks(model: nn.Module, name: str, cfg: LoraMultitaskConfig, directory: Path,
                base_model_name_or_path: str | None) -> None:
    """Each task's plain peft LoRA in <directory>/<task folder>."""
    import json

    from safetensors.torch import save_file

    from .peft_config import common_fields
    from .peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, adapter_state_dict

    layers = list(adapter_layers(model, name))
    shared = adapter_state_dict(model, name)  # modules_to_save copies and biases, as the adapter file has them
    config = common_fields(model, "LORA", base_model_name_or_path)
    config.update(lora_config_to_peft(model, name, cfg, layers))
    rank = cfg.shared_r + cfg.task_r
    config.update(r=rank, lora_alpha=rank, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={})
    for t, task in enumerate(cfg.tasks):
        tensors = dict(shared)
        for path, layer in layers:
            variant = next(v for v in layer.lora_variants[name] if isinstance(v, Multitask))
            a, b = variant.task_tensors(layer, name, t)
            tensors[f"{PREFIX}{path}.lora_A.weight"] = a.cpu().contiguous()
            tensors[f"{PREFIX}{path}.lora_B.weight"] = b.cpu().contiguous()
        folder = Path(directory) / task_folder(task)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def config_to_peft(model: nn.Module, name: str, cfg: LoraMultitaskConfig, layers: list) -> dict[str, Any]:
    """LoRA's fields (r = the total rank R) plus the tasks and the parts' ranks and alphas."""
    out = lora_config_to_peft(model, name, cfg, layers)
    out.update({k: getattr(cfg, k) for k in TASK_FIELDS})
    return out


def config_from_peft(raw: dict[str, Any], source: str) -> LoraMultitaskConfig:
    """The config of a LORA_MULTITASK adapter_config.json (ModelError naming `source` for a bad field)."""
    fields = [f for f in LORA_FIELDS if f != "r"] + list(TASK_FIELDS)
    return config_from_raw(LoraMultitaskConfig, raw, fields, source)


def from_finetune_args(finetune, data) -> LoraMultitaskConfig:
    """`finetuning_type: lora_multitask`: one task per name in `dataset:` (in order), the shared part's
    rank lora_rank and alpha lora_alpha (empty: 2 lora_rank), each task's rank multitask_rank and alpha
    multitask_alpha (empty: the shared part's scaling)."""
    targets, extra = yaml_targets(finetune)
    tasks = [n.strip() for n in str(getattr(data, "dataset", None) or "").split(",") if n.strip()]
    return LoraMultitaskConfig(
        tasks=tasks, shared_r=finetune.lora_rank, task_r=finetune.multitask_rank,
        lora_alpha=finetune.lora_alpha if finetune.lora_alpha is not None else 2 * finetune.lora_rank,
        task_alpha=finetune.multitask_alpha, lora_dropout=finetune.lora_dropout, target_modules=targets,
        modules_to_save=extra, use_rslora=finetune.use_rslora,
    )


def _check_data(cfg: LoraMultitaskConfig, data, folder: str) -> None:
    """Training the adapter in `folder` further: its tasks are the datasets, in the same order."""
    names = [n.strip() for n in str(getattr(data, "dataset", None) or "").split(",") if n.strip()]
    if names != cfg.tasks:
        raise ConfigError(f"adapter '{folder}' is a multi-task LoRA of the tasks {','.join(cfg.tasks)}; to train it "
                          f"further set dataset: {','.join(cfg.tasks)} (got {','.join(names) or 'none'}): a task's "
                          "id is its place in dataset:")


def _check_targets(targets: list, cfg: LoraMultitaskConfig) -> None:
    check_adapter_size(targets, {p: cfg.r for p, _ in targets})


def _cannot_merge(cfg: LoraMultitaskConfig) -> str:
    folders = ", ".join(task_folder(t) for t in cfg.tasks)
    return (f"its update differs per task: merge one task's plain LoRA instead, saved in the folder of the task "
            f"inside the adapter's folder ({folders})")


def _use_note(raw: dict, path: str) -> str | None:
    tasks = [str(t) for t in raw.get("tasks") or []]
    folders = ", ".join(str(Path(path) / task_folder(t)) for t in tasks) or f"{path}/<task>"
    return (f"adapter '{path}' is a multi-task LoRA: used as it is, every token gets its shared part only (task "
            f"parts need task ids); to answer as one task, use that task's folder: {folders}")


register_method(AdapterMethod(
    name="lora_multitask", peft_type="LORA_MULTITASK", label="multi-task LoRA", prefix="Lora",
    config_class=LoraMultitaskConfig, layer_class=LoraLayer, layers=dict(method_named("lora").layers),
    config_to_peft=config_to_peft, config_from_peft=config_from_peft, from_finetune_args=from_finetune_args,
    reads_data_section=True, check_data=_check_data, check_targets=_check_targets, batch_context=_batch_context,
    save_beside=_save_tasks, cannot_merge=_cannot_merge, use_note=_use_note,
    keys=("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_rslora",
          "multitask_rank", "multitask_alpha"),
))  # fmt: skip
