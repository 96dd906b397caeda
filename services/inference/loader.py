"""Load a Hugging Face causal LM for serving: device and dtype choice, progress, EOS ids."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from services.mesh.contracts.model_dir import check_model_dir, context_length

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    model_id: str
    context_length: int
    eos_token_ids: frozenset[int]
    created: int


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_model(path: Path, device: str = "auto", model_id: str = "") -> LoadedModel:
    check_model_dir(path)
    target = pick_device(device)
    # bf16 halves memory and is what GPUs are fast at; CPUs are fastest in fp32.
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # Progress bars on a terminal only: in a log file every line must stay JSON.
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    with tqdm(total=3, desc=f"loading {path.name}", unit="step", disable=None) as progress:
        started = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(path)
        progress.update()
        progress.set_postfix_str(f"{weights / 1e6:.0f} MB of weights, {dtype} on {target}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        progress.update()
        model.to(target).eval()
        progress.update()
    log.info("loaded %s in %.1fs on %s (%s)", path, time.monotonic() - started, target, dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=target,
        model_id=model_id or path.resolve().name,
        context_length=context_length(path),
        eos_token_ids=_eos_ids(model, tokenizer),
        created=int(time.time()),
    )
