"""The generation engine: one worker thread owns the model and runs sequences token by token.

Callers submit a request and iterate the returned handle for steps; `cancel()` (wired to
the gRPC call's termination) makes the worker drop the sequence before its next forward
pass, so a client that goes away stops costing compute within one token. This engine runs
one sequence at a time; requests wait in FIFO order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from services.inference import metrics
from services.inference.detokenize import IncrementalDetokenizer
from services.inference.loader import LoadedModel
from services.inference.sampling import Sampler, SamplingConfig
from services.inference.stopping import StopMatcher
from services.mesh.errors import ContextLengthExceeded, InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last step
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class SequenceHandle:
    request: GenerationRequest
    _steps: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[Step]:
        """Steps until the finishing one; re-raises an engine failure in the caller's thread."""
        while True:
            item = self._steps.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:  # cancelled: the sequence left without a finish reason
                return
            yield item
            if item.finish_reason:
                return


class Engine:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._vocab_size = loaded.model.get_input_embeddings().weight.shape[0]
        self._waiting: queue.SimpleQueue[SequenceHandle] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    def validate(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise InvalidArgument("token_ids must not be empty", "token_ids")
        bad = next((t for t in request.prompt_ids if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} is outside the vocabulary (0..{self._vocab_size - 1})", "token_ids")
        if request.max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1", "max_tokens")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.loaded.context_length:
            raise ContextLengthExceeded(
                f"{len(request.prompt_ids)} prompt tokens + max_tokens {request.max_tokens} exceed the "
                f"context length {self.loaded.context_length} of {self.loaded.model_id}",
                "max_tokens",
            )

    def submit(self, request: GenerationRequest) -> SequenceHandle:
        self.validate(request)
        handle = SequenceHandle(request)
        self._waiting.put(handle)
        metrics.QUEUE_DEPTH.inc()
        return handle

    def _run(self) -> None:
        while True:
            handle = self._waiting.get()
            metrics.QUEUE_DEPTH.dec()
            if handle.cancelled:
                metrics.SEQUENCES_FINISHED.labels("cancelled").inc()
                handle._steps.put(None)
                continue
            metrics.SEQUENCES_STARTED.inc()
            try:
                reason = self._generate(handle)
            except Exception as err:  # one failed sequence must not kill the worker
                log.exception("request %s failed", handle.request.request_id)
                reason = "error"
                handle._steps.put(err)
            metrics.SEQUENCES_FINISHED.labels(reason).inc()

    @torch.inference_mode()
    def _generate(self, handle: SequenceHandle) -> str:
        request, loaded = handle.request, self.loaded
        model = loaded.model
        sampler = Sampler(request.sampling, self._vocab_size, loaded.device)
        detok = IncrementalDetokenizer(loaded.tokenizer)
        stopper = StopMatcher(list(request.stop))
        prompt_tokens = len(request.prompt_ids)
        metrics.PROMPT_TOKENS.inc(prompt_tokens)

        input_ids = torch.tensor([request.prompt_ids], device=loaded.device)
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        for produced in range(1, request.max_tokens + 1):
            if handle.cancelled:
                handle._steps.put(None)
                return "cancelled"
            token = sampler.next_token(out.logits[0, -1])
            sampler.observe(token)
            metrics.TOKENS_GENERATED.inc()
            eos = token in loaded.eos_token_ids
            result = stopper.feed("" if eos else detok.add(token))
            finish = "stop" if (result.stopped or eos) else ("length" if produced == request.max_tokens else None)
            text = result.text
            if finish and not result.stopped:
                # Generation ended on its own: release what the detokenizer and stop matcher held.
                tail = stopper.feed(detok.finish())
                text += tail.text + ("" if tail.stopped else stopper.flush())
                finish = "stop" if tail.stopped else finish
            handle._steps.put(Step([token], text, finish, prompt_tokens, produced))
            if finish:
                return finish
            out = model(
                input_ids=torch.tensor([[token]], device=loaded.device),
                past_key_values=out.past_key_values,
                use_cache=True,
                logits_to_keep=1,
            )
        raise AssertionError("unreachable: the last step always finishes")
