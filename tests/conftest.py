"""Shared fixtures: the real default model (converted once into the user cache), a tiny random
Llama that uses its tokenizer, LLaMA-Factory's demo data in ../shared/data, and small datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TUNEFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs one worker per core), each worker trains with its share
    of the cores: with two threads each on two cores, the workers' OpenMP threads wait for each
    other's (issue 21). Subprocesses that tests start inherit it; an OMP_NUM_THREADS the user set wins."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or "OMP_NUM_THREADS" in os.environ:
        return
    from tuneforge.threads import choose_threads

    share = max(1, choose_threads()[0] // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(share)
    torch.set_num_threads(share)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    assert (SHARED_DATA / "dataset_info.json").is_file(), (
        f"LLaMA-Factory's demo data is expected in {SHARED_DATA} (set TUNEFORGE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from tuneforge.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_path) -> Path:
    """A randomly initialised 2-layer Llama with the default model's tokenizer and template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_dataset(directory: Path, name: str, records, formatting: str = "alpaca",
                  extra: dict | None = None) -> Path:
    """Write records (list, or raw text) and register them in directory/dataset_info.json."""
    directory.mkdir(parents=True, exist_ok=True)
    file_name = f"{name}.json"
    (directory / file_name).write_text(records if isinstance(records, str) else json.dumps(records))
    info_path = directory / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    entry = {"file_name": file_name}
    if formatting != "alpaca":
        entry["formatting"] = formatting
    entry.update(extra or {})
    info[name] = entry
    info_path.write_text(json.dumps(info, indent=2))
    return directory


def arithmetic_records(n: int = 48) -> list[dict]:
    """Short, learnable alpaca records: a tiny model's loss falls on them within a few steps."""
    return [{"instruction": f"What is {a} plus {a % 7}?", "input": "", "output": f"{a + a % 7}."}
            for a in range(n)]


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    return write_dataset(tmp_path / "data", "arith", arithmetic_records())


def save_moved_adapter(model_dir, out, config, seed: int, scale: float = 0.5, moved=("lora_B", "ia3_l"),
                       prepare=None) -> Path:
    """Save an adapter of `config` on the model in `model_dir` whose `moved` tensors have random
    noise (std `scale`, from `seed`) added, so it changes the output like a trained one would;
    `prepare(model)` runs after the adapter is added (a LoftQ start, say). Returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters import add_adapter, save_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_adapter(model, config)
    if prepare is not None:
        prepare(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in moved):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    save_adapter(model, out)
    return out
