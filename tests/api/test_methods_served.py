"""`tuneforge api` serves adapters of different methods side by side: IA3 and bottleneck adapters
next to a LoRA adapter on one base, each request answered as `tuneforge chat` answers with that adapter
alone, over the real HTTP server, in one shared batch."""

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
# IA3 takes its defaults for Llama (k_proj, v_proj, down_proj); one layer holds adapters of one
# method, so the LoRA adapter takes the other linear layers; the parallel bottleneck adapter sits
# beside each mlp block
LORA_TARGETS = ["q_proj", "o_proj", "gate_proj", "up_proj"]
IDS = torch.tensor([[1, 520, 33, 4077, 17, 902, 3, 88, 250, 7]])


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from tuneforge import BottleneckConfig, IA3Config
    from tuneforge.adapters import LoraConfig

    root = tmp_path_factory.mktemp("methods")
    return {"ia3": save_moved_adapter(tiny_model_dir, root / "ia3", IA3Config(), 1),
            "lora": save_moved_adapter(tiny_model_dir, root / "lora",
                             LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), 2),
            "bottleneck": save_moved_adapter(tiny_model_dir, root / "bottleneck", BottleneckConfig(
                adapter_type="parallel", adapter_size=8), 3, moved=("adapter_up",))}


def _cfg(model_dir, adapters):
    return load_config(None, {"model_name_or_path": str(model_dir), "adapter_name_or_path": adapters,
                              "do_sample": False, "infer_dtype": "float32"})


def _post(url, model):
    body = json.dumps({"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 12})
    request = urllib.request.Request(f"{url}/chat/completions", body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_methods_are_served_next_to_lora_as_chat_answers(tiny_model_dir, adapters):
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
