"""Embeddings with a sentence-transformers style model (a Hugging Face encoder, mean pooling,
unit length), batched across callers.

Requests arriving while a forward pass runs (or within `wait_s` of the first one) are packed
into the next pass, up to `max_batch` inputs: concurrent callers share the encoder the way
decoding sequences share the LLM.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from services.inference import metrics
from services.inference.loader import pick_device
from services.mesh.contracts.errors import InvalidArgument

log = logging.getLogger(__name__)


def max_input_tokens(path: Path, config_limit: int) -> int:
    """sentence-transformers' max_seq_length when the directory has one, else the position limit."""
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        return int(json.loads(st_config.read_text()).get("max_seq_length", config_limit))
    return config_limit


@dataclass(frozen=True)
class EmbedResult:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass
class _Job:
    ids: list[list[int]]
    future: Future


class Embedder:
    def __init__(self, path: Path, device: str = "auto", max_batch: int = 64, wait_s: float = 0.002) -> None:
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.dimensions = int(self.model.config.hidden_size)
        self.max_tokens = max_input_tokens(path, int(self.model.config.max_position_embeddings))
        self._max_batch, self._wait_s = max_batch, wait_s
        self._jobs: list[_Job] = []
        self._wakeup = threading.Condition()
        threading.Thread(target=self._run, name="embedder", daemon=True).start()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []

    def truncated(self, ids: list[int], limit: int) -> list[int]:
        """`ids` cut to `limit` tokens (-1 or more than the model takes: its own limit), keeping
        the end-of-input special token the model was trained to see last ([SEP])."""
        limit = self.max_tokens if limit < 0 else min(limit, self.max_tokens)
        if len(ids) <= limit:
            return ids
        if ids[-1] in self.tokenizer.all_special_ids and limit > 1:
            return [*ids[: limit - 1], ids[-1]]
        return ids[:limit]

    def embed(self, inputs: list[list[int]]) -> EmbedResult:
        """Unit-length vectors for token id lists (special tokens included), in order."""
        for index, ids in enumerate(inputs):
            if not ids:
                raise InvalidArgument(f"input[{index}] is empty", f"input[{index}]")
            if len(ids) > self.max_tokens:
                raise InvalidArgument(
                    f"input[{index}] is {len(ids)} tokens; this model embeds at most {self.max_tokens}",
                    f"input[{index}]",
                )
            if max(ids) >= self.tokenizer.vocab_size or min(ids) < 0:
                raise InvalidArgument(f"input[{index}] holds token ids outside the vocabulary", f"input[{index}]")
        job = _Job(inputs, Future())
        with self._wakeup:
            self._jobs.append(job)
            self._wakeup.notify()
        return job.future.result()

    def _take(self) -> list[_Job]:
        with self._wakeup:
            while not self._jobs:
                self._wakeup.wait()
        time.sleep(self._wait_s)  # let callers that arrive together share the pass
        with self._wakeup:
            taken, size = [], 0
            while self._jobs and (not taken or size + len(self._jobs[0].ids) <= self._max_batch):
                job = self._jobs.pop(0)
                taken.append(job)
                size += len(job.ids)
            return taken

    def _run(self) -> None:
        while True:
            jobs = self._take()
            try:
                vectors = self._forward([ids for job in jobs for ids in job.ids])
            except Exception as err:  # a failed pass fails its callers, never the worker
                log.exception("embedding pass failed")
                for job in jobs:
                    job.future.set_exception(err)
                continue
            start = 0
            for job in jobs:
                count = len(job.ids)
                job.future.set_result(EmbedResult(vectors[start : start + count], sum(len(i) for i in job.ids)))
                start += count

    @torch.inference_mode()
    def _forward(self, batch: list[list[int]]) -> list[list[float]]:
        metrics.EMBEDDING_PASSES.inc()
        metrics.EMBEDDED_INPUTS.inc(len(batch))
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().tolist()
