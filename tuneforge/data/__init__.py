"""Datasets and chat templates: registry -> records -> conversations -> tokens + labels -> batches.

    splits = load_datasets(cfg.data, tokenizer, seed=42)   # DatasetSplits(train=[...], eval=[...])
    batch = PaddingCollator(tokenizer.pad_token_id)(splits.train[:8])
"""

from .collate import PaddingCollator
from .encode import IGNORE_INDEX, encode_conversation, encode_conversations
from .formats import Conversation
from .loader import DatasetSplits, load_datasets
from .packing import PackingCollator
from .registry import default_dataset_dir
from .templates import TEMPLATES, Template, apply_template, get_template

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "Conversation",
    "DatasetSplits",
    "PackingCollator",
    "PaddingCollator",
    "Template",
    "apply_template",
    "default_dataset_dir",
    "encode_conversation",
    "encode_conversations",
    "get_template",
    "load_datasets",
]
