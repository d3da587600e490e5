"""Continuous batching: one worker thread owns the model and runs every request in one decode
loop. A request joins the running batch at the next step (its prompt is prefilled, its KV cache
left-padded beside the others) and leaves it when it ends, so nobody waits for a batch to finish.
Each row has its own adapter (through `route_adapters`), sampling settings, seed, max_tokens and
stop; tokens go back to each request through its own queue as they are generated.

Caches that cannot be reshaped (sliding-window layers) fall back to static batches: new requests
wait until the running ones are done."""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, field

import torch

from .decode import Sampling, can_reshape, join, keep_rows, next_token

END = object()


@dataclass(eq=False)  # identity: `in` on a list of jobs must not compare tensors
class Job:
    input_ids: torch.Tensor          # (1, prompt_len)
    adapter: str                     # adapter name inside the model, or routing's BASE
    kwargs: dict                     # generate()-style arguments (sampling, max_new_tokens, ...)
    seed: int | None = None
    out: queue.Queue = field(default_factory=queue.Queue)  # token ids, then END or an exception
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Row:
    job: Job
    sampling: Sampling
    generator: torch.Generator | None
    history: list[int]               # prompt + generated ids (repetition penalty)
    length: int                      # real tokens in the cache; the next token's position
    pending: int | None = None       # sampled, not yet fed to the model
    produced: int = 0
    done: bool = False


class Batcher:
    def __init__(self, model, pad_token_id: int, eos_ids: set[int], routed: bool, max_batch_size: int = 8):
        self.model, self.pad, self.eos, self.routed = model, pad_token_id, eos_ids, routed
        self.max_batch_size = max_batch_size
        self.lock = threading.Lock()  # held while a step runs
        self.largest_batch = 0        # for tests and logs
        self.joined_running = 0       # requests that joined a batch already generating
        self._queue: queue.Queue[Job] = queue.Queue()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._held: Job | None = None        # taken from the queue while idle, admitted next
        self._admitting: list[Job] = []      # being prefilled: told of an error like the rows
        threading.Thread(target=self._work, daemon=True, name="tuneforge-batcher").start()

    def submit(self, job: Job) -> Job:
        self._queue.put(job)
        return job

    # ---- the loop ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            if not self._rows and self._held is None:
                self._held = self._queue.get()  # sleep until there is work
            try:
                with self.lock:
                    self._admit()
                    if self._rows:
                        self._step()
            except BaseException as exc:  # every request in flight hears of it; the worker lives on
                for job in [r.job for r in self._rows if not r.done] + self._admitting:
                    job.out.put(exc)
                self._rows, self._cache, self._mask, self._admitting = [], None, None, []

    def _waiting(self) -> Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _admit(self) -> list[Job]:
        """Prefill waiting requests and add them to the batch, as room and the cache allow."""
        if self._rows and not can_reshape(self._cache):
            return []
        jobs = self._admitting = []
        while len(self._rows) + len(jobs) < self.max_batch_size and (job := self._waiting()) is not None:
            if job.cancel.is_set():
                job.out.put(END)
            else:
                jobs.append(job)
        if not jobs:
            return jobs
        rows = [self._new_row(job) for job in jobs]
        width = max(j.input_ids.shape[1] for j in jobs)
        device = self.model.device
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, job in enumerate(jobs):  # left padding: every row's next token is at the end
            n = job.input_ids.shape[1]
            ids[i, width - n:] = job.input_ids[0].to(device)
            mask[i, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(rows, ids, mask, positions, None)
        if self._rows:
            self.joined_running += len(rows) if any(not r.done for r in self._rows) else 0
            self._cache, self._mask = join(self._cache, self._mask, cache, mask)
        else:
            self._cache, self._mask = cache, mask
        self._rows += rows
        self._admitting = []
        self.largest_batch = max(self.largest_batch, len(self._rows))
        for row, row_logits in zip(rows, logits):
            self._emit(row, row_logits)
        return jobs

    def _step(self) -> None:
        """Feed every live row its pending token, pick the next ones, drop the rows that ended."""
        live = [i for i, r in enumerate(self._rows) if not r.done]
        if len(live) < len(self._rows) and can_reshape(self._cache):
            self._cache, self._mask = keep_rows(self._cache, self._mask, live)
            self._rows = [self._rows[i] for i in live]
        if all(r.done for r in self._rows):
            self._rows, self._cache, self._mask = [], None, None
            return
        device = self._mask.device
        ids = torch.tensor([[self.pad if r.done else r.pending] for r in self._rows], device=device)
        positions = torch.tensor([[r.length] for r in self._rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        logits, self._cache = self._forward(self._rows, ids, self._mask, positions, self._cache)
        for row, row_logits in zip(self._rows, logits):
            row.length += 1
            if not row.done:
                row.history.append(row.pending)
                self._emit(row, row_logits)

    # ---- helpers -------------------------------------------------------------------------------
    def _new_row(self, job: Job) -> _Row:
        generator = None
        if job.seed is not None:
            generator = torch.Generator().manual_seed(job.seed)
        ids = job.input_ids[0].tolist()
        return _Row(job, Sampling.from_kwargs(job.kwargs), generator, ids, len(ids))

    def _forward(self, rows: list[_Row], ids, mask, positions, cache):
        from ..adapters.routing import route_adapters

        route = (route_adapters(self.model, [r.job.adapter for r in rows]) if self.routed
                 else contextlib.nullcontext())
        with route, torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def _emit(self, row: _Row, logits: torch.Tensor) -> None:
        """Pick the row's next token, send it, and end the row on eos, its limit or a cancel."""
        job = row.job
        if job.cancel.is_set():
            row.done = True
            job.out.put(END)
            return
        token = next_token(logits, row.history, row.sampling, row.generator)
        row.produced += 1
        job.out.put(token)
        if token in self.eos or row.produced >= job.kwargs["max_new_tokens"]:
            row.done = True
            job.out.put(END)
        else:
            row.pending = token
