"""Ragged attention over per-sequence KV storage, plugged into transformers' AttentionInterface.

Each engine step packs the new tokens of every running sequence into one `[1, T]` forward
pass, so every linear layer runs as one matrix multiply over all sequences. Attention is the
only per-sequence part: this function writes each sequence's new keys/values into that
sequence's own preallocated KV tensors and attends over them alone. No padding, no masks
across sequences, and any model that calls the standard attention interface (Llama, Qwen2,
Mistral, …) works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel


class SequenceKV:
    """One sequence's keys and values for every layer, sized once for prompt + max_tokens."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (layers, kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled (committed after each step)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


@dataclass
class StepLayout:
    """Which slice of the packed tokens belongs to which sequence in the current forward pass."""

    slices: list[tuple[SequenceKV, int, int]] = field(default_factory=list)  # (kv, start, count)
    _masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def causal_mask(self, past: int, count: int, device: torch.device) -> torch.Tensor:
        """Prefill chunk mask (token i sees the past and new tokens up to itself), built once per step."""
        key = (past, count)
        if key not in self._masks:
            self._masks[key] = torch.ones(count, past + count, dtype=torch.bool, device=device).tril(diagonal=past)
        return self._masks[key]

    def commit(self) -> None:
        for kv, _, count in self.slices:
            kv.length += count


class RaggedAttention:
    """The attention function; the engine sets `layout` before each forward pass."""

    def __init__(self) -> None:
        self.layout = StepLayout()

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # [1, heads, T, dim]
        key: torch.Tensor,  # [1, kv_heads, T, dim]
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **_: object,
    ) -> tuple[torch.Tensor, None]:
        layer = module.layer_idx
        out = torch.zeros_like(query)
        gqa = query.shape[1] != key.shape[1]
        for kv, start, count in self.layout.slices:
            past = kv.length
            kv.keys[layer, :, past : past + count] = key[0, :, start : start + count]
            kv.values[layer, :, past : past + count] = value[0, :, start : start + count]
            keys = kv.keys[layer, :, : past + count].unsqueeze(0)
            values = kv.values[layer, :, : past + count].unsqueeze(0)
            mask = self.layout.causal_mask(past, count, query.device) if count > 1 else None
            out[:, :, start : start + count] = F.scaled_dot_product_attention(
                query[:, :, start : start + count], keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa
            )
        return out.transpose(1, 2).contiguous(), None


def install(model: PreTrainedModel) -> RaggedAttention:
    """Route the model's attention through a new RaggedAttention and return it."""
    attention = RaggedAttention()
    # A name per engine: the registry is process-wide and each engine has its own layout.
    name = f"sluice_ragged_{id(attention):x}"
    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    return attention


def kv_geometry(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder-only model."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim
