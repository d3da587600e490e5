"""stage: kd, knowledge distillation on sft data: the student (the model being trained, with an
adapter or in full) learns the teacher's next-token distributions at the reply tokens, blended
with the usual cross-entropy on the labels. Per label token (the positions sft's loss uses),

    loss = kd_alpha * T^2 * D(teacher || student at temperature T) + (1 - kd_alpha) * CE

summed over the label tokens and divided by their count, as sft's loss; D is `kd_loss`
(train/kd_losses.py: forward_kl as Hinton et al. 2015, reverse_kl as MiniLLM, jsd as GKD's
generalised JSD with kd_jsd_beta) and T is kd_temperature (both distributions softened by it;
T^2 as Hinton's keeps the gradient scale). kd_alpha 1 learns from the teacher alone, 0 is sft.

The teacher is `teacher_model` (a local folder, a hub id, or empty: the default model) with an
optional LoRA `teacher_adapter`, loaded by the model section's rules (cache_dir, trust_remote_code,
quantization_bit, flash_attn) in the student's dtype, on its device, frozen, in eval mode, and run
under torch.no_grad. It must share the student's tokenizer vocabulary (refused in one line
otherwise); a teacher whose output layer is padded to another size is compared over the
tokenizer's tokens. Memory: both models' output heads run only at the labelled positions (where
the fused loss's probe passes), in chunks of rows whose (rows x vocabulary) logits are recomputed
in backward, so the two models' full-vocabulary logits of the batch never exist at once. Packed
rows work (per-token loss) when the teacher reads them exactly too (probed, as the student).

Metrics: kd_loss (the divergence D per label token, before T^2 and kd_alpha) and ce_loss (the
labels' cross-entropy per label token), in trainer_log.jsonl and the eval results."""

from __future__ import annotations

import math

from .sft import collator, encode
from .table import Objective, Stage, register_stage, stage_key

KEYS = {
    "teacher_model": stage_key(None, "stage: kd: the teacher, a model folder or hub id as model_name_or_path "
                               "takes (empty: the default model); it must share the student's tokenizer.",
                               type="Optional[str]"),
    "teacher_adapter": stage_key(None, "stage: kd: a LoRA (or other adapter) folder applied to the teacher "
                                 "(e.g. the output_dir of an sft run). Empty: the teacher as it is.",
                                 type="Optional[str]"),
    "kd_alpha": stage_key(0.5, "stage: kd: weight of the distillation term: loss = kd_alpha * T^2 * "
                          "D(teacher || student) + (1 - kd_alpha) * CE on the labels.", bounds="[0, 1]"),
    "kd_temperature": stage_key(1.0, "stage: kd: temperature T that softens both distributions before "
                                "they are compared (Hinton et al. 2015).", bounds="(0, inf)"),
    "kd_loss": stage_key("forward_kl", "stage: kd: the divergence D: forward_kl (KL(teacher || student), "
                         "Hinton), reverse_kl (KL(student || teacher), MiniLLM) or jsd (GKD's generalised "
                         "Jensen-Shannon, kd_jsd_beta).", choices=("forward_kl", "reverse_kl", "jsd")),
    "kd_jsd_beta": stage_key(0.5, "stage: kd with kd_loss: jsd: the mixture weight beta of the teacher "
                             "(GKD / TRL's beta; 0.5: symmetric JSD).", bounds="(0, 1)"),
}
METRICS = ("kd_loss", "ce_loss")
CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk of rows, per model


def _name(path) -> str:
    return f"'{path}'" if path else "the default model"


def load_teacher(cfg, settings: dict, student):
    """The frozen teacher (eval mode, no gradients) on the student's device, in the dtype of its
    weights. Raises ModelError (a teacher that cannot load) and ConfigError (another vocabulary
    than the student's), before training starts."""
    import dataclasses
    from pathlib import Path

    from ... import models
    from ...errors import ConfigError, ModelError

    adapter = settings["teacher_adapter"]
    if adapter and not Path(adapter).is_dir():  # before the teacher loads
        raise ConfigError(f"config key 'teacher_adapter': folder '{adapter}' does not exist; train the teacher's "
                          "adapter first (examples/kd.yaml's: `tuneforge train examples/demo_identity.yaml` writes "
                          "saves/demo-identity) and set teacher_adapter to its output_dir, or leave it empty to "
                          "distil from teacher_model alone")
    teacher_args = dataclasses.replace(cfg.model, model_name_or_path=settings["teacher_model"] or None,
                                       adapter_name_or_path=None, model_revision="main")
    dtype = student.get_input_embeddings().weight.dtype  # what the student's base was loaded in
    try:
        teacher, teacher_tokenizer = models.load_model_and_tokenizer(teacher_args, dtype=dtype)
    except ModelError as exc:
        raise ModelError(f"stage: kd: teacher_model: {exc}") from None
    student_tokenizer = models.load_tokenizer(models.model_path(cfg.model), cfg.model.trust_remote_code)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(
            f"stage: kd: teacher_model {_name(settings['teacher_model'])} and the student "
            f"{_name(cfg.model.model_name_or_path)} have different vocabularies ({len(teacher_tokenizer)} "
            f"and {len(student_tokenizer)} tokens); distillation compares their next-token distributions "
            "token by token, so give a teacher with the student's tokenizer")
    if settings["teacher_adapter"]:
        teacher = models.attach_adapters(teacher, [settings["teacher_adapter"]], trainable=False)
    teacher.requires_grad_(False).eval()
    return teacher.to(next(student.parameters()).device)


