"""One worker thread owns the model and runs queued requests together: requests with the same
sampling settings share one left-padded `generate()` batch, each row running its own adapter
through `route_adapters`, with its own max_tokens and early stop. Tokens go back to each request
through its own queue, as they are generated."""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, field

import torch

END = object()


@dataclass(eq=False)  # identity: `in` on a list of jobs must not compare tensors
class Job:
    input_ids: torch.Tensor          # (1, prompt_len)
    adapter: str                     # adapter name inside the model, or routing's BASE
    kwargs: dict                     # generate() keyword arguments (sampling, max_new_tokens, ...)
    seed: int | None = None
    out: queue.Queue = field(default_factory=queue.Queue)  # token ids, then END or an exception
    cancel: threading.Event = field(default_factory=threading.Event)

    def group_key(self):
        """Jobs may share a batch only when generate() would treat them alike."""
        if self.seed is not None:  # a seeded request must own the random stream: alone
            return id(self)
        return tuple(sorted((k, v) for k, v in self.kwargs.items() if k != "max_new_tokens"))


class Batcher:
    def __init__(self, model, pad_token_id: int, eos_ids: set[int], routed: bool, max_batch_size: int = 8):
        self.model, self.pad, self.eos, self.routed = model, pad_token_id, eos_ids, routed
        self.max_batch_size = max_batch_size
        self.lock = threading.Lock()  # held while a batch runs
        self.largest_batch = 0        # for tests and logs
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting: list[Job] = []  # taken from the queue but not fitting the last batch
        threading.Thread(target=self._work, daemon=True, name="tuneforge-batcher").start()

    def submit(self, job: Job) -> Job:
        self._queue.put(job)
        return job

    def _work(self) -> None:
        while True:
            first = self._waiting.pop(0) if self._waiting else self._queue.get()
            batch = [first]
            try:
                with self.lock:
                    batch = self._take_batch(first)
                    self._run(batch)
            except BaseException as exc:  # every request of the batch hears of it; the worker lives on
                for job in batch:
                    job.out.put(exc)
                continue
            for job in batch:
                job.out.put(END)

    def _take_batch(self, first: Job) -> list[Job]:
        while True:  # everything queued by now is a candidate for this batch
            try:
                self._waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        key = first.group_key()
        batch = [first] + [j for j in self._waiting if j.group_key() == key][:self.max_batch_size - 1]
        self._waiting = [j for j in self._waiting if j not in batch]
        self.largest_batch = max(self.largest_batch, len(batch))
        return batch

    def _run(self, batch: list[Job]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from ..adapters.routing import route_adapters

        width = max(j.input_ids.shape[1] for j in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long, device=self.model.device)
        mask = torch.zeros_like(ids)
        for i, job in enumerate(batch):  # left padding: every row's next token is at the end
            n = job.input_ids.shape[1]
            ids[i, width - n:] = job.input_ids[0]
            mask[i, width - n:] = 1
        limits = [j.kwargs["max_new_tokens"] for j in batch]
        done = [False] * len(batch)
        counts = [0] * len(batch)
        eos = self.eos

        class RowStreamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # the first call carries the prompts
                    self.prompt_seen = True
                    return
                for i, tok in enumerate(value.view(-1).tolist()):
                    if done[i]:
                        continue  # finished rows get padding from here on
                    counts[i] += 1
                    batch[i].out.put(tok)
                    done[i] = tok in eos or counts[i] >= limits[i]

            def end(self):
                pass

        class RowStop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.tensor([d or j.cancel.is_set() for d, j in zip(done, batch)],
                                    dtype=torch.bool, device=input_ids.device)

        kwargs = {**batch[0].kwargs, "max_new_tokens": max(limits)}
        route = (route_adapters(self.model, [j.adapter for j in batch]) if self.routed
                 else contextlib.nullcontext())
        with route, torch.inference_mode():
            if batch[0].seed is not None:
                torch.manual_seed(batch[0].seed)
            self.model.generate(input_ids=ids, attention_mask=mask, streamer=RowStreamer(),
                                stopping_criteria=StoppingCriteriaList([RowStop()]), **kwargs)
