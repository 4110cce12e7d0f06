"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own (no process-global state).

layerskip_requests_total{outcome}          finished | cancelled (client went away) | error (500) |
                                           rejected (400/404/429)
layerskip_generated_tokens_total           tokens sent to clients
layerskip_drafted_tokens_total, layerskip_accepted_tokens_total, layerskip_acceptance_rate
                                           self-speculative drafts of finished requests, accepted / drafted
layerskip_tokens_per_second                generated tokens / wall time of the last rounds (about 2 s)
layerskip_queue_depth, layerskip_running_batch_size
layerskip_time_to_first_token_seconds, layerskip_request_seconds (histograms)
layerskip_round_batch_size                 rows in each round (histogram: how much batching happened)
"""
from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("layerskip_requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in ("finished", "cancelled", "error", "rejected"):
            self.requests.labels(outcome)
        self.tokens = Counter("layerskip_generated_tokens", "Tokens generated and sent", registry=r)
        self.drafted = Counter("layerskip_drafted_tokens", "Self-speculative drafts (finished requests)", registry=r)
        self.accepted = Counter("layerskip_accepted_tokens", "Accepted drafts (finished requests)", registry=r)
        self.acceptance = Gauge("layerskip_acceptance_rate", "Accepted / drafted, all finished requests", registry=r)
        self.throughput = Gauge("layerskip_tokens_per_second", "Tokens generated per second, last ~2 s of rounds",
                                registry=r)
        self.queue_depth = Gauge("layerskip_queue_depth", "Requests waiting to join the batch", registry=r)
        self.running = Gauge("layerskip_running_batch_size", "Requests in the running batch", registry=r)
        self.time_to_first_token = Histogram("layerskip_time_to_first_token_seconds", "Arrival to first token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("layerskip_request_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.round_rows = Histogram("layerskip_round_batch_size", "Rows in each round", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.emitted = 0  # tokens emitted so far (the scheduler's own count, for per-round throughput)
        self._rounds: collections.deque[tuple[float, float, int]] = collections.deque()  # (end, seconds, tokens)
        self._drafted = self._accepted = 0

    def step(self, rows: int, seconds: float, tokens: int) -> None:
        """A round of `rows` rows took `seconds` and emitted `tokens`: update the throughput over the last ~2 s."""
        self.round_rows.observe(rows)
        now = time.monotonic()
        self._rounds.append((now, seconds, tokens))
        while self._rounds and self._rounds[0][0] < now - 2.0:
            self._rounds.popleft()
        busy = sum(s for _, s, _ in self._rounds)
        self.throughput.set(sum(t for _, _, t in self._rounds) / busy if busy > 0 else 0.0)

    def finished(self, stats) -> None:
        self.requests.labels("finished").inc()
        self.latency.observe(stats.total_s)
        if stats.strategy == "self_speculative":
            self.drafted.inc(stats.drafted)
            self.accepted.inc(stats.accepted)
            self._drafted += stats.drafted
            self._accepted += stats.accepted
            if self._drafted:
                self.acceptance.set(self._accepted / self._drafted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
