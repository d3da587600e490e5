"""The training data as one deterministic stream of micro-batches: epoch e is a permutation
seeded by (seed, e), and micro-batch j of the stream is a pure function of j. Resuming is then
just starting at j = micro_batches_seen, with no data replayed and none skipped."""

from __future__ import annotations

import hashlib
import math
from array import array

import torch


class MicroBatchStream:
    def __init__(self, examples: list[dict], batch_size: int, collate, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not examples:
            raise ValueError("no training examples")
        self.examples = examples
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # every process takes batch_size examples per micro-batch; the last partial one is kept
        self.per_epoch = math.ceil(len(examples) / (batch_size * world_size))
        self._order_epoch = -1
        self._order: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=generator).tolist()
            self._order_epoch = epoch
        return self._order

    def indices(self, j: int) -> list[int]:
        """Example indices of micro-batch j on this process."""
        epoch, position = divmod(j, self.per_epoch)
        order = self._permutation(epoch)
        span = self.batch_size * self.world_size
        chunk = order[position * span:(position + 1) * span]
        mine = chunk[self.rank::self.world_size]
        return mine or chunk[:1]  # a process never gets an empty batch: it repeats one example

    def get(self, j: int) -> dict:
        """Micro-batch j. A collator with `collate_at(examples, seed=, epoch=, indices=)` gets
        where the batch is in the stream (a batch that changes by epoch, deterministically: sft's
        dynamic_mask_ratio, data/dynamic_mask.py); others get the examples."""
        indices = self.indices(j)
        examples = [self.examples[i] for i in indices]
        at = getattr(self.collate, "collate_at", None)
        if at is not None:
            return at(examples, seed=self.seed, epoch=j // self.per_epoch, indices=indices)
        return self.collate(examples)

    def epoch_of(self, j: int) -> float:
        return j / self.per_epoch


def eval_batches(examples: list[dict], batch_size: int, collate, rank: int = 0,
                 world_size: int = 1):
    """Evaluation batches in order, this process's share."""
    mine = examples[rank::world_size]
    for start in range(0, len(mine), batch_size):
        yield collate(mine[start:start + batch_size])


def fingerprint(examples: list[dict]) -> str:
    """A short hash of the training examples (their tokens and labels, in order): two runs
    whose streams would differ have different fingerprints."""
    digest = hashlib.sha256()
    for example in examples:
        for key in sorted(example):
            value = example[key]
            try:
                data = array("q", value).tobytes()
            except (TypeError, OverflowError):
                data = repr(value).encode()
            digest.update(f"{key}:{len(data)}:".encode())
            digest.update(data)
        digest.update(b";")
    return digest.hexdigest()[:16]


class StreamBatches:
    """MicroBatchStream's interface over a stream of examples (data.streaming, streaming: true):
    micro-batch j is the j-th run of batch_size x world_size examples of the stream, passes
    following each other (each reshuffled); asking for an earlier j (resuming) replays the stream
    from its start without training, so a resumed run sees the same batches."""

    per_epoch = 1  # unknown: the run's length is max_steps (config_checks), epoch_of counts passes

    def __init__(self, examples, batch_size: int, collate, rank: int = 0, world_size: int = 1):
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.rank, self.world_size = rank, world_size
        self._restart()

    def _restart(self) -> None:
        self._pass, self._iterator, self._next, self._passes_done = 0, self.examples.epoch(0), 0, 0.0
        self._cached: tuple[int, dict] | None = None

    def _take(self) -> dict:
        example = next(self._iterator, None)
        if example is None:  # the end of a pass: the next one, reshuffled
            self._pass += 1
            self._iterator = self.examples.epoch(self._pass)
            example = next(self._iterator, None)
            if example is None:
                raise ValueError("no training examples")
        return example

    def get(self, j: int) -> dict:
        if self._cached is not None and self._cached[0] == j:
            return self._cached[1]
        if j < self._next:
            self._restart()
        while self._next <= j:
            chunk = [self._take() for _ in range(self.batch_size * self.world_size)]
            self._next += 1
        mine = chunk[self.rank::self.world_size] or chunk[:1]
        self._cached = (j, self.collate(mine))
        return self._cached[1]

    def epoch_of(self, j: int) -> float:
        return float(self._pass)
