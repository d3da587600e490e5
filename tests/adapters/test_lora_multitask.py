"""Multi-task LoRA (issue 16): a shared LoRA plus a LoRA per task, each token routed by its task id.

Oracles: the update rule by hand on one Linear; a mixed-task batch equals each example run alone
with its task; task t's part gets gradients from task t's examples only (and exactly theirs); each
task's folder is a plain peft LoRA that peft and tuneforge load to the multi-task adapter's outputs
on that task; the multi-task file loads back; merging it is refused, its tasks' files merge."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from tests.adapters.test_matrix import build
from tuneforge import LoraMultitaskConfig, add_adapter, load_adapter, save_adapter
from tuneforge.adapters import LoraConfig, list_adapters, merge_adapters
from tuneforge.adapters.lora_multitask import Multitask, task_folder, task_ids
from tuneforge.adapters.training_hooks import batch_context
from tuneforge.errors import ConfigError

KINDS = ["llama", "qwen2", "gpt2"]
TASKS = ["alpha", "beta", "gamma"]


def _config(**kw):
    return LoraMultitaskConfig(**{"tasks": TASKS, "shared_r": 4, "task_r": 2, "lora_alpha": 8, "task_alpha": 6,
                                  "target_modules": "all-linear", **kw})


def _moved(model, seed=0):
    """Random B's (they start at zero), so every part changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _adapted(kind):
    model = build(kind)
    add_adapter(model, _config())
    return _moved(model).eval()


def test_update_rule_by_hand_on_a_linear():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    base = copy.deepcopy(layer)
    holder = nn.Sequential(layer)
    add_adapter(holder, _config(target_modules=["0"], use_rslora=True))
    _moved(holder)
    A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    s_shared, s_task = 8 / 4 ** 0.5, 6 / 2 ** 0.5
    x = torch.randn(2, 4, 6)
    ids = torch.tensor([[0, 2, 1, 1], [2, 0, 0, 1]])
    with torch.no_grad(), task_ids(holder, ids):
        got = holder(x)
    want = torch.empty_like(got)
    for i in range(2):
        for j in range(4):
            t = int(ids[i, j])
            part = slice(4 + 2 * t, 6 + 2 * t)
            want[i, j] = (base(x[i, j]) + s_shared * B[:, :4] @ (A[:4] @ x[i, j])
                          + s_task * B[:, part] @ (A[part] @ x[i, j]))
    assert (got - want).abs().max().item() <= 1e-5
    with torch.no_grad():  # without task ids: the shared part alone
        shared = holder(x)
    assert (shared - (base(x) + s_shared * x @ A[:4].T @ B[:, :4].T)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_equals_each_example_alone(kind):
    model = _adapted(kind)
    ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(1))
    tasks = torch.tensor([2, 0, 1, 0])
    with torch.no_grad(), task_ids(model, tasks[:, None].expand(4, 9)):  # per token
        mixed = model(input_ids=ids).logits
    with torch.no_grad(), task_ids(model, tasks):  # per row
        per_row = model(input_ids=ids).logits
    assert (mixed - per_row).abs().max().item() == 0
    outs = []
    for i, t in enumerate(tasks.tolist()):
        with torch.no_grad(), task_ids(model, torch.tensor([t])):
            alone = model(input_ids=ids[i:i + 1]).logits[0]
        assert (alone - mixed[i]).abs().max().item() <= 1e-5
        outs.append(alone)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the tasks' parts differ


