"""The scheduler: one thread owns the model and runs batched rounds; requests join and leave between rounds.

Continuous batching over decoding/batch.py. The HTTP layer (serving/app.py) validates a request, turns it into a
`Request` and `submit`s it; the scheduler thread, between two rounds:
  1. drops the rows whose client went away (`Request.cancel`, set from the event loop) and the cancelled waiting
     requests, so a disconnected client stops costing work by the next round;
  2. admits waiting requests, oldest first, while the batch has room (`max_batch_size`) and the oldest waiting
     request shares the running batch's plan (`Request.plan`: strategy, E, d, confidence threshold, draft
     vocabulary; sampling parameters are per row). A request with another plan waits at the head until the
     running batch drains, then starts the next batch: first come, first served, nobody overtakes.
     Joining rows are prefilled as one block (`Batch.add`);
  3. runs one round (self-speculative) or step for every row (`Batch.step`) and sends each request what its row
     emitted in that round, at once (`Request.events`, an asyncio queue read by the HTTP handler).
An exception inside a round fails every request of that batch ("error" event, HTTP 500); the scheduler starts
afresh with the waiting requests. The waiting queue is bounded (`max_queue`): `submit` raises `QueueFull` (429).
A request's greedy output equals `layerskip generate` on its prompt and settings, whatever else is in the batch
(the batch's guarantee, decoding/batch.py).

Events a request receives, in order: ("tokens", ids) per round with output, then one of ("done", Row) or
("error", message).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from layerskip.decoding.api import attention_backends, new_row
from layerskip.decoding.batch import Batch, Row
from layerskip.decoding.config import ResolvedConfig
from layerskip.forward import LayerStack
from layerskip.serving.metrics import Metrics

log = logging.getLogger("layerskip.serve")
_ids = itertools.count(1)


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


@dataclass
class Request:
    """One accepted request: what to decode, and where its output goes.

    `events` belongs to the event loop `loop`; the scheduler thread puts into it with call_soon_threadsafe.
    """

    prompt: list[int]
    config: ResolvedConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def plan(self) -> tuple:
        """What every row of one batch shares (Batch's arguments)."""
        c = self.config
        return c.strategy, c.exit_layer, c.num_speculations, c.confidence_threshold or 0.0, c.draft_vocab

    def cancel(self) -> None:
        """The client went away: its row leaves the batch before the next round."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def send(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening any more
            pass


class Scheduler:
    """Owns `stack` (a LayerStack) on its own thread; see the module docstring.

    Args:
        tokenizer: for stop strings (StopChecker).
        max_batch_size: the most rows decoded together.
        max_queue: the most requests waiting to join; `submit` raises QueueFull past it.
        metrics: where counts and timings go (serving/metrics.py).
        speculate_up_to: self-speculative batches run rounds while they hold at most this many rows, and
            autoregressive steps above it (Batch; lossless); None: always rounds.
    """

    def __init__(self, stack: LayerStack, tokenizer, *, max_batch_size: int, max_queue: int, metrics: Metrics,
                 speculate_up_to: int | None = None):
        self.stack, self.tokenizer, self.speculate_up_to = stack, tokenizer, speculate_up_to
        self.max_batch_size, self.max_queue, self.metrics = max_batch_size, max_queue, metrics
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._requests: dict[int, Request] = {}  # the running batch's requests by row index (= request id)
        self._thread = threading.Thread(target=self._run, name="layerskip-scheduler", daemon=True)

    # ---- called from the event loop ------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()

    def stop(self, timeout: float) -> bool:
        """Stop taking requests, finish what is running and waiting (up to `timeout` s), then cancel whatever is
        left and end the thread. True if everything finished in time."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        with self._wake:
            for r in list(self._waiting) + list(self._requests.values()):
                r.cancel()
            self._wake.notify()
        self._thread.join(5.0)
        return False

    # ---- the scheduler thread ------------------------------------------------------------
    def _run(self) -> None:
        requests = self._requests  # written by this thread only
        batch: Batch | None = None
        with torch.inference_mode(), attention_backends(self.stack.device):
            while True:
                joining = self._next_joiners(batch, requests)
                if joining is None:
                    return
                try:
                    if batch is None or not len(batch):
                        batch = self._new_batch(joining[0].config, requests) if joining else None
                    if batch is None:
                        continue
                    for r in batch.leave(lambda row: requests[row.index].cancelled):
                        self._retire(requests.pop(r.index), "cancelled")
                    batch.add([self._row(r) for r in joining])
                    for r in joining:
                        requests[r.id] = r
                    self.metrics.running.set(len(batch))
                    if not len(batch):
                        continue
                    t0, before, rows = time.perf_counter(), self.metrics.emitted, len(batch)
                    for row in batch.step():
                        self._finished(requests.pop(row.index), row)
                    self.metrics.step(rows, time.perf_counter() - t0, self.metrics.emitted - before)
                except Exception as e:  # a bug or a device error: fail this batch, keep serving
                    log.exception("decoding failed; failing the %d requests of this batch", len(requests))
                    for r in list(requests.values()) + [r for r in joining if r.id not in requests]:
                        r.send("error", f"decoding failed: {type(e).__name__}: {e}")
                        self.metrics.requests.labels("error").inc()
                    requests.clear()
                    batch = None
                self.metrics.running.set(len(batch) if batch else 0)

    def _next_joiners(self, batch: Batch | None, requests: dict[int, Request]) -> list[Request] | None:
        """The waiting requests that join before the next round (oldest first, same plan, while there is
        room); blocks while there is nothing to do. None: stopping and nothing left."""
        running = len(batch) if batch else 0
        with self._wake:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self._retire(self._waiting.popleft(), "cancelled")
                if running or self._waiting:
                    break
                if self._stopping:
                    return None
                self._wake.wait()
            plan = next(iter(requests.values())).plan if running else None
            joining = []
            while self._waiting and running + len(joining) < self.max_batch_size:
                head = self._waiting[0]
                if head.cancelled:
                    self._retire(self._waiting.popleft(), "cancelled")
                    continue
                if plan is None:
                    plan = head.plan
                if head.plan != plan:
                    break
                joining.append(self._waiting.popleft())
            self.metrics.queue_depth.set(len(self._waiting))
            return joining

    def _new_batch(self, config: ResolvedConfig, requests: dict[int, Request]) -> Batch:
        stack = self.stack
        return Batch(stack, strategy=config.strategy, exit_layer=config.exit_layer,
                     num_speculations=config.num_speculations, draft_vocab=config.draft_vocab_tensor(stack.device),
                     confidence_threshold=config.confidence_threshold or 0.0, speculate_up_to=self.speculate_up_to,
                     max_rows=self.max_batch_size,
                     on_tokens=lambda index, ids: self._emitted(requests[index], ids))

    def _row(self, request: Request) -> Row:
        return new_row(self.stack, request.config, request.id, request.prompt, self.tokenizer)

    def _emitted(self, request: Request, ids: list[int]) -> None:
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter() - request.arrived
            self.metrics.time_to_first_token.observe(request.first_token_s)
        self.metrics.emitted += len(ids)
        self.metrics.tokens.inc(len(ids))
        request.send("tokens", ids)

    def _finished(self, request: Request, row: Row) -> None:
        row.stats.num_new_tokens = len(row.generated)
        row.stats.total_s = time.perf_counter() - request.arrived
        row.stats.first_token_s = request.first_token_s
        self.metrics.finished(row.stats)
        request.send("done", row)

    def _retire(self, request: Request, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()
        request.send("error", outcome)
