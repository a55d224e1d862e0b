"""Dynamic batching: one worker thread owns the model and runs queued requests in batches.

The HTTP side uses only this module's small interface, so the batching policy can change without touching
it: ``Engine.submit(rows, options, stream, deadline)`` returns a ``Job`` whose ``events`` queue streams the
results and whose ``cancel()`` stops it; ``alive``/``queue_depth``/``running``/``failure`` report health and
``metrics`` the Prometheus series; ``start()``/``stop()`` run the worker.

Requests (``Job``) wait in a bounded FIFO queue. The worker takes the oldest job, waits ``batch_wait_s`` for
company, then also takes every queued job whose options are identical (up to ``max_batch_rows`` inputs in
all) and answers them with one ``stream_generate`` call (``beam_size`` 1) or one ``generate`` call (beam
search) over the concatenated inputs, so they share every forward pass. Jobs with other options keep their
place in the queue. Seeded sampling is never batched: a seed reproduces a result only when the batch is the
same.

Each job is cancelled through ``should_stop``, checked by generation before every step: when its client
disconnects (``Job.cancel``), or when its deadline passes. A full queue refuses new jobs (``QueueFull``).

Results travel back to the asyncio side through ``loop.call_soon_threadsafe`` into a per-job
``asyncio.Queue``: for streaming jobs text increments (``TextDelta``) and finished inputs (``RowDone``), then
for every job one ``JobDone`` or ``JobFailed``.

A job that raises fails alone: when a batch of several jobs fails, the jobs that had not received anything
yet are run again one by one, so only the culprit gets the error. Should the worker thread itself ever die,
``alive`` turns false (``/health`` answers 503), every waiting job fails and ``on_fatal`` is called, which
the server uses to exit with a non-zero status so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation import GenerationOptions, generate, stream_generate
from ..model import CpmBeeForCausalLMBase
from ..tokenizer import CpmBeeTokenizerBase
from .metrics import ServeMetrics

__all__ = ["Engine", "Job", "JobDone", "JobFailed", "QueueFull", "RowDone", "TextDelta", "options_key"]

log = logging.getLogger("cpmbee.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs; ``retry_after`` is a hint in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the request queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


@dataclass
class TextDelta:
    """New text of answer ``answer`` (1-based) of input ``index`` of a job."""

    index: int
    answer: int
    path: tuple[str, ...]
    text: str


@dataclass
class RowDone:
    """Input ``index`` of a streaming job is finished: ``result`` is its filled copy."""

    index: int
    result: Any


@dataclass
class JobDone:
    """The filled inputs, in the job's order; ``stopped`` tells the job was cut short (timeout/cancel)."""

    results: list[Any]
    stopped: bool


@dataclass
class JobFailed:
    error: BaseException


Event = TextDelta | RowDone | JobDone | JobFailed
_ids = itertools.count()


def options_key(options: GenerationOptions) -> tuple[Any, ...]:
    """A hashable key of ``options``: equal keys, equal options (plain values: nothing here can fail to
    encode, whatever text a stop string holds)."""
    return tuple(
        (name, tuple(value) if isinstance(value, list) else value)
        for name, value in options.model_dump().items()
    )