@pytest.mark.parametrize("kind", KINDS)
def test_task_part_gradients_come_only_from_its_examples(kind):
    model = _adapted(kind).train()
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(2))
    tasks = torch.tensor([1, 0, 1, 0])

    def grads(rows):
        model.zero_grad()
        with task_ids(model, tasks[rows]):
            model(input_ids=ids[rows]).logits.pow(2).mean(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mixed, only1 = grads([0, 1, 2, 3]), grads([0, 2])
    checked = 0
    for name, g in mixed.items():
        if "lora_A" not in name and "lora_B" not in name:
            continue
        layer = model.get_submodule(name.rsplit(".lora_", 1)[0])
        v = next(v for v in layer.lora_variants["default"] if isinstance(v, Multitask))
        cut = (lambda t, s: t[s]) if "lora_A" in name else (lambda t, s: t[:, s])
        # task 2 has no example: no gradient at all; task 1's gradient is that of its examples alone
        assert cut(g, v.block(2)).abs().max() == 0
        assert cut(g, v.block(1)).abs().max() > 0
        assert torch.allclose(cut(g, v.block(1)), cut(only1[name], v.block(1)), atol=1e-6, rtol=1e-4)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("kind", KINDS)
def test_each_task_saves_as_a_plain_peft_lora(kind, tmp_path):
    model = _adapted(kind)
    save_adapter(model, tmp_path / "mt")
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    again = load_adapter(build(kind), tmp_path / "mt").eval()  # the multi-task file itself
    assert isinstance(list_adapters(again)["default"], LoraMultitaskConfig)
    for t, task in enumerate(TASKS):
        folder = tmp_path / "mt" / task_folder(task)
        with torch.no_grad(), task_ids(model, torch.tensor([t, t])):
            want = model(input_ids=ids).logits
        with torch.no_grad(), task_ids(again, torch.tensor([t, t])):
            assert (again(input_ids=ids).logits - want).abs().max().item() <= 1e-5
        ours = load_adapter(build(kind), folder).eval()
        cfg = list_adapters(ours)["default"]
        assert type(cfg) is LoraConfig and cfg.r == 4 + 2
        theirs = PeftModel.from_pretrained(build(kind), str(folder)).eval()
        with torch.no_grad():
            assert (ours(input_ids=ids).logits - want).abs().max().item() <= 1e-5
            assert (theirs(input_ids=ids).logits - want).abs().max().item() <= 1e-5
        merge_adapters(ours)  # a task's LoRA merges as any LoRA
        with torch.no_grad():
            assert (ours(input_ids=ids).logits - want).abs().max().item() <= 1e-4


def test_using_the_multitask_folder_itself_warns_and_names_the_task_folders(tmp_path, caplog):
    """chat / api / eval / export given the multi-task folder answer with the shared part only: one
    warning line says so and names the task folders; a task's own folder (a plain LoRA) warns nothing."""
    from tuneforge.loading import _warn_use_note

    save_adapter(_adapted("llama"), tmp_path / "mt")
    with caplog.at_level("WARNING", logger="tuneforge"):
        _warn_use_note(str(tmp_path / "mt"))
        _warn_use_note(str(tmp_path / "mt" / task_folder(TASKS[0])))
    lines = [r.getMessage() for r in caplog.records if "multi-task" in r.getMessage()]
    folders = ", ".join(str(tmp_path / "mt" / task_folder(t)) for t in TASKS)
    assert lines == [f"adapter '{tmp_path / 'mt'}' is a multi-task LoRA: used as it is, every token gets its shared "
                     f"part only (task parts need task ids); to answer as one task, use that task's folder: {folders}"]


def test_merging_the_multitask_adapter_is_refused():
    model = _adapted("llama")
    with pytest.raises(ConfigError, match="multi-task LoRA.*merge a task's adapter"):
        merge_adapters(model)


def test_batch_context_sets_ids_for_the_forward_only():
    model = _adapted("llama").train()
    ids = torch.randint(0, 100, (2, 5))
    batch = {"input_ids": ids, "task_ids": torch.tensor([[0] * 5, [1] * 5])}
    with batch_context(model, batch):
        got = model(input_ids=ids).logits
    with task_ids(model, batch["task_ids"]):
        want = model(input_ids=ids).logits
    assert (got - want).abs().max().item() == 0
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_task_ids == {}  # removed on exit
    with pytest.raises(ConfigError, match="carry no task ids; set multitask: true"):
        with batch_context(model, {"input_ids": ids}):
            pass
    with pytest.raises(ConfigError, match=r"task id 3 is outside 0 \.\. 2"):
        with task_ids(model, torch.tensor([0, 3])):
            pass


@pytest.mark.parametrize("fields, error", [
    ({"tasks": ["only"]}, "two or more task names"),
    ({"tasks": ["a", "a"]}, "names a twice"),
    ({"task_r": 0}, "task_r must be a positive integer"),
    ({"use_dora": True}, "use_dora is not supported"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern is not supported"),
])
def test_bad_configs_are_refused(fields, error):
    with pytest.raises(ConfigError, match=error):
        _config(**fields)


def test_embedding_target_is_refused_before_any_change():
    model = build("llama")
    with pytest.raises(ConfigError, match="linear layers only"):
        add_adapter(model, _config(target_modules=["embed_tokens", "q_proj"]))
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_on_a_quantized_base_it_equals_the_dequantized_model():
    from tuneforge.adapters.lora_quant import LoraQuantLinear
    from tuneforge.quant import dequantize_model, quantize_model

    model = quantize_model(build("llama"), bits=4, quant_type="nf4", compute_dtype="float32", backend="native")
    ref = dequantize_model(copy.deepcopy(model))
    for m in (model, ref):
        torch.manual_seed(0)  # the same A's
        add_adapter(m, _config())
        _moved(m).eval()
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraQuantLinear)
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(4))
    tasks = torch.tensor([2, 0, 1])
    with torch.no_grad(), task_ids(model, tasks), task_ids(ref, tasks):
        assert (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_training_further_needs_the_same_tasks_in_order():
    from types import SimpleNamespace

    from tuneforge.adapters.methods import method_named

    check = method_named("lora_multitask").check_data
    check(_config(), SimpleNamespace(dataset="alpha, beta,gamma"), "out")
    with pytest.raises(ConfigError, match="tasks alpha,beta,gamma; to train it further set dataset: "
                                          "alpha,beta,gamma \\(got beta,alpha,gamma\\)"):
        check(_config(), SimpleNamespace(dataset="beta,alpha,gamma"), "out")
