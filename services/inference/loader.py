"""Load a Hugging Face causal LM for serving: device and dtype choice, progress, EOS ids."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), as oneDNN's bf16 kernels need to
    beat fp32; elsewhere bf16 is emulated and slower."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where it is native (CUDA, CPUs with bf16 instructions): half the memory and
    traffic of fp32, and faster matrix products; fp32 elsewhere."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def _eos_ids(generation_config: object, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_model(path: Path, device: str = "auto", model_id: str = "", dtype: str = "auto") -> LoadedModel:
    check_model_dir(path)
    target = pick_device(device)
    chosen = pick_dtype(dtype, target)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # Progress bars on a terminal only: in a log file every line must stay JSON.
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    with tqdm(total=3, desc=f"loading {path.name}", unit="step", disable=None) as progress:
        started = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(path)
        progress.update()
        progress.set_postfix_str(f"{weights / 1e6:.0f} MB of weights, {chosen} on {target}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=chosen)
        progress.update()
        model.to(target).eval()
        progress.update()
    log.info("loaded %s in %.1fs on %s (%s)", path, time.monotonic() - started, target, chosen)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=target,
        model_id=model_id or path.resolve().name,
        context_length=context_length(path),
        eos_token_ids=_eos_ids(model.generation_config, tokenizer),
        created=int(time.time()),
    )


def load_tokenizer(path: Path) -> tuple[PreTrainedTokenizerBase, frozenset[int]]:
    """A model directory's tokenizer and end-of-sequence ids, without its weights (for an engine
    that runs the weights elsewhere)."""
    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation_config = None
    return tokenizer, _eos_ids(generation_config, tokenizer)
