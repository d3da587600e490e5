"""LLaMA-Factory's `preprocessing_num_workers`: the per-record part of tokenization run in
worker processes through HF `datasets`' `Dataset.map(num_proc=N)`.

Each record kind's tokenize function calls `each(fn, items, data_args, tokenizer)` for its
costly step (rendering the chat template and tokenizing), where `fn` maps a list of items to
one result per item that depends on that item alone (JSON values: lists of token ids, dicts of
them). What spans items (dropping examples with no reply left and warning about them, cutting
pt's blocks, kto's mismatched replies) stays in the calling process, so the examples are the
same, in the same order, as in one process: `datasets` cuts the items into `num_proc`
contiguous shards and concatenates the results in shard order.

Unset (or 1): `fn` runs in this process, no `datasets` involved (the default; on small data
it is faster, docs/data.md). `overwrite_cache` is passed on as `load_from_cache_file=not
overwrite_cache` (LLaMA-Factory's mapping); the items live in memory, so `datasets` writes no
cache file for this map and the key's effect is the tokenized_path one (tokenized.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from .hf_files import quiet

logger = logging.getLogger(__name__)

BATCH = 1000  # items per call of fn inside a worker (LLaMA-Factory's preprocessing_batch_size)


def workers(data_args) -> int:
    """preprocessing_num_workers as a count (1 when unset), at most the CPU cores this process may
    use (more processes than cores only add start-up cost; said once in the log)."""
    wanted = max(1, int(getattr(data_args, "preprocessing_num_workers", None) or 1))
    cores = cpu_cores()
    if wanted > cores:
        _note_once(f"preprocessing_num_workers={wanted}: {cores} worker processes, one per CPU core available")
    return min(wanted, cores)


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_noted: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        logger.info(message)


def each(fn: Callable, items: list, data_args, tokenizer) -> list:
    """fn(items, data_args, tokenizer), with the items split over preprocessing_num_workers
    processes when it is above 1 (datasets.map, batched, num_proc); the results in item order.
    Errors raised in a worker (DataError, ...) reach the caller as raised."""
    count = min(workers(data_args), len(items))
    if count <= 1:
        return fn(items, data_args, tokenizer)
    from datasets import Dataset

    def run(batch: dict) -> dict:
        results = fn([items[i] for i in batch["index"]], data_args, tokenizer)
        return {"result": [json.dumps(result) for result in results]}

    with quiet():
        mapped = Dataset.from_dict({"index": list(range(len(items)))}).map(
            run, batched=True, batch_size=BATCH, num_proc=count, remove_columns=["index"],
            load_from_cache_file=not bool(getattr(data_args, "overwrite_cache", False)))
    logger.debug("tokenized %d items in %d worker processes", len(items), count)
    return [json.loads(text) for text in mapped["result"]]


def one_process(data_args):
    """A copy of data_args with preprocessing_num_workers unset (streaming tokenizes each chunk
    in this process: as LLaMA-Factory, whose streaming map takes no num_proc)."""
    import copy

    args = copy.copy(data_args)
    try:
        args.preprocessing_num_workers = None
    except AttributeError:  # a read-only args object: it has no such key to unset
        pass
    return args
