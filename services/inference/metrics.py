"""Prometheus metrics of the inference service."""

from prometheus_client import Counter, Gauge

SEQUENCES_STARTED = Counter("sluice_inference_sequences_started_total", "Sequences admitted to the engine")
SEQUENCES_FINISHED = Counter(
    "sluice_inference_sequences_finished_total",
    "Sequences that left the engine, by finish reason (stop, length, cancelled, error)",
    ["reason"],
)
TOKENS_GENERATED = Counter("sluice_inference_generated_tokens_total", "Tokens sampled by the engine")
PROMPT_TOKENS = Counter("sluice_inference_prompt_tokens_total", "Prompt tokens prefilled by the engine")
QUEUE_DEPTH = Gauge("sluice_inference_queue_depth", "Sequences waiting for the engine")
