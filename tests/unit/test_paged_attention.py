"""Paged KV bookkeeping and decode attention over a pool, without a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.inference.kv_blocks import BlockPool, SequenceBlocks
from services.inference.paged_attention import KVGeometry, KVPool, PagedAttention, StepLayout, decode_group

CPU = torch.device("cpu")


def test_block_pool_hands_out_each_block_once_and_reuses_freed_ones_first() -> None:
    pool = BlockPool(4)
    first = pool.take(3)
    assert len(set(first)) == 3 and (pool.used, pool.free) == (3, 1)
    with pytest.raises(MemoryError):
        pool.take(2)
    pool.give_back(first[1:])
    assert pool.take(2) == first[1:]  # the memory just freed, in the same order
    assert pool.used == 3


def test_sequence_blocks_map_positions_to_slots_through_the_block_table() -> None:
    table = SequenceBlocks(block_size=4, blocks=[7, 2])
    assert table.slots(2, 6) == [30, 31, 8, 9]
    assert table.missing(8) == 0
    assert table.missing(9) == 1


class _Layer(torch.nn.Module):
    layer_idx = 0


def test_decode_rows_padded_over_poisoned_memory_equal_plain_attention() -> None:
    """Padded positions read memory no sequence wrote (weight 0): blocks are zeroed as they are
    handed out, so NaN or infinity left in the allocation never reaches a row."""
    geometry = KVGeometry(layers=1, kv_heads=2, head_dim=8)
    kv = KVPool(geometry, blocks=4, block_size=4, dtype=torch.float32, device=CPU)
    kv.keys.fill_(float("nan"))  # what torch.empty may hand back
    kv.values.fill_(float("inf"))
    kv.clear([0, 1, 2, 3])
    short, long = SequenceBlocks(4, blocks=[1]), SequenceBlocks(4, blocks=[2, 3])
    short.length, long.length = 2, 6  # positions already written below, before this step's token
    generator = torch.Generator().manual_seed(0)
    for table, count in ((short, 2), (long, 6)):
        slots = torch.tensor(table.slots(0, count))
        kv.keys[0].index_copy_(1, slots, torch.randn(2, count, 8, generator=generator))
        kv.values[0].index_copy_(1, slots, torch.randn(2, count, 8, generator=generator))
    attention = PagedAttention()
    attention.pool = kv
    writes = torch.tensor(short.slots(2, 3) + long.slots(6, 7))
    attention.layout = StepLayout(writes, [decode_group(0, [short, long], 8, CPU)], [])
    query = torch.randn(1, 4, 2, 8, generator=generator)  # 4 query heads share 2 KV heads
    key = torch.randn(1, 2, 2, 8, generator=generator)
    value = torch.randn(1, 2, 2, 8, generator=generator)
    out, _ = attention(_Layer(), query, key, value, None)
    for row, table in enumerate((short, long)):
        slots = torch.tensor(table.slots(0, table.length + 1))
        k = kv.keys[0].index_select(1, slots).unsqueeze(0)
        v = kv.values[0].index_select(1, slots).unsqueeze(0)
        expected = F.scaled_dot_product_attention(query[:, :, row : row + 1], k, v, enable_gqa=True)
        torch.testing.assert_close(out[0, row], expected[0, :, 0])
