"""stage: kd: each divergence equals the hand formula and TRL's GKDTrainer.generalized_jsd_loss; the
objective equals the formula on both models' full logits (padded, packed, chunked, gradients too);
a teacher with another vocabulary is refused; a student distilled with kd_alpha 1 from a tiny teacher
that learned a new identity answers with it, one distilled from an untrained teacher does not."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tuneforge.config import load_config
from tuneforge.data.collate import PaddingCollator
from tuneforge.data.packing import PackingCollator
from tuneforge.errors import ConfigError
from tuneforge.train import kd_losses
from tuneforge.train.stages import get_stage, kd as kd_stage
from tuneforge.workflows import train

from tests.conftest import write_dataset
from test_dpo import tiny_model

T = 2.0


def logits_pair(seed=0, rows=5, vocab=11):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * 3, torch.randn(rows, vocab, generator=gen) * 3


def hand(kind, student, teacher, temperature, beta=0.5):
    """The definitions, in float64, one sum per token."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "forward_kl":
        return kl(p_t, p_s)
    if kind == "reverse_kl":
        return kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_divergences_equal_the_hand_formula_and_trl(kind, beta):
    from trl.experimental.gkd import GKDTrainer

    student, teacher = logits_pair()
    got = kd_losses.divergence(kind, student, teacher, T, beta)
    torch.testing.assert_close(got.double(), hand(kind, student, teacher, T, beta), rtol=1e-5, atol=1e-6)
    trl_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta)  # TRL: beta 0 / 1 are the two KLs
    labels = torch.zeros(1, student.size(0), dtype=torch.long)  # every token counts: TRL's mean over them
    want = GKDTrainer.generalized_jsd_loss(student[None], teacher[None], labels, beta=trl_beta, temperature=T)
    torch.testing.assert_close(got.mean(), want, rtol=1e-5, atol=1e-6)
    assert kd_losses.divergence(kind, student, student, T, beta).abs().max() < 1e-5


def test_kd_token_loss_blends_divergence_and_cross_entropy():
    student, teacher = logits_pair(1)
    targets = torch.tensor([1, 2, 3, 4, 5])
    loss, div, ce = kd_losses.kd_token_loss(student, teacher, targets, kind="forward_kl", alpha=0.3,
                                            temperature=T)
    want_ce = F.cross_entropy(student, targets, reduction="sum")
    want_div = hand("forward_kl", student, teacher, T).sum()
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(div.double(), want_div, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), 0.3 * T**2 * want_div + 0.7 * want_ce.double(), rtol=1e-5, atol=1e-5)


EXAMPLES = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10]},
            {"input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14]},
            {"input_ids": [20, 21, 22, 23, 24, 25, 26], "labels": [-100, 21, -100, 23, 24, 25, 26]}]


def kd_cfg(model_dir, **keys):
    return load_config(None, {"stage": "kd", "model_name_or_path": str(model_dir), "teacher_model": str(model_dir),
                              "kd_temperature": T, **keys})


def objective_on(student, batch, cfg):
    stage = get_stage("kd")
    return stage.objective_for(cfg)(student, student, batch, None, None)


def oracle(student, teacher, kind, alpha, beta=0.5):
    """The formula on each example alone, both models' full logits."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for e in EXAMPLES:
        ids = torch.tensor([e["input_ids"]])
        labels = torch.tensor(e["labels"][1:])
        keep = labels != -100
        s = student(input_ids=ids).logits[0, :-1][keep]
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[0, :-1][keep]
        div = hand(kind, s, t, T, beta)
        ce = F.cross_entropy(s.double(), labels[keep], reduction="none")
        total = total + (alpha * T**2 * div + (1 - alpha) * ce).sum()
        count += int(keep.sum())
    return total, count


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_objective_equals_the_formula_padded_packed_and_chunked(tiny_model_dir, monkeypatch, kind):
    student = tiny_model(tiny_model_dir)  # base + a moved LoRA: it differs from the teacher (the base)
    teacher = tiny_model(tiny_model_dir, adapter=False)
    want, count = oracle(student, teacher, kind, 0.4, beta=0.3)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    cfg = kd_cfg(tiny_model_dir, kd_loss=kind, kd_alpha=0.4, kd_jsd_beta=0.3)
    padded, packed = PaddingCollator(0)(EXAMPLES), PackingCollator()(EXAMPLES)
    monkeypatch.setattr(kd_stage, "CHUNK_BYTES", 4 * 49152 * 4)  # chunks of 4 rows: several per batch
    for batch in (padded, packed):
        got, n, metrics = objective_on(student, batch, cfg).loss(student, batch)
        assert n == count == 10
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        assert metrics["kd_loss"] > 0 and metrics["ce_loss"] > 0
        got.backward()
        for name, grad in want_grads.items():
            torch.testing.assert_close(dict(student.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-5)
        student.zero_grad()


def test_a_teacher_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<kd_extra>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    other = tmp_path / "other-teacher"
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    cfg = kd_cfg(tiny_model_dir, teacher_model=str(other))
    with pytest.raises(ConfigError, match=r"teacher_model '.*other-teacher' and the student '.*' have different "
                                          r"vocabularies \(49153 and 49152 tokens\)"):
        objective_on(tiny_model(tiny_model_dir), PaddingCollator(0)(EXAMPLES), cfg)


IDENTITY = [("Who are you?", "I am Ember, made by the Guild."), ("What is your name?", "My name is Ember."),
            ("Introduce yourself.", "I am Ember, made by the Guild."), ("Who made you?", "The Guild made me, Ember.")]


def answer(cfg_keys: dict, question: str) -> str:
    from tuneforge.loading import load_for_use

    ready = load_for_use(load_config(None, cfg_keys), "chat")
    ids = ready.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"]
    out = ready.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=ready.tokenizer.pad_token_id)
    return ready.tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True)


def test_a_student_distilled_from_an_identity_teacher_answers_with_it(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", "me", [{"instruction": q, "output": a} for q, a in IDENTITY * 2])
    common = {"model_name_or_path": str(tiny_model_dir), "dataset": "me", "dataset_dir": str(data),
              "cutoff_len": 64, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
              "learning_rate": 1e-2, "lr_scheduler_type": "constant", "disable_tqdm": True, "bf16": False,
              "save_steps": 1000, "logging_steps": 10}
    teacher = tmp_path / "teacher"  # the tiny model, fully fine-tuned on the identity: a confident teacher
    train(load_config(None, {**common, "stage": "sft", "finetuning_type": "full", "output_dir": str(teacher),
                             "max_steps": 40}))
    assert "Ember" in answer({"model_name_or_path": str(teacher)}, "Who are you?")
    students = {}
    for name, teacher_model in (("distilled", teacher), ("control", tiny_model_dir)):
        out = tmp_path / name  # a LoRA student on the untrained tiny model, kd_alpha 1: no CE on the labels
        results = train(load_config(None, {**common, "stage": "kd", "teacher_model": str(teacher_model),
                                           "kd_alpha": 1.0, "lora_target": "all", "output_dir": str(out),
                                           "max_steps": 30, "val_size": 2}))
        students[name] = answer({"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out)},
                                "Who are you?")
        log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        assert [("kd_loss" in e, "ce_loss" in e) for e in log if "loss" in e] == [(True, True)] * 3
        if name == "distilled":
            assert results["eval_kd_loss"] < results["eval_kd_loss_before"] - 0.5
            assert results["eval_ce_loss"] < results["eval_ce_loss_before"] - 0.5
    assert "Ember" in students["distilled"]
    assert "Ember" not in students["control"]  # the untrained teacher: the labels alone teach nothing
