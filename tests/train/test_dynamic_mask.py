"""sft's dynamic_mask_ratio: training batches have prompt tokens (unlabelled, not special) replaced
by the mask token, anew each epoch and deterministically (seed, epoch, example); labels never
change; evaluation batches are not masked; a resumed run equals the uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.data.collate import PaddingCollator
from tuneforge.data.dynamic_mask import DynamicMask, mask_token
from tuneforge.models import load_tokenizer
from tuneforge.train.batches import MicroBatchStream
from tuneforge.train.stages import get_stage
from tuneforge.workflows import train

from tests.conftest import arithmetic_records, write_dataset

IGNORE = -100


@pytest.fixture(scope="module")
def encoded(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer, and 48 arithmetic records encoded by stage sft (chat template)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    data = write_dataset(tmp_path_factory.mktemp("dm") / "data", "arith", arithmetic_records())
    args = load_config(None, {"stage": "sft", "dataset": "arith", "dataset_dir": str(data), "cutoff_len": 64}).data
    return tokenizer, get_stage("sft").encode(args, tokenizer, 0).train


def test_masks_only_prompt_tokens_anew_each_epoch(encoded):
    tokenizer, examples = encoded
    token_id, which = mask_token(tokenizer)
    assert (token_id, which) == (tokenizer.unk_token_id, "unk")  # SmolLM2's tokenizer has no mask token
    special = set(tokenizer.all_special_ids)
    masker = DynamicMask(PaddingCollator(tokenizer.pad_token_id), 0.3, token_id, special)
    stream = MicroBatchStream(examples, 4, masker, seed=7)
    plain = MicroBatchStream(examples, 4, PaddingCollator(tokenizer.pad_token_id), seed=7)
    masked_at = {}  # (epoch, example index) -> masked positions
    eligible = changed = 0
    for j in range(2 * stream.per_epoch):
        batch, original = stream.get(j), plain.get(j)
        assert torch.equal(batch["labels"], original["labels"])  # labels never change
        assert torch.equal(batch["attention_mask"], original["attention_mask"])
        assert torch.equal(stream.get(j)["input_ids"], batch["input_ids"])  # a pure function of j
        diff = batch["input_ids"] != original["input_ids"]
        assert (batch["input_ids"][diff] == token_id).all()
        assert (original["labels"][diff] == IGNORE).all()  # only unlabelled (prompt) positions
        assert not any(int(t) in special for t in original["input_ids"][diff])
        can = (original["labels"] == IGNORE) & (original["attention_mask"] == 1)
        can &= ~torch.isin(original["input_ids"], torch.tensor(sorted(special)))
        eligible, changed = eligible + int(can.sum()), changed + int(diff.sum())
        for row, index in enumerate(stream.indices(j)):
            masked_at[(j // stream.per_epoch, index)] = diff[row].nonzero().flatten().tolist()
    assert changed / eligible == pytest.approx(0.3, abs=0.03)  # ~1,500 prompt tokens
    # each example's masked positions differ between the epochs (the same example, seen again)
    assert sum(masked_at[(0, i)] != masked_at[(1, i)] for i in range(len(examples))) >= len(examples) - 2
    assert torch.equal(masker(examples[:4])["input_ids"], PaddingCollator(tokenizer.pad_token_id)(examples[:4])["input_ids"])


def tiny_cfg(model_dir, data_dir, out, **overrides):
    values = {"model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
              "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "max_steps": 6, "save_steps": 3,
              "logging_steps": 3, "lora_rank": 4, "disable_tqdm": True, "bf16": False, "val_size": 0}
    return load_config(None, {**values, **overrides})


def test_a_resumed_run_draws_the_same_masks(tiny_model_dir, tmp_path):
    import shutil

    data = write_dataset(tmp_path / "data", "arith", arithmetic_records(8))  # 2 micro-batches per epoch
    train(tiny_cfg(tiny_model_dir, data, tmp_path / "full", dynamic_mask_ratio=0.5))
    train(tiny_cfg(tiny_model_dir, data, tmp_path / "unmasked"))
    # the run stopped after step 3 (mid-epoch 1): its checkpoint in a folder of its own, resumed
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    train(tiny_cfg(tiny_model_dir, data, tmp_path / "resumed", dynamic_mask_ratio=0.5,
                   resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3")))
    full, resumed, unmasked = (load_file(tmp_path / name / "adapter_model.safetensors")
                               for name in ("full", "resumed", "unmasked"))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert any(not torch.equal(full[key], unmasked[key]) for key in full)  # the masks changed the inputs
