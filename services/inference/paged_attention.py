"""Paged attention over a shared pool of KV blocks, plugged into transformers' AttentionInterface.

Each engine step packs the new tokens of every running sequence into one `[1, T]` forward pass,
so every linear layer runs as one matrix multiply over all sequences. Keys and values live in
one pool per layer, cut into blocks of `block_size` token slots; a sequence owns a list of
blocks (its block table) that grows as it does, so memory follows what sequences hold, not
what they might need.

Attention per layer is one batched call for all decoding rows (their keys gathered from the
pool through the block tables, padded to a common length and masked) plus one call per prefill
chunk. Any model that calls the standard attention interface (Llama, Qwen2, Mistral, …) works
unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from services.inference.kv_blocks import SequenceBlocks


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


class KVPool:
    """Every layer's keys and values: [layers, kv_heads, blocks * block_size, head_dim].

    Slot-major per head, so gathering a batch of sequences' positions yields
    [kv_heads, sequences, length, head_dim] with each head's matrices contiguous."""

    def __init__(
        self, geometry: KVGeometry, blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (geometry.layers, geometry.kv_heads, blocks * block_size, geometry.head_dim)
        # Allocated once; on a CPU the pages are only committed as blocks are first written.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.clear([0])  # padded decode positions read block 0: it must never hold NaN garbage

    def clear(self, blocks: list[int]) -> None:
        """Zero blocks as they are handed out. Decode attention reads the unwritten tail of a
        sequence's last block (masked, weight 0); uninitialised memory there may hold NaN or
        infinity, and a zero weight times NaN would poison the row."""
        if not blocks:
            return
        layers, kv_heads, slots, head_dim = self.keys.shape
        by_block = (layers, kv_heads, slots // self.block_size, self.block_size, head_dim)
        index = torch.tensor(blocks, device=self.keys.device)
        for tensor in (self.keys, self.values):  # one op per tensor, however many blocks
            tensor.view(by_block).index_fill_(2, index, 0)


@dataclass(frozen=True)
class DecodeGroup:
    """Decoding rows start..start+count-1 of the packed tokens, attending over `length` gathered
    positions each (`slots`: [count * length] pool slots; `mask`: additive, [count, length])."""

    start: int
    count: int
    length: int
    slots: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class PrefillSlice:
    """A prefill chunk: rows start..start+count-1, positions past..past+count-1 of its sequence
    (`slots`: pool slots of positions 0..past+count-1)."""

    start: int
    count: int
    past: int
    slots: torch.Tensor


@dataclass
class StepLayout:
    """Where each packed token's keys and values go and what each row attends over, built once
    per step and read by every layer."""

    writes: torch.Tensor  # [T] pool slot of each packed token
    decode: list[DecodeGroup]
    prefill: list[PrefillSlice]


def decode_group(start: int, tables: list[SequenceBlocks], length: int, device: torch.device) -> DecodeGroup:
    """The group of decoding sequences in rows start.., each attending over its positions
    0..table.length (the new token included), padded to `length`."""
    size = tables[0].block_size
    width = math.ceil(length / size)
    table = torch.tensor([t.blocks[:width] + [0] * (width - len(t.blocks[:width])) for t in tables], device=device)
    # Every slot of each block, in order, cut at `length`.
    slots = (table.unsqueeze(2) * size + torch.arange(size, device=device)).view(len(tables), -1)[:, :length]
    lengths = torch.tensor([t.length + 1 for t in tables], device=device)
    mask = torch.zeros(len(tables), length, device=device)
    mask.masked_fill_(torch.arange(length, device=device) >= lengths.unsqueeze(1), float("-inf"))
    return DecodeGroup(start, len(tables), length, slots.reshape(-1), mask)


class PagedAttention:
    """The attention function; the engine sets `pool` once and `layout` before each forward pass."""

    def __init__(self) -> None:
        self.pool: KVPool | None = None
        self.layout: StepLayout | None = None

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
        pool, layout = self.pool, self.layout
        assert pool is not None and layout is not None, "the engine sets the pool and layout first"
        keys, values = pool.keys[module.layer_idx], pool.values[module.layer_idx]
        written = layout.writes.numel()
        keys.index_copy_(1, layout.writes, key[0, :, :written])
        values.index_copy_(1, layout.writes, value[0, :, :written])
        _, heads, rows, dim = query.shape
        scale = scaling if scaling is not None else dim**-0.5
        out = query.new_zeros(1, rows, heads, dim)  # rows past `written` pad the batch: left zero
        for group in layout.decode:
            out[0, group.start : group.start + group.count] = _decode(query, keys, values, group, scale)
        gqa = heads != keys.shape[0]
        for chunk in layout.prefill:
            rows_ = slice(chunk.start, chunk.start + chunk.count)
            if chunk.past == 0:  # a fresh prompt attends over its own new keys only
                k, v, mask, causal = key[:, :, rows_], value[:, :, rows_], None, True
            else:
                k = keys.index_select(1, chunk.slots).unsqueeze(0)
                v = values.index_select(1, chunk.slots).unsqueeze(0)
                mask = torch.ones(chunk.count, chunk.past + chunk.count, dtype=torch.bool, device=query.device)
                mask, causal = mask.tril(diagonal=chunk.past), False
            attended = F.scaled_dot_product_attention(
                query[:, :, rows_], k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
            )
            out[0, rows_] = attended[0].transpose(0, 1)
        return out, None


def _decode(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: DecodeGroup, scale: float
) -> torch.Tensor:
    """One attention call for a group of decoding rows: [count, heads, dim].

    Written as two batched matrix products over (kv head, sequence) rather than SDPA: each
    sequence's arithmetic is then independent of the others in the group (SDPA's CPU kernel
    partitions work by batch size, which changes the last bits), and grouped query heads share
    their key/value head without copying it."""
    kv_heads, _, dim = keys.shape
    n, length = group.count, group.length
    k = keys.index_select(1, group.slots).view(kv_heads, n, length, dim)
    v = values.index_select(1, group.slots).view(kv_heads, n, length, dim)
    heads = query.shape[1]
    q = query[0, :, group.start : group.start + n].reshape(kv_heads, heads // kv_heads, n, dim).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + group.mask.view(1, n, 1, length)
    attended = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [kv_heads, n, group, dim]
    return attended.permute(1, 0, 2, 3).reshape(n, heads, dim)


def install(model: PreTrainedModel) -> PagedAttention:
    """Route the model's attention through a new PagedAttention and return it."""
    attention = PagedAttention()
    # A name per engine: the registry is process-wide and each engine has its own pool and layout.
    name = f"sluice_paged_{id(attention):x}"
    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    return attention


def kv_geometry(model: PreTrainedModel) -> KVGeometry:
    """The KV shape of a decoder-only model."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVGeometry(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)