@dataclass(eq=False)
class Job:
    """One request's inputs and options, and the channel its results come back on."""

    rows: list[Any]
    options: GenerationOptions
    stream: bool
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    started: bool = False  # an event has been sent: the job cannot be run again
    discard: Callable[[Job], None] | None = None  # set by Engine.submit: drops the job from the queue

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys may share a batch."""
        opts = self.options
        if opts.do_sample and opts.seed is not None:
            return ("seeded", self.id)
        return options_key(opts)

    def cancel(self) -> None:
        """Stop this job: dropped from the queue if it waits, abandoned at the next step if it runs."""
        self.cancelled.set()
        if self.discard is not None:
            self.discard(self)

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline

    def push(self, item: Event) -> None:
        self.started = True
        # a closed event loop (server shutting down) means nobody is listening
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Engine:
    """The batching worker around one model; thread-safe ``submit``, ``start``/``stop`` from the app."""

    def __init__(
        self,
        model: CpmBeeForCausalLMBase,
        tokenizer: CpmBeeTokenizerBase,
        *,
        max_queue: int = 64,
        max_batch_rows: int = 16,
        batch_wait_s: float = 0.005,
        metrics: ServeMetrics | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be at least 1, got {max_batch_rows}")
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.max_batch_rows, self.batch_wait_s = max_queue, max_batch_rows, batch_wait_s
        self.metrics = metrics or ServeMetrics()
        self.on_fatal = on_fatal
        """Called (from the worker thread) with the error that killed the worker."""
        self.failure: BaseException | None = None
        """What killed the worker, if it died."""
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running: list[Job] = []
        self._batch_seconds = 1.0  # moving average, for Retry-After
        self._hook: Any = None  # the forward pre-hook counting passes and tokens, while started

    @property
    def segment_buckets(self) -> int:
        """Relation buckets of the model: deeper inputs cannot be encoded for it."""
        return self.model.config.position_bias_num_segment_buckets

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping, self.failure = False, None
        if self._hook is None:
            self._hook = self.model.register_forward_pre_hook(self._count_forward, with_kwargs=True)
        self._thread = threading.Thread(target=self._work, name="cpmbee-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything, fail the queued jobs and join the worker."""
        with self._cond:
            self._stopping = True
            for job in self._running:
                job.cancel()
            self._cond.notify_all()
        self._fail_queued(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def alive(self) -> bool:
        running = self._thread is not None and self._thread.is_alive()
        return running and not self._stopping and self.failure is None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------------------------------ submit
    def submit(self, rows: list[Any], options: GenerationOptions, stream: bool, deadline: float) -> Job:
        """Queue a job (call from the event loop that will read its events); ``QueueFull`` when
        ``max_queue`` jobs already wait, RuntimeError when the worker is not running."""
        job = Job(rows, options, stream, deadline=deadline, loop=asyncio.get_running_loop())
        with self._cond:
            if not self.alive:
                raise RuntimeError("the generation worker is not running")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after())
            job.discard = self._discard
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return job

    def _discard(self, job: Job) -> None:
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.queue_depth.set(len(self._queue))

    def _fail_queued(self, error: BaseException) -> None:
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
        for job in pending:
            job.push(JobFailed(error))
        self.metrics.queue_depth.set(0)

    def retry_after(self) -> int:
        """Seconds until the queue has probably moved on by one batch."""
        return max(1, math.ceil(self._batch_seconds))

    # ------------------------------------------------------------------------------------------ worker
    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue[0]
        if self.batch_wait_s > 0 and len(first.rows) < self.max_batch_rows:
            time.sleep(self.batch_wait_s)  # let requests sent together arrive together
        with self._cond:
            key, rows = first.batch_key, 0
            batch: list[Job] = []
            rest: collections.deque[Job] = collections.deque()
            while self._queue:
                job = self._queue.popleft()
                if job.cancelled.is_set():  # its client left while it waited
                    job.push(JobDone([None] * len(job.rows), stopped=True))
                elif job is first or (job.batch_key == key and rows + len(job.rows) <= self.max_batch_rows):
                    batch.append(job)
                    rows += len(job.rows)
                else:
                    rest.append(job)
            self._queue = rest
            self._running = batch
            self.metrics.queue_depth.set(len(rest))
            self.metrics.running.set(len(batch))
        return batch

    def _work(self) -> None:
        try:
            while (batch := self._take_batch()) is not None:
                if batch:
                    self._serve(batch)
        except BaseException as err:  # a bug in the worker itself: report it, never hang the requests
            self.failure = err
            log.critical("the generation worker died", exc_info=err)
            with self._cond:
                running, self._running = self._running, []
            for job in running:
                job.push(JobFailed(err))
            self._fail_queued(RuntimeError(f"the generation worker died: {err!r}"))
            if self.on_fatal is not None:
                self.on_fatal(err)

    def _serve(self, batch: list[Job]) -> None:
        """Run one batch, timing it; a failure fails only the jobs that caused it (see the module doc)."""
        started = time.monotonic()
        for job in batch:
            self.metrics.queue_wait.observe(started - job.submitted)
        try:
            self._run_isolated(batch)
        finally:
            elapsed = time.monotonic() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
            self.metrics.batch_seconds.observe(elapsed)
            with self._cond:
                self._running = []
                self.metrics.running.set(0)

    def _run_isolated(self, batch: list[Job]) -> None:
        try:
            self._run_batch(batch)
        except Exception as err:
            fresh = [job for job in batch if not job.started]
            if len(batch) > 1 and fresh:  # find the culprit: the untouched jobs again, one at a time
                log.warning("a batch of %d requests failed (%r); running them one by one", len(batch), err)
                for job in batch:
                    if job.started:
                        job.push(JobFailed(err))
                for job in fresh:
                    self._run_isolated([job])
                return
            log.exception("generation failed for a batch of %d request(s)", len(batch))
            for job in batch:
                job.push(JobFailed(err))

    def _run_batch(self, batch: list[Job]) -> None:
        rows: list[Any] = []
        owner: list[tuple[Job, int]] = []
        for job in batch:
            for i, row in enumerate(job.rows):
                rows.append(row)
                owner.append((job, i))
        self.metrics.batch_rows.observe(len(rows))
        self.metrics.batch_requests.observe(len(batch))
        options = batch[0].options

        def should_stop(index: int) -> bool:
            return owner[index][0].should_stop()

        results: dict[int, list[Any]] = {job.id: [None] * len(job.rows) for job in batch}
        if options.beam_size == 1:
            remaining = {job.id: len(job.rows) for job in batch}
            first_text: set[int] = set()
            for event in stream_generate(self.model, self.tokenizer, rows, options, should_stop=should_stop):
                job, local = owner[event.index]
                if event.done:
                    results[job.id][local] = event.result
                    if job.stream:
                        job.push(RowDone(local, event.result))
                    remaining[job.id] -= 1
                    if remaining[job.id] == 0:
                        job.push(JobDone(results[job.id], stopped=job.should_stop()))
                elif job.stream and event.text:
                    if job.id not in first_text:
                        first_text.add(job.id)
                        self.metrics.first_text.observe(time.monotonic() - job.submitted)
                    job.push(TextDelta(local, event.answer, tuple(event.path), event.text))
        else:
            outputs = generate(self.model, self.tokenizer, rows, options, should_stop=should_stop)
            for (job, local), result in zip(owner, outputs):
                results[job.id][local] = result
            for job in batch:
                if job.stream:
                    for local, result in enumerate(results[job.id]):
                        job.push(RowDone(local, result))
                job.push(JobDone(results[job.id], stopped=job.should_stop()))

    def _count_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Count forward passes and tokens: a pass with an empty cache is a prefill, others decode steps."""
        self.metrics.forward_passes.inc()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        num_segments = kwargs.get("num_segments")
        if cache is None or len(cache) == 0:
            real = num_segments > 0 if num_segments is not None else input_ids >= 0
            self.metrics.prompt_tokens.inc(int(real.sum()))
        else:
            self.metrics.generated_tokens.inc(int(input_ids.shape[0]))
