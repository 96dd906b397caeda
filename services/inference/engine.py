"""The built-in engine: continuous batching over one worker thread that owns the model.

Each turn of the loop releases cancelled sequences, lets the scheduler admit what fits
(scheduler.py: admission, preemption, KV blocks, the step plan; no torch), has the model runner
compute the plan in one forward pass and sample every sequence's next token (model_runner.py),
turns each token into its reader's text (output.py: detokenizing, stop strings, finishing), and
delivers the steps. A failed step fails its sequences, never the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import cached_property

from services.inference import metrics
from services.inference.detokenize import direct_decoder
from services.inference.engine_api import EngineLoad, GenerationRequest, Step, TokenLogprob
from services.inference.kv_blocks import BlockPool
from services.inference.loader import LoadedModel
from services.inference.loop_waker import LoopWaker
from services.inference.model_runner import ModelRunner, StepOutput
from services.inference.output import SequenceOutput
from services.inference.paged_attention import kv_geometry
from services.inference.prefix_cache import BlockCache
from services.inference.scheduler import EngineLimits, Scheduler, StepPlan
from services.inference.sequences import Sequence, SequenceHandle
from services.inference.structured import JsonGrammars, JsonMatcher
from services.inference.threads import ThreadChoice
from services.mesh.contracts.errors import ContextLengthExceeded, InvalidArgument, ResourceExhausted
from services.mesh.contracts.limits import MAX_TOP_LOGPROBS
from services.mesh.contracts.prefix_hash import root_hash

log = logging.getLogger(__name__)

DEFAULT_LIMITS = EngineLimits()


class Engine:
    name = "builtin"

    def __init__(self, loaded: LoadedModel, limits: EngineLimits = DEFAULT_LIMITS, cache_salt: str = "") -> None:
        """`cache_salt` names the weights (model and version): cached blocks are only found again
        by prompts for the same ones."""
        if limits.prefill_chunk > limits.max_batched_tokens - limits.max_running:
            raise ValueError("prefill_chunk must leave room for one decode token per running sequence")
        self.loaded = loaded
        self.limits = limits
        block_bytes = kv_geometry(loaded.model).bytes_per_token(loaded.model.dtype) * limits.kv_block_size
        blocks = limits.kv_cache_bytes // block_bytes
        if blocks < 1:
            raise ValueError(f"kv_cache_bytes must hold at least one block of {block_bytes} bytes")
        cache = BlockCache(BlockPool(blocks), limits.prefix_caching, lambda _: metrics.PREFIX_EVICTIONS.inc())
        self._scheduler = Scheduler(limits, cache, root_hash(cache_salt or loaded.model_id))
        self._runner = ModelRunner(loaded, blocks, limits)
        self._vocab_size = self._runner.vocab_size
        self._decoder = direct_decoder(loaded.tokenizer)  # chosen once: every sequence decodes with it
        self._outputs: dict[Sequence, SequenceOutput] = {}
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ the GenerationEngine interface

    def submit(self, request: GenerationRequest, deadline: float | None = None) -> SequenceHandle:
        self.validate(request)
        handle = SequenceHandle(request, deadline, grammar=self._grammar(request))
        self._scheduler.add(handle)
        return handle

    def load(self) -> EngineLoad:
        blocks = self._scheduler.blocks
        return EngineLoad(
            waiting=self._scheduler.waiting(),
            running=len(self._scheduler.running),
            kv_blocks_free=blocks.free,
            kv_blocks_total=blocks.count,
            prefix_cached_blocks=blocks.cached,
        )

    def stalled(self, after_s: float) -> bool:
        return self._scheduler.stalled(after_s)

    def token_text(self, token_id: int) -> str:
        return self.loaded.tokenizer.decode([token_id])

    # ------------------------------------------------------------------ admission

    def validate(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise InvalidArgument("token_ids must not be empty", "token_ids")
        bad = next((t for t in request.prompt_ids if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} is outside the vocabulary (0..{self._vocab_size - 1})", "token_ids")
        if request.max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1", "max_tokens")
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
        if request.prompt_logprobs is not None and not 0 <= request.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
        biased = next((t for t, _ in request.sampling.logit_bias if not 0 <= t < self._vocab_size), None)
        if biased is not None:
            raise InvalidArgument(f"logit_bias: token id {biased} is outside the vocabulary", "logit_bias")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.loaded.context_length:
            raise ContextLengthExceeded(
                f"{len(request.prompt_ids)} prompt tokens + max_tokens {request.max_tokens} exceed the "
                f"context length {self.loaded.context_length} of {self.loaded.model_id}",
                "max_tokens",
            )
        capacity = self._scheduler.blocks.count * self.limits.kv_block_size
        if total > capacity:
            raise ResourceExhausted(
                f"{total} tokens of KV cache exceed this instance's whole budget ({capacity} tokens); lower max_tokens",
                "max_tokens",
            )

    @cached_property
    def _json_grammars(self) -> JsonGrammars:
        try:
            return JsonGrammars(self.loaded.tokenizer, self._vocab_size, self.loaded.eos_token_ids)
        except ValueError as err:  # llguidance reads fast (Rust) tokenizers only
            raise InvalidArgument(
                f"response_format: {self.loaded.model_id} cannot constrain its output ({err})", "response_format"
            ) from err

    def _grammar(self, request: GenerationRequest) -> JsonMatcher | None:
        if request.json_schema is None:
            return None
        grammar = self._json_grammars.matcher(request.json_schema)
        if request.max_tokens < grammar.closure_length:
            raise InvalidArgument(
                f"max_tokens {request.max_tokens} is too small for this response_format: "
                f"its shortest JSON takes {grammar.closure_length} tokens",
                "max_tokens",
            )
        return grammar

    # ------------------------------------------------------------------ what the engine holds now

    @property
    def threads(self) -> ThreadChoice | None:
        """The torch threads the engine chose at start (None: it left torch's setting as it was)."""
        return self._runner.threads

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self._scheduler.running)

    @property
    def kv_blocks_used(self) -> int:
        """KV blocks the engine's sequences hold now."""
        return self._scheduler.blocks.used

    @property
    def kv_blocks_total(self) -> int:
        return self._scheduler.blocks.count

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        scheduler = self._scheduler
        while True:
            scheduler.progressing()
            scheduler.wait_for_work()
            for seq in scheduler.cancelled():
                seq.handle.put(None)
                self._release(seq, "cancelled")
            admitted, dropped = scheduler.admit()
            for gone in dropped:
                gone.handle.put(gone.error)
            for seq in admitted:
                self._runner.add(seq)
                grammar = seq.handle.grammar
                self._outputs[seq] = SequenceOutput(seq.request, self._decoder, self.loaded.eos_token_ids, grammar)
            try:
                self._step()
            except Exception as err:  # a failed step fails its sequences, never the worker
                log.exception("engine step failed")
                for seq in list(scheduler.running):
                    self._fail(seq, err)

    def _step(self) -> None:
        plan = self._scheduler.schedule()
        if plan is None:
            return
        output = self._runner.execute(plan)
        self._scheduler.computed(plan)
        metrics.BATCH_TOKENS.observe(len(plan.ids))
        metrics.BATCH_SEQUENCES.observe(len(plan.grown))
        for seq, entry in output.prompt_logprobs:
            seq.prompt_logprobs.append(entry)
        for seq, err in output.failed:
            self._fail(seq, err)
        self._deliver(plan, output)
        produced = sum(token is not None for token in output.tokens)
        metrics.TOKENS_GENERATED.inc(produced)  # once per step: each update takes a lock
        metrics.TOKEN_RATE.add(produced)
        self._scheduler.publish()

    def _deliver(self, plan: StepPlan, output: StepOutput) -> None:
        now = time.monotonic()
        with LoopWaker.deliveries():
            for index, (seq, _) in enumerate(plan.sampled):
                token = output.tokens[index]
                if token is not None:
                    self._advance(seq, token, now, output.logprobs.get(index))

    def _advance(self, seq: Sequence, token: int, now: float, logprob: TokenLogprob | None) -> None:
        seq.output_ids.append(token)
        if seq.generated == 1:
            seq.handle.first_token_at = now
            metrics.TIME_TO_FIRST_TOKEN.observe(now - seq.handle.queued_at)
            metrics.PROMPT_TOKENS.inc(len(seq.request.prompt_ids))
        else:
            metrics.INTER_TOKEN.observe(now - seq.last_token_at)
        seq.last_token_at = now
        text, finish = self._outputs[seq].add(token, seq.generated)
        if finish:
            seq.handle.finished_at = now  # before the last step is seen
        prompt_logprobs: tuple[TokenLogprob, ...] = ()
        if seq.generated == 1 and seq.request.prompt_logprobs is not None:
            # Nothing predicts the prompt's first token: it leads with no log probability.
            prompt_logprobs = (TokenLogprob(seq.request.prompt_ids[0], 0.0), *seq.prompt_logprobs)
        step = Step(
            [token],
            text,
            finish,
            len(seq.request.prompt_ids),
            seq.generated,
            (logprob,) if logprob is not None else (),
            prompt_logprobs,
            seq.cached_tokens,
        )
        seq.handle.put(step)
        if finish:
            self._release(seq, finish)

    def _fail(self, seq: Sequence, err: Exception) -> None:
        seq.handle.put(err)  # raised to the caller reading the steps
        self._release(seq, "error")

    def _release(self, seq: Sequence, reason: str) -> None:
        self._scheduler.release(seq, reason)
        self._runner.remove(seq)
        self._outputs.pop(seq, None)
