"""Prometheus metrics of the inference service (the engine's figures)."""

import collections
import threading
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram


class RollingRate:
    """Events per second over the last `window_s` seconds, in one-second buckets (for people:
    `sluice status`; Prometheus computes its own rates from the counters)."""

    def __init__(self, window_s: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s, self._clock = window_s, clock
        self._buckets: collections.deque[list[int]] = collections.deque()  # [second, count], oldest first
        self._lock = threading.Lock()  # the engine adds, the metrics server's thread reads

    def add(self, count: int = 1) -> None:
        second = int(self._clock())
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += count
            else:
                self._buckets.append([second, count])
            self._trim(second)

    def per_second(self) -> float:
        with self._lock:
            self._trim(int(self._clock()))
            return sum(count for _, count in self._buckets) / self._window_s

    def _trim(self, now: int) -> None:
        while self._buckets and self._buckets[0][0] <= now - self._window_s:
            self._buckets.popleft()


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

SEQUENCES_STARTED = Counter("sluice_inference_sequences_started_total", "Sequences admitted into the batch")
SEQUENCES_FINISHED = Counter(
    "sluice_inference_sequences_finished_total",
    "Sequences that left the engine, by reason (stop, length, cancelled, expired, error)",
    ["reason"],
)
REJECTED = Counter("sluice_inference_rejected_total", "Requests refused because the wait queue was full")
TOKENS_GENERATED = Counter("sluice_inference_generated_tokens_total", "Tokens sampled by the engine")
PROMPT_TOKENS = Counter("sluice_inference_prompt_tokens_total", "Prompt tokens prefilled by the engine")
QUEUE_DEPTH = Gauge("sluice_inference_queue_depth", "Requests waiting to join the batch")
RUNNING = Gauge("sluice_inference_running_sequences", "Sequences in the running batch")
QUEUE_WAIT = Histogram(
    "sluice_inference_queue_wait_seconds", "Time from submit to joining the batch", buckets=_LATENCY_BUCKETS
)
TIME_TO_FIRST_TOKEN = Histogram(
    "sluice_inference_time_to_first_token_seconds", "Submit to first sampled token", buckets=_LATENCY_BUCKETS
)
INTER_TOKEN = Histogram(
    "sluice_inference_inter_token_seconds", "Time between a sequence's consecutive tokens", buckets=_LATENCY_BUCKETS
)
BATCH_TOKENS = Histogram(
    "sluice_inference_batch_tokens",
    "Tokens packed into one forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_SEQUENCES = Histogram(
    "sluice_inference_batch_sequences", "Sequences advanced by one forward pass", buckets=(1, 2, 4, 8, 16, 32, 64)
)
EMBEDDING_PASSES = Counter("sluice_inference_embedding_passes_total", "Forward passes of the embedding model")
EMBEDDED_INPUTS = Counter("sluice_inference_embedded_inputs_total", "Inputs embedded (several share one pass)")
KV_BLOCKS = Gauge("sluice_inference_kv_blocks", "KV cache blocks of the engine, by state (used, free)", ["state"])
PREEMPTIONS = Counter(
    "sluice_inference_preemptions_total", "Sequences preempted when KV blocks ran out (they recompute and resume)"
)
PREFIX_LOOKUPS = Counter("sluice_inference_prefix_cache_lookups_total", "Prompts looked up in the prefix cache")
PREFIX_QUERY_TOKENS = Counter(
    "sluice_inference_prefix_cache_query_tokens_total", "Prompt tokens of the prompts looked up in the prefix cache"
)
PREFIX_HIT_TOKENS = Counter(
    "sluice_inference_prefix_cache_hit_tokens_total",
    "Prompt tokens whose KV the prefix cache held (hit ratio: this over query tokens)",
)
PREFIX_EVICTIONS = Counter(
    "sluice_inference_prefix_cache_evictions_total", "Cached KV blocks evicted to make room for new ones"
)
PREFIX_CACHED_BLOCKS = Gauge(
    "sluice_inference_prefix_cache_blocks", "KV blocks findable by content (held by sequences or idle)"
)
TOKEN_RATE = RollingRate()
TOKENS_PER_SECOND = Gauge(
    "sluice_inference_tokens_per_second", "Tokens sampled per second over the last minute (for sluice status)"
)
TOKENS_PER_SECOND.set_function(TOKEN_RATE.per_second)

# Whichever engine serves: the service's own count of the generations it was asked for.
GENERATE_CALLS = Counter(
    "sluice_inference_generate_calls_total", "Generate calls this instance accepted, by engine", ["engine"]
)
