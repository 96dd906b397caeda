"""`sluice model init`: build the small default chat model, deterministically and offline.

A Llama-architecture model with random weights under a fixed seed and a byte-level BPE
tokenizer trained on Python's own standard library sources, saved as an ordinary Hugging
Face directory (safetensors, tokenizer.json, chat template, SHA-256 manifest). Its text is gibberish, but it
is loaded and served through exactly the path a real model takes.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from services.inference.manifest import write_manifest

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

# ChatML with Hermes-style tools, the format Qwen2.5 and many fine-tunes use: tools listed in
# the system turn inside <tools>, calls as <tool_call>{json}</tool_call>, results as
# <tool_response>. Content arrives as a string: preprocess joins text parts before rendering.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'You may call functions. Signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    '{{- \'\\n</tools>\\nFor each call, answer <tool_call>{\\"name\\": ..., \\"arguments\\": {...}}</tool_call>\''
    " + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '<tool_call>\\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    context_length: int = 2048
    num_key_value_heads: int | None = None  # grouped-query attention (default: one per attention head)
    tie_word_embeddings: bool = False
    # The tokenizer's own vocabulary, when the model's embedding is larger (padded, as Qwen's is).
    tokenizer_vocab_size: int | None = None


PRESETS = {
    # The default: small enough that the whole suite runs on 2 CPU cores in seconds.
    "default": ModelShape(),
    # ~98M parameters: a decode step costs roughly what a real model's does, for benchmarks.
    "bench": ModelShape(hidden_size=768, intermediate_size=2304, num_hidden_layers=12, num_attention_heads=12),
    # Qwen2.5-0.5B's shape (~494M parameters): 24 layers, 14 heads over 2 KV heads, a 151,936-row
    # embedding shared with the LM head; random weights, as every preset.
    "qwen05": ModelShape(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        tokenizer_vocab_size=4096,
    ),
}

# Bounded so training takes seconds; the sorted file list keeps the corpus identical per Python version.
_CORPUS_BYTES = 4 * 1024 * 1024


def _corpus() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text)
        yield text
        if total >= _CORPUS_BYTES:
            return


def _train_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=EOS,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=ModelShape.context_length,
    )


def llama_config(shape: ModelShape, **token_ids: int):  # -> LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads or shape.num_attention_heads,
        max_position_embeddings=shape.context_length,
        tie_word_embeddings=shape.tie_word_embeddings,
        **token_ids,
    )


def build_default_model(out: Path, seed: int = 0, shape: ModelShape = ModelShape(), force: bool = False) -> Path:
    """Write the default model to `out` (atomically: a half-built model never appears there)."""
    if out.exists() and not force:
        return out
    # Single-threaded tokenizer training and torch init make the bytes reproducible.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import torch
    from transformers import LlamaForCausalLM

    steps = tqdm(total=3, desc=f"building default model {out.name}", unit="step")
    tokenizer = _train_tokenizer(shape.tokenizer_vocab_size or shape.vocab_size)
    steps.update()
    config = llama_config(
        shape,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if len(tokenizer) < shape.vocab_size:
        # The embedding's padding rows (as Qwen's) are never predicted: their logits stay 0 while
        # the tokenizer's own tokens' spread around it, so greedy output decodes to text.
        with torch.no_grad():
            model.get_input_embeddings().weight[len(tokenizer) :] = 0
            model.get_output_embeddings().weight[len(tokenizer) :] = 0
    steps.update()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_manifest(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    steps.update()
    steps.close()
    return out
