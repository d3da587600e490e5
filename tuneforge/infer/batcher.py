"""Continuous batching: one worker thread owns the model and runs every request in one decode
loop. A request joins the running batch at the next step (its prompt is prefilled, its KV cache
left-padded beside the others) and leaves it when it ends, so nobody waits for a batch to finish.
Each row has its own adapter (through `route_adapters`), sampling settings, seed, max_tokens and
stop; tokens go back to each request through its own queue as they are generated.

A request that is stopped (its client went away, a stop string was seen, the server is shutting
down) leaves the batch before the next step is computed. One request's failure is its own: a
row whose setup or sampling raises ends with that exception alone, and a prefill that fails is
retried row by row so only the rows that fail on their own are refused. Only a failure of the
shared decode step itself (the model's forward pass over the whole batch) reaches every row in it.

Caches that cannot be reshaped (sliding-window layers) fall back to static batches: new requests
wait until the running ones are done."""

from __future__ import annotations

import collections
import contextlib
import inspect
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..adapters.routing import route_adapters
from ..adapters.virtual_tokens import virtual_mask
from .decode import Sampling, can_reshape, join, keep_rows, next_token

END = object()


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere: freed KV caches go back to the system, not just to
    the allocator (which would keep a long prompt's gigabyte in the process for good)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


@dataclass(eq=False)  # identity: `in` on a list of jobs must not compare tensors
class Job:
    input_ids: torch.Tensor          # (1, prompt_len)
    adapter: str                     # adapter name inside the model, or routing's BASE
    kwargs: dict                     # generate()-style arguments (sampling, max_new_tokens, ...)
    seed: int | None = None
    out: queue.Queue = field(default_factory=queue.Queue)  # token ids, then END or an exception
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None        # why it was stopped: "client", "stop", "shutdown", ...
    stopped_at: float | None = None  # time.monotonic() of stop()
    waker: Callable[[], None] | None = None  # called after each item (an event loop's wake-up)
    ended: bool = False              # END or an exception has been sent

    def stop(self, reason: str = "client") -> None:
        """Ask the batcher to drop this request before its next step (thread-safe, idempotent)."""
        if not self.cancel.is_set() and not self.ended:
            self.reason, self.stopped_at = reason, time.monotonic()
            self.cancel.set()

    def send(self, item) -> None:
        self.out.put(item)
        waker = self.waker
        if waker is not None:
            try:
                waker()
            except RuntimeError:  # the listener's event loop has closed: nobody is waiting
                pass


@dataclass(eq=False)
class _Row:
    job: Job
    sampling: Sampling
    generator: torch.Generator | None
    history: list[int]               # prompt + generated ids (repetition penalty)
    length: int                      # real tokens in the cache (virtual ones not counted: positions come from the mask)
    pending: int | None = None       # sampled, not yet fed to the model
    produced: int = 0
    done: bool = False


class Batcher:
    def __init__(self, model, pad_token_id: int, eos_ids: set[int], routed: bool, max_batch_size: int = 8):
        self.model, self.pad, self.eos, self.routed = model, pad_token_id, eos_ids, routed
        self.max_batch_size = max_batch_size
        params = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values to cache; logits for the last position only (a
        # prompt's logits over the whole vocabulary would cost prompt_len * vocab * 4 bytes)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.lock = threading.Lock()  # held while a step runs
        self.largest_batch = 0        # for tests and logs
        self.joined_running = 0       # requests that joined a batch already generating
        self.admitted = 0             # requests prefilled into the batch
        self.counts = {"finished": 0, "stopped": 0, "failed": 0}
        self.stopped_by: collections.Counter[str] = collections.Counter()  # by Job.reason
        self.stop_lag_max = 0.0       # longest time from a Job.stop() to its running row leaving, s
        self._queue: queue.Queue[tuple[Job, ...]] = queue.Queue()
        self._pending: collections.deque[Job] = collections.deque()  # taken from the queue, not admitted
        self._jobs: set[Job] = set()  # submitted and not yet ended
        self._jobs_lock = threading.Lock()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._admitting: list[Job] = []      # being prefilled: told of an error like the rows
        threading.Thread(target=self._work, daemon=True, name="tuneforge-batcher").start()

    def submit(self, *jobs: Job) -> None:
        """Queue jobs; those submitted together are admitted together (room allowing)."""
        with self._jobs_lock:
            self._jobs.update(jobs)
        self._queue.put(jobs)

    def stop_all(self, reason: str) -> int:
        """Stop every request submitted and not yet ended (running or queued); returns how many."""
        with self._jobs_lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.stop(reason)
        return len(jobs)

    def stats(self) -> dict:
        """Counters for logs, tests and benchmarks: requests in flight (`live`; `stopping`: asked
        to stop, not yet gone), rows in the batch, requests ever prefilled (`admitted`), requests
        ended by kind, and the longest stop-to-leave lag of a running request."""
        with self._jobs_lock:
            live = len(self._jobs)
            stopping = sum(job.cancel.is_set() for job in self._jobs)
        return {"live": live, "stopping": stopping, "rows": len(self._rows),
                "cache": self._cache is not None, "admitted": self.admitted,
                "largest_batch": self.largest_batch, "joined_running": self.joined_running,
                **self.counts, "stopped_by": dict(self.stopped_by),
                "stop_lag_max_s": round(self.stop_lag_max, 4)}

    # ---- the loop ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            if not self._rows and not self._pending:
                self._pending.extend(self._queue.get())  # sleep until there is work
            with self.lock:
                try:
                    self._admit()
                except BaseException as exc:  # not one job's fault: those being admitted hear of it
                    for job in self._admitting:
                        self._end(job, exc)
                    self._admitting = []
                if not self._rows:
                    continue
                try:
                    self._step()
                except BaseException as exc:  # the shared forward pass failed: every row shares it
                    for row in self._rows:
                        if not row.done:
                            self._end(row.job, exc)
                    self._rows = []
                if not self._rows and self._cache is not None:
                    self._idle()  # here, not in the handler: its traceback would keep the cache

    def _idle(self) -> None:
        """The batch is empty: drop its cache and give the memory back."""
        self._rows, self._cache, self._mask = [], None, None
        if _TRIM is not None and self.model.device.type == "cpu":
            _TRIM(0)

    def _end(self, job: Job, item, running: bool = False) -> None:
        """Send a job its last item (END or an exception) and forget it; `running`: it had a row."""
        if job.ended:
            return
        if isinstance(item, BaseException):
            self.counts["failed"] += 1
        elif job.cancel.is_set():
            self.counts["stopped"] += 1
            self.stopped_by[job.reason] += 1
            if running and job.stopped_at is not None:
                self.stop_lag_max = max(self.stop_lag_max, time.monotonic() - job.stopped_at)
        else:
            self.counts["finished"] += 1
        job.ended = True
        with self._jobs_lock:
            self._jobs.discard(job)
        job.send(item)

    def _waiting(self) -> Job | None:
        if not self._pending:
            try:
                self._pending.extend(self._queue.get_nowait())
            except queue.Empty:
                return None
        return self._pending.popleft() if self._pending else None

    def _admit(self) -> None:
        """Prefill waiting requests and add them to the batch, as room and the cache allow."""
        if self._rows and not can_reshape(self._cache):
            return
        jobs = self._admitting = []
        while len(self._rows) + len(jobs) < self.max_batch_size and (job := self._waiting()) is not None:
            if job.cancel.is_set():
                self._end(job, END)
            else:
                jobs.append(job)
        rows = []
        for job in jobs:
            try:
                rows.append(self._new_row(job))
            except Exception as exc:  # e.g. a seed torch refuses: this request only
                self._end(job, exc)
        if rows:
            self._prefill(rows)
        self._admitting = []

    def _prefill(self, rows: list[_Row]) -> None:
        """One forward pass over the new rows' prompts; if it fails, each row is tried alone and
        only those that fail alone are refused, the others are prefilled together again."""
        try:
            logits, cache, mask = self._prompt_pass(rows)
        except Exception as exc:
            if len(rows) == 1:
                self._end(rows[0].job, exc)
                return
            good = []
            for row in rows:
                try:
                    self._prompt_pass([row])
                    good.append(row)
                except Exception as alone:
                    self._end(row.job, alone)
            if not good:
                return
            rows = good
            self._admitting = [r.job for r in rows]
            logits, cache, mask = self._prompt_pass(rows)
        if self._rows:
            self.joined_running += len(rows) if any(not r.done for r in self._rows) else 0
            self._cache, self._mask = join(self._cache, self._mask, cache, mask)
        else:
            self._cache, self._mask = cache, mask
        self._rows += rows
        self.admitted += len(rows)
        self.largest_batch = max(self.largest_batch, len(self._rows))
        for row, row_logits in zip(rows, logits):
            self._emit(row, row_logits)

    def _prompt_pass(self, rows: list[_Row]):
        jobs = [r.job for r in rows]
        width = max(j.input_ids.shape[1] for j in jobs)
        device = self.model.device
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, job in enumerate(jobs):  # left padding: every row's next token is at the end
            n = job.input_ids.shape[1]
            ids[i, width - n:] = job.input_ids[0].to(device)
            mask[i, width - n:] = 1
        # virtual tokens (prompt / prefix tuning) of the rows' adapters: their columns join the mask,
        # which then covers the whole cache the model returns (virtual_tokens.virtual_mask)
        virtual = virtual_mask(self.model, [j.adapter for j in jobs]) if self.routed else None
        if virtual is not None:
            mask = torch.cat([virtual.to(mask), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
        logits, cache = self._forward(rows, ids, mask, positions, None)
        return logits, cache, mask

    def _step(self) -> None:
        """Feed every live row its pending token, pick the next ones, drop the rows that ended."""
        for row in self._rows:  # stopped since the last step: leave now, before any more work
            if not row.done and row.job.cancel.is_set():
                row.done = True
                self._end(row.job, END, running=True)
        live = [i for i, r in enumerate(self._rows) if not r.done]
        if not live:
            self._idle()
            return
        if len(live) < len(self._rows) and can_reshape(self._cache):
            self._cache, self._mask = keep_rows(self._cache, self._mask, live)
            self._rows = [self._rows[i] for i in live]
        device = self._mask.device
        ids = torch.tensor([[self.pad if r.done else r.pending] for r in self._rows], device=device)
        positions = self._mask.sum(-1, keepdim=True)  # tokens in each row's cache (virtual ones too)
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

        route = (route_adapters(self.model, [r.job.adapter for r in rows]) if self.routed
                 else contextlib.nullcontext())
        with route, torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, **{self._cache_arg: cache}, **self._last_only)
        return out.logits[:, -1], getattr(out, self._cache_arg)

    def _emit(self, row: _Row, logits: torch.Tensor) -> None:
        """Pick the row's next token, send it, and end the row on eos, its limit, a stop or an
        error of its own."""
        job = row.job
        if job.cancel.is_set():
            row.done = True
            self._end(job, END, running=True)
            return
        try:
            token = next_token(logits, row.history, row.sampling, row.generator)
            row.produced += 1
            finished = token in self.eos or row.produced >= job.kwargs["max_new_tokens"]
        except Exception as exc:  # this row's own settings: this request only
            row.done = True
            self._end(job, exc)
            return
        job.send(token)
        if finished:
            row.done = True
            self._end(job, END)
        else:
            row.pending = token
