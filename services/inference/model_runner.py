"""The built-in engine's model runner: a StepPlan → tensors → one forward pass → each sampling
sequence's next token (and log probabilities when asked for).

It owns what needs torch: the model with its attention routed through paged attention, the pool
of KV blocks, and each sequence's sampler (its settings, generator and penalty counts, kept
across preemptions so a recomputed sequence produces the same tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from services.inference import prepacked
from services.inference.engine_api import TokenLogprob
from services.inference.loader import LoadedModel
from services.inference.paged_attention import KVPool, PrefillSlice, StepLayout, decode_group, install, kv_geometry
from services.inference.sampling import Sampler, sample
from services.inference.scheduler import EngineLimits, StepPlan
from services.inference.sequences import Sequence
from services.inference.threads import apply_threads

log = logging.getLogger(__name__)

# With batch_invariant on, linear layers give bitwise-identical rows from this many rows up
# (smaller products take other kernels), so a step never runs fewer.
INVARIANT_ROWS = 4


@dataclass
class StepOutput:
    """What one forward pass gave each sequence of its plan."""

    tokens: list[int | None] = field(default_factory=list)  # per plan.sampled; None: that sequence failed
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # index into plan.sampled → its token's
    prompt_logprobs: list[tuple[Sequence, TokenLogprob]] = field(default_factory=list)  # per plan.scored
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, blocks: int, limits: EngineLimits) -> None:
        """Prepares the model as the engine runs it: linear layers on prepacked weights where the
        CPU allows (not in batch-invariant mode, which relies on torch's own linear kernels' row
        invariance), then torch's threads (measured on the model so prepared), then attention
        through the paged KV pool."""
        self.loaded = loaded
        self.vocab_size = loaded.model.get_input_embeddings().weight.shape[0]
        self._min_rows = INVARIANT_ROWS if limits.batch_invariant else 1
        if limits.prepack_weights and not limits.batch_invariant and prepacked.supported(loaded.model):
            count = prepacked.prepack_linears(loaded.model)
            log.info("%d linear layers on prepacked oneDNN weights", count)
        self.threads = None if limits.torch_threads is None else apply_threads(loaded.model, limits.torch_threads)
        self._attention = install(loaded.model)
        self._pool = KVPool(kv_geometry(loaded.model), blocks, limits.kv_block_size, loaded.model.dtype, loaded.device)
        self._attention.pool = self._pool
        self._samplers: dict[Sequence, Sampler] = {}

    def add(self, seq: Sequence) -> None:
        """A sequence joins: its sampler starts from its request's settings."""
        self._samplers[seq] = Sampler(seq.request.sampling, self.vocab_size, self.loaded.device)

    def remove(self, seq: Sequence) -> None:
        self._samplers.pop(seq, None)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        device = self.loaded.device
        self._pool.clear(plan.fresh_blocks)
        pad = max(0, self._min_rows - len(plan.ids))
        input_ids = torch.tensor([plan.ids + [0] * pad], device=device)
        position_ids = torch.tensor([plan.positions + [0] * pad], device=device)
        rows = [row for _, row in plan.sampled] + [row for _, row, _ in plan.scored]
        rows += [rows[-1] if rows else 0] * max(0, self._min_rows - len(rows))
        writes = torch.tensor(plan.writes, dtype=torch.long, device=device)
        decode = [decode_group(b.start, [s.kv for s in b.sequences], b.length, device) for b in plan.decode]
        prefill = [self._prefill_slice(c.start, c.count, c.past, c.sequence) for c in plan.prefill]
        self._attention.layout = StepLayout(writes, decode, prefill)
        out = self.loaded.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=torch.tensor(rows, device=device),
        )
        logits = out.logits[0]
        result = StepOutput()
        sampled = plan.sampled
        if plan.scored:
            scored = logits[len(sampled) : len(sampled) + len(plan.scored)]
            prompt_ids = [seq.request.prompt_ids[index] for seq, _, index in plan.scored]
            widths = [seq.request.prompt_logprobs or 0 for seq, _, _ in plan.scored]
            entries = _logprobs(scored, prompt_ids, widths)
            result.prompt_logprobs = [(seq, entry) for (seq, _, _), entry in zip(plan.scored, entries, strict=True)]
        result.tokens = self._sample([seq for seq, _ in sampled], logits[: len(sampled)], result)
        tokens = result.tokens
        wanted = [
            i for i, (seq, _) in enumerate(sampled) if seq.request.top_logprobs is not None and tokens[i] is not None
        ]
        if wanted:
            widths = [sampled[i][0].request.top_logprobs or 0 for i in wanted]
            entries = _logprobs(logits[wanted], [tokens[i] or 0 for i in wanted], widths)
            result.logprobs = dict(zip(wanted, entries, strict=True))
        return result

    def _prefill_slice(self, start: int, count: int, past: int, seq: Sequence) -> PrefillSlice:
        slots = seq.kv.slots(0, past + count) if past else []
        return PrefillSlice(start, count, past, torch.tensor(slots, dtype=torch.long, device=self.loaded.device))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, result: StepOutput) -> list[int | None]:
        """Each sequence's next token: one batched pass for all but those under a grammar, which
        choose among the tokens it allows, each on its own. None for a sequence that failed (in
        `result.failed`). Every sampler sees its token (for penalties)."""
        samplers = [self._samplers[seq] for seq in seqs]
        free = [i for i, seq in enumerate(seqs) if seq.handle.grammar is None]
        tokens: list[int | None] = [None] * len(seqs)
        if free:
            rows = logits if len(free) == len(seqs) else logits[free]  # indexing would copy them all
            picked = sample([samplers[i] for i in free], rows)
            for i, token in zip(free, picked, strict=True):
                tokens[i] = token
        for i, seq in enumerate(seqs):
            grammar = seq.handle.grammar
            if grammar is None:
                continue
            remaining = seq.request.max_tokens - seq.generated
            try:
                tokens[i] = grammar.next_token(samplers[i].next_token, logits[i], remaining)
            except Exception as err:  # a sequence whose grammar fails fails alone
                log.exception("sampling failed for %s", seq.request.request_id)
                result.failed.append((seq, err))
        for sampler, token in zip(samplers, tokens, strict=True):
            if token is not None:
                sampler.observe(token)
        return tokens


def _logprobs(logits: torch.Tensor, targets: list[int], tops: list[int]) -> list[TokenLogprob]:
    """The model's own log probability of targets[i] under row i (before sampling settings), with
    its tops[i] best alternatives: one log-softmax and one top-k for all rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, device=logits.device).unsqueeze(1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    widest = max(tops, default=0)
    best = torch.topk(logprobs, widest) if widest else None
    best_ids = best.indices.tolist() if best is not None else [[] for _ in targets]
    best_values = best.values.tolist() if best is not None else [[] for _ in targets]
    return [
        TokenLogprob(target, value, tuple(zip(best_ids[row][:top], best_values[row][:top], strict=True)))
        for row, (target, value, top) in enumerate(zip(targets, chosen, tops, strict=True))
    ]
