"""Hub model ids (`model_name_or_path: org/name`) load as transformers / LLaMA-Factory load them:
from a Hugging Face cache laid out on disk as huggingface_hub writes it
(models--org--name/snapshots/<commit>/ + refs/<revision>), offline, with cache_dir, HF_HOME,
model_revision; what cannot load says so in one line. No test touches the network: HF_HUB_OFFLINE
is set, or the cache holds the snapshot."""

from __future__ import annotations

import shutil

import pytest
import torch

from tuneforge import models
from tuneforge.config import ModelArguments, load_config
from tuneforge.errors import ModelError

COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def make_cache(root, repo_id: str, source, revisions=("main",)):
    """An HF hub cache under `root` holding `source` (a model folder) as `repo_id` at each revision."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for rev in revisions:
        shutil.copytree(source, repo / "snapshots" / COMMITS[rev])
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(COMMITS[rev])
    return root


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "USE_MODELSCOPE_HUB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([[1, 20, 30, 40]])).logits


def test_a_hub_id_loads_from_cache_dir_offline(offline, tmp_path, tiny_model_dir):
    cache = make_cache(tmp_path / "cache", "org/tiny-llama", tiny_model_dir)
    model, tokenizer = models.load_model_and_tokenizer(
        ModelArguments(model_name_or_path="org/tiny-llama", cache_dir=str(cache)))
    local, _ = models.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    torch.testing.assert_close(_logits(model), _logits(local), rtol=0, atol=0)
    assert tokenizer("Hello").input_ids


def test_hf_home_and_model_revision_are_honoured(offline, monkeypatch, tmp_path, tiny_model_dir):
    make_cache(tmp_path / "home" / "hub", "org/tiny-llama", tiny_model_dir, revisions=("main", "v1"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    main = models.model_path(ModelArguments(model_name_or_path="org/tiny-llama"))
    v1 = models.model_path(ModelArguments(model_name_or_path="org/tiny-llama", model_revision="v1"))
    assert main.name == COMMITS["main"] and v1.name == COMMITS["v1"]
    with pytest.raises(ModelError, match=r"^model 'org/tiny-llama' \(model_revision 'v2'\) is not in the "
                                         r"Hugging Face cache .* and HF_HUB_OFFLINE is set: download it"):
        models.model_path(ModelArguments(model_name_or_path="org/tiny-llama", model_revision="v2"))


def test_an_uncached_hub_id_offline_is_one_line(offline, tmp_path):
    with pytest.raises(ModelError) as info:
        models.model_path(ModelArguments(model_name_or_path="meta-llama/Llama-3-8B"))
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"model 'meta-llama/Llama-3-8B' is not in the Hugging Face cache ({tmp_path / 'empty-hf-home' / 'hub'}) "
        "and HF_HUB_OFFLINE is set: download it where there is network (`hf download meta-llama/Llama-3-8B`)")


def test_modelscope_without_its_package_is_one_line(offline):
    try:
        import modelscope  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match=r"^use_modelscope_hub needs the modelscope package: `pip install "
                                             r"modelscope`"):
            models.model_path(ModelArguments(model_name_or_path="qwen/Qwen2-0.5B", use_modelscope_hub=True))
    else:  # installed: it must at least refuse an id it cannot fetch offline in one line
        with pytest.raises(ModelError):
            models.model_path(ModelArguments(model_name_or_path="no-such-org/no-such-model", use_modelscope_hub=True))


def test_the_default_models_hub_id_uses_the_bundled_copy_unless_cached(offline, tmp_path, tiny_model_dir):
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.model_path(ModelArguments(model_name_or_path=hub_id)) == models.default_model_dir()
    cache = make_cache(tmp_path / "cache", hub_id, tiny_model_dir)
    assert models.model_path(ModelArguments(model_name_or_path=hub_id, cache_dir=str(cache))).name == COMMITS["main"]


def test_training_with_a_hub_id_records_no_token(offline, tmp_path, tiny_model_dir, tiny_data_dir):
    from tuneforge.workflows import train

    cache = make_cache(tmp_path / "cache", "org/tiny-llama", tiny_model_dir)
    out = tmp_path / "run"
    train(load_config(None, {"model_name_or_path": "org/tiny-llama", "cache_dir": str(cache),
                             "hf_hub_token": "hf_secret_value", "dataset": "arith",
                             "dataset_dir": str(tiny_data_dir), "output_dir": str(out), "max_steps": 1,
                             "cutoff_len": 64, "bf16": False, "disable_tqdm": True}))
    assert (out / "adapter_model.safetensors").exists()
    written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file()
                      and p.suffix in (".json", ".yaml", ".jsonl", ".txt"))
    assert "org/tiny-llama" in written and "hf_secret_value" not in written