def _logit_width(model) -> int:
    head = model.get_output_embeddings()
    return head.out_features if head is not None else model.config.vocab_size


def _check_packed_teacher(teacher, sample_batch: dict) -> None:
    """Packed rows (position_ids, no attention_mask): the teacher must read them exactly too."""
    from ...errors import ConfigError
    from ..packed_attention import use_packed_attention
    from ..packing import probe_packing

    if "attention_mask" in sample_batch or "position_ids" not in sample_batch:
        return
    use_packed_attention(teacher)
    problem = probe_packing(teacher)
    if problem is not None:
        raise ConfigError(f"stage: kd: the student trains on packed rows but the teacher does not read them "
                          f"exactly ({problem}); set packing: false")


def _rows(run_model, owner, inputs: dict, keep, at_labels: bool):
    """(rows, head): the final hidden states at the kept positions and the head to apply to
    them (at_labels), or the logits there and None."""
    from ..fused_loss import head_as_identity

    if at_labels:
        with head_as_identity(owner) as head:
            out = run_model(**inputs).logits
        return out[:, :-1][keep], head
    return run_model(**inputs).logits[:, :-1][keep], None


def kd_objective(model, unwrapped, sample_batch: dict, train_args, autocast, *, settings: dict,
                 cfg) -> Objective:
    """The distillation loss (the module's docstring) summed over label tokens; metric sums
    kd_loss and ce_loss. Loads the teacher (load_teacher)."""
    import inspect
    from contextlib import nullcontext

    import torch
    from torch.utils.checkpoint import checkpoint

    from ...errors import ConfigError
    from ..fused_loss import probe
    from ..kd_losses import kd_token_loss
    from ..token_loss import IGNORE, label_count, model_inputs

    teacher = load_teacher(cfg, settings, unwrapped)
    _check_packed_teacher(teacher, sample_batch)
    autocast = autocast or nullcontext
    probe_inputs = {k: v[:1, :16] for k, v in model_inputs(sample_batch).items()}
    with autocast():
        student_at_labels = probe(unwrapped, probe_inputs) is None
        teacher_at_labels = probe(teacher, probe_inputs) is None
    widths = _logit_width(unwrapped), _logit_width(teacher)
    vocab = None
    if widths[0] != widths[1]:  # e.g. an output layer padded to a multiple of 64 or 128
        from ... import models
        vocab = len(models.load_tokenizer(models.model_path(cfg.model), cfg.model.trust_remote_code))
        if vocab > min(widths):
            raise ConfigError(f"stage: kd: the teacher's logits have {widths[1]} entries and the student's "
                              f"{widths[0]}, fewer than the tokenizer's {vocab} tokens; give a matching teacher")
    options = {"kind": settings["kd_loss"], "alpha": settings["kd_alpha"],
               "temperature": settings["kd_temperature"], "beta": settings["kd_jsd_beta"]}
    chunk_rows = max(1, CHUNK_BYTES // (4 * max(widths)))
    no_cache = lambda m: {"use_cache": False} if "use_cache" in inspect.signature(m.forward).parameters else {}  # noqa: E731
    student_extra, teacher_extra = no_cache(unwrapped), no_cache(teacher)

    def piece(s_rows, t_rows, targets, s_head, t_head):
        student = s_head(s_rows) if s_head is not None else s_rows
        with torch.no_grad():
            teacher_logits = t_head(t_rows) if t_head is not None else t_rows
        if vocab is not None:
            student, teacher_logits = student[:, :vocab], teacher_logits[:, :vocab]
        return kd_token_loss(student, teacher_logits, targets, **options)

    def loss(run_model, batch: dict):
        inputs = model_inputs(batch)
        shifted = batch["labels"][:, 1:]
        keep = shifted != IGNORE
        s_rows, s_head = _rows(run_model, unwrapped, {**inputs, **student_extra}, keep, student_at_labels)
        if not keep.any():  # no labels: a zero that still depends on the graph
            return s_rows.sum() * 0.0, 0, dict.fromkeys(METRICS, 0.0)
        with torch.no_grad():
            t_rows, t_head = _rows(teacher, teacher, {**inputs, **teacher_extra}, keep, teacher_at_labels)
        targets = shifted[keep]
        total, div_sum, ce_sum = 0.0, 0.0, 0.0
        recompute = torch.is_grad_enabled() and s_rows.requires_grad
        for start in range(0, targets.numel(), chunk_rows):
            part = slice(start, start + chunk_rows)
            args = (s_rows[part], t_rows[part], targets[part], s_head, t_head)
            # recomputed in backward: one chunk's (rows x vocabulary) logits at a time
            out = checkpoint(piece, *args, use_reentrant=False) if recompute else piece(*args)
            total = total + out[0]
            div_sum += out[1].item()
            ce_sum += out[2].item()
        return total, int(targets.numel()), {"kd_loss": div_sum, "ce_loss": ce_sum}

    return Objective(loss, label_count, METRICS)


def perplexity(means: dict) -> dict:
    """The labels' perplexity, from ce_loss (the loss itself is the blend)."""
    return {"perplexity": math.exp(min(means["ce_loss"], 50))} if "ce_loss" in means else {}


register_stage(Stage(
    name="kd",
    help="knowledge distillation on conversations: the student learns teacher_model's next-token "
         "distributions at the reply tokens (kd_loss, kd_temperature), blended with the labels' "
         "cross-entropy by kd_alpha",
    records="conversations",
    encode=encode,
    collator=collator,
    objective=kd_objective,
    eval_metrics=perplexity,
    keys=KEYS,
    plot=("kd_loss",),
))
