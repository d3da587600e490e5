"""`streaming: true` (LLaMA-Factory's key): the training examples are read, converted and
tokenized lazily, a chunk of records at a time, as training takes them; nothing holds the whole
data set. As LLaMA-Factory: the datasets are concatenated in `dataset:` order and shuffled in a
buffer of `buffer_size` examples (HF datasets' IterableDataset.shuffle, seeded, reshuffled each
pass), `max_steps` sets the run's length (there is no epoch count to derive it from), `val_size`
must be a number of examples (held out from the start of the stream, before shuffling, so that
no later pass trains on them), and `max_samples` and a registry entry's `num_samples` do not
apply. `eval_dataset` is read whole. What cannot stream is refused in one line (check_streaming).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterator

from tuneforge.errors import ConfigError, DataError

from .readers import Records, iter_records
from . import mixing
from .registry import get_entry, load_registry, resolve_dataset_dir
from .workers import one_process, workers

logger = logging.getLogger(__name__)

CHUNK = 1000  # records converted and tokenized together (LLaMA-Factory's preprocessing_batch_size)


def check_streaming(data_args, max_steps: int | None = None) -> None:
    """One ConfigError line for each setting that cannot stream."""
    val_size = getattr(data_args, "val_size", 0) or 0
    if 0 < val_size < 1:
        raise ConfigError(f"streaming: true holds out val_size examples from the start of the stream, so val_size "
                          f"must be a number of examples (1 or more), not a fraction (got {val_size}): a fraction "
                          "needs the whole data set's size")
    if getattr(data_args, "max_samples", None) is not None:
        raise ConfigError("max_samples does not apply with streaming: true (as in LLaMA-Factory); remove it, or set "
                          "max_steps to train on fewer examples")
    if getattr(data_args, "tokenized_path", None):
        raise ConfigError("tokenized_path saves the whole tokenized data set, which streaming: true never holds; "
                          "set one of them")
    if getattr(data_args, "multitask", False):
        raise ConfigError("multitask: true is not supported with streaming: true (each task is tokenized alone); "
                          "set one of them")
    if max_steps is not None and max_steps <= 0:
        raise ConfigError("streaming: true needs max_steps (a positive number of optimizer steps): the length of a "
                          "stream is not known in advance, so num_train_epochs cannot set the run's length")


class StreamingExamples:
    """The training examples as a stream: iterate it for one pass (`epoch` reshuffles); no len()."""

    streaming = True

    def __init__(self, data_args, tokenizer, seed: int, kind, names: list[str], skip: int = 0):
        if workers(data_args) > 1:
            logger.info("preprocessing_num_workers: streaming tokenizes each chunk of records as training takes it, "
                        "in this process (as LLaMA-Factory's streaming map, which takes no num_proc)")
        self.data_args, self.tokenizer, self.seed, self.kind = one_process(data_args), tokenizer, seed, kind
        self.names, self.skip = names, skip
        self.buffer_size = int(getattr(data_args, "buffer_size", 16384) or 16384)
        dataset_dir = resolve_dataset_dir(getattr(data_args, "dataset_dir", None))
        registry = load_registry(dataset_dir, names)
        self.entries = [get_entry(dataset_dir, registry, name, kind.name) for name in names]  # checked up front
        for entry in self.entries:
            if entry.num_samples:
                logger.warning("dataset %r: num_samples does not apply with streaming: true (as in LLaMA-Factory); "
                               "every record is read", entry.name)

    def unshuffled(self) -> Iterator[dict]:
        """Every example in dataset order, the first `skip` (the eval hold-out) left out."""
        count = 0
        for example in self._mixed():
            count += 1
            if count > self.skip:
                yield example
        if count <= self.skip:
            raise DataError(f"the datasets {', '.join(self.names)} hold {count} usable examples, and val_size holds "
                            f"out {self.skip}; none is left to train on: lower val_size")

    def _mixed(self) -> Iterator[dict]:
        """The datasets' examples one after the other, or interleaved by mix_strategy (data/mixing.py)."""
        if len(self.entries) == 1 or mixing.strategy(self.data_args) == "concat":
            for entry in self.entries:
                yield from self._examples(entry)
            return
        from datasets import IterableDataset

        streams = [IterableDataset.from_generator(_entry_examples, gen_kwargs={"source": self, "index": index})
                   for index in range(len(self.entries))]
        yield from mixing.mix_streams(streams, self.data_args, self.seed, self.names)

    def _examples(self, entry) -> Iterator[dict]:
        chunk: list[tuple[str, int | None, dict]] = []
        for item in iter_records(entry, text_lines=self.kind.name == "text"):
            chunk.append(item)
            if len(chunk) == CHUNK:
                yield from self._tokenize(entry, chunk)
                chunk = []
        if chunk:
            yield from self._tokenize(entry, chunk)

    def _tokenize(self, entry, chunk) -> list[dict]:
        records = Records()
        start = 0
        for index in range(1, len(chunk) + 1):  # one Records part per file, so where() names the file
            if index == len(chunk) or chunk[index][0] != chunk[start][0]:
                part = chunk[start:index]
                lines = [line for _, line, _ in part]
                records.add(part[0][0], [record for _, _, record in part],
                            None if lines[0] is None else _lines(lines))
                start = index
        items = self.kind.convert(entry, records, None)
        return self.kind.tokenize(items, self.data_args, self.tokenizer)

    def epoch(self, number: int) -> Iterator[dict]:
        """Pass `number` over the stream, shuffled in a buffer of buffer_size examples (HF datasets)."""
        from datasets import IterableDataset

        stream = IterableDataset.from_generator(_generate, gen_kwargs={"source": self})
        shuffled = stream.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        shuffled.set_epoch(number)
        return iter(shuffled)

    def fingerprint(self) -> str:
        """What makes the stream (for a checkpoint's data record: resuming another stream is refused)."""
        values = {"datasets": self.names, "seed": self.seed, "buffer_size": self.buffer_size, "skip": self.skip,
                  "records": self.kind.name, "cutoff_len": getattr(self.data_args, "cutoff_len", None)}
        if mixing.strategy(self.data_args) != "concat":
            values.update(mix_strategy=mixing.strategy(self.data_args),
                          interleave_probs=getattr(self.data_args, "interleave_probs", None))
        return "stream-" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def _entry_examples(source, index: int):
    yield from source._examples(source.entries[index])


def _generate(source):
    yield from source.unshuffled()


def _lines(lines):
    from array import array

    return array("q", lines)


def take_eval(examples: StreamingExamples, count: int) -> list[dict]:
    """The first `count` examples of the stream, in dataset order (the val_size hold-out)."""
    head = StreamingExamples(examples.data_args, examples.tokenizer, examples.seed, examples.kind, examples.names)
    return list(itertools.islice(head.unshuffled(), count))
