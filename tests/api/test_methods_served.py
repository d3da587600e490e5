"""`tuneforge api` serves adapters of different methods side by side: each method (IA3, LoHa, ..., a
prefix-tuning adapter with an IA3 one too) next to a LoRA adapter on one base, each request answered as
`tuneforge chat` answers with that adapter alone, over the real HTTP server, in one shared batch."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from tests.conftest import save_moved_adapter
from tuneforge.adapters.routing import route_adapters
from tuneforge.api.server import BackgroundServer
from tuneforge.config import load_config
from tuneforge.infer import ChatModel
from tuneforge.infer.engine import Engine

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]
# one layer holds adapters of one method, so the LoRA adapter takes linear layers the other
# method leaves alone (IA3's defaults for Llama: k_proj, v_proj, down_proj)
LORA_TARGETS = ["q_proj", "o_proj", "gate_proj", "up_proj"]
IDS = torch.tensor([[1, 520, 33, 4077, 17, 902, 3, 88, 250, 7]])


OTHERS = ["k_proj", "v_proj", "down_proj"]  # what IA3 takes by default; LoRA has the rest
# method served beside LoRA -> (its adapter config: tuneforge's config class by name and fields,
# the std of the noise that moves its start)
SERVED = {
    "ia3": ("IA3Config", {}, 0.5),
    "lora_ensemble": ("LoraEnsembleConfig", {"ensemble": [{"r": 2}, {"r": 4}], "target_modules": OTHERS}, 0.5),
    "loha": ("LoHaConfig", {"r": 4, "target_modules": OTHERS}, 0.5),
    "lokr": ("LoKrConfig", {"r": 4, "target_modules": OTHERS}, 0.5),
    "ln_tuning": ("LNTuningConfig", {}, 0.5),
    "vera": ("VeraConfig", {"r": 16, "target_modules": ["k_proj", "v_proj"]}, 0.5),
    "bitfit": ("BitFitConfig", {"target_modules": ["k_proj", "down_proj"]}, 0.5),
    "oft": ("OFTConfig", {"oft_block_size": 16, "target_modules": OTHERS}, 0.5),
    "boft": ("BOFTConfig", {"boft_block_size": 8, "boft_n_butterfly_factor": 2, "target_modules": OTHERS}, 0.5),
    "prefix": ("PrefixTuningConfig", {"num_virtual_tokens": 6}, 4.0),
    "prompt": ("PromptTuningConfig", {"num_virtual_tokens": 6}, 4.0),
    "ptuning": ("PromptEncoderConfig", {"num_virtual_tokens": 6}, 4.0),
    "bottleneck": ("BottleneckConfig", {"adapter_type": "parallel", "adapter_size": 8}, 0.5),  # beside each mlp
    "mam": ("MamConfig", {"num_virtual_tokens": 6, "adapter_size": 8}, 1.0),  # a prefix + an adapter beside each mlp
    # gated LoRA on k/v (LoRA has q), a gated prefix and a gated adapter after each mlp
    "unipelt": ("UniPeltConfig", {"r": 4, "target_modules": ["k_proj", "v_proj"], "num_virtual_tokens": 6,
                                  "adapter_size": 8}, 1.0),
    # LoRA with per-layer ranks (lora_rank_pattern / lora_rank_levels write rank_pattern), beside a plain LoRA
    "lora_ranks": ("LoraConfig", {"r": 4, "rank_pattern": {r"model\.layers\.0\..+": 2, r"model\.layers\.1\..+": 8},
                                  "target_modules": OTHERS}, 0.5),
    "adalora": ("AdaLoraConfig", {"init_r": 4, "target_r": 2, "target_modules": OTHERS}, 0.5),
    # a Dynamic LoRA of max rank 6 saved at rank 3 (a plain LoRA of its first 3 components)
    "lora_dynamic": ("LoraDynamicConfig", {"dynamic_rank": {"min": 1, "max": 6, "save": 3}, "target_modules": OTHERS},
                     0.5),
    "lora_moe": ("LoraMoeConfig", {"r": 4, "num_experts": 3, "top_k": 2, "target_modules": OTHERS}, 0.5),
    # served as two adapters: the plain LoRA saved per task (in <folder>/<task>)
    "lora_multitask": ("LoraMultitaskConfig", {"tasks": ["task1", "task2"], "shared_r": 2, "task_r": 2,
                                               "target_modules": OTHERS}, 0.5),
}
TASKS = {"lora_multitask": ("task1", "task2")}  # a method whose folder holds one adapter per task
# the tensors that start at zero / one (or a copy of the base)
MOVED = ("lora_B", "ia3_l", "hada_w2_b", "lokr_w1", "ln_tuning_layers", "vera_lambda_b", "bitfit_bias", "oft_R",
         "boft_R", "boft_s", "encoders", "adapter_up", "lora_E", "lora_experts_B")
# a third adapter in the same server: a layer method beside a prefix / a module-level adapter
ALSO = {"prefix": "ia3", "bottleneck": "ia3"}


def _save(model_dir, root, method, seed):
    import tuneforge

    class_name, fields, scale = SERVED[method]
    config = getattr(tuneforge, class_name)(**fields)
    return save_moved_adapter(model_dir, root / method, config, seed, scale=scale, moved=MOVED)


@pytest.fixture(scope="module", params=list(SERVED))
def adapters(request, tiny_model_dir, tmp_path_factory):
    from tuneforge.adapters import LoraConfig

    method = request.param
    root = tmp_path_factory.mktemp("methods")
    served = {method: _save(tiny_model_dir, root, method, 1),
              "lora": save_moved_adapter(tiny_model_dir, root / "lora",
                                         LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), 2)}
    if method in ALSO:
        served[ALSO[method]] = _save(tiny_model_dir, root, ALSO[method], 3)
    if method in TASKS:
        folder = served.pop(method)
        served.update({task: folder / task for task in TASKS[method]})
    return served


def _cfg(model_dir, adapters):
    return load_config(None, {"model_name_or_path": str(model_dir), "adapter_name_or_path": adapters,
                              "do_sample": False, "infer_dtype": "float32"})


def _post(url, model):
    body = json.dumps({"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 12})
    request = urllib.request.Request(f"{url}/chat/completions", body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_method_is_served_next_to_lora_as_chat_answers(tiny_model_dir, adapters):
    chats = {name: ChatModel(_cfg(tiny_model_dir, str(path))) for name, path in adapters.items()}
    alone = {name: chat.answer(MESSAGES, max_new_tokens=12) for name, chat in chats.items()}
    base_chat = ChatModel(_cfg(tiny_model_dir, None))
    base = base_chat.answer(MESSAGES, max_new_tokens=12)
    with torch.no_grad():  # each adapter changes the model's output
        want = {name: chat.model(IDS, use_cache=False).logits for name, chat in chats.items()}
        plain = base_chat.model(IDS, use_cache=False).logits
    outputs = [*want.values(), plain]
    assert min((a - b).abs().max().item() for i, a in enumerate(outputs) for b in outputs[i + 1:]) > 1e-2

    engine = Engine.from_config(_cfg(tiny_model_dir, ",".join(str(p) for p in adapters.values())))
    assert engine.model_ids() == [engine.base_name, *adapters]
    for name in adapters:  # the served model computes what chat computes with that adapter
        with torch.no_grad(), route_adapters(engine.model, [engine.adapters[name]]):
            got = engine.model(IDS, use_cache=False).logits
        assert (got - want[name]).abs().max().item() <= 1e-5
    with BackgroundServer(engine) as url:
        assert {name: _post(url, name) for name in adapters} == alone
        assert _post(url, engine.base_name) == base
        # queued together, they share one batch and still answer as alone
        with engine.batcher.lock:
            engine.batcher.largest_batch = 0
            gens = {name: engine.generate(name, MESSAGES, temperature=0, max_tokens=12)
                    for name in (*adapters, engine.base_name)}
        together = {name: "".join(gen) for name, gen in gens.items()}
    assert engine.batcher.largest_batch >= len(adapters) + 1
    assert together == {**alone, engine.base_name: base}
