"""Linear layers whose weights are prepacked for oneDNN, PyTorch's own CPU matrix kernels.

A plain `nn.Linear` on a CPU hands oneDNN its weight in PyTorch's layout at every call; packed
once, at start, in the blocked layout oneDNN's kernels read, the same products run 1.3-2x
faster (bf16 and fp32, one row to a hundred; figures in docs/benchmarks.md). These are the
kernels `torch.compile` itself picks for a CPU linear layer when it freezes weights; here they
are called directly, without a compile step. bf16 results are bitwise those of `nn.Linear`;
fp32 ones differ in the last bits (another summation order).
"""

from __future__ import annotations

import torch
from torch import nn

# oneDNN tunes the packed layout for a batch of about this many rows; any number of rows works.
BATCH_HINT = 16
DTYPES = (torch.float32, torch.bfloat16)


class PrepackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=BATCH_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def supported(model: nn.Module) -> bool:
    """The model runs on a CPU with oneDNN, in a number format it packs."""
    parameter = next(model.parameters())
    return parameter.device.type == "cpu" and torch.backends.mkldnn.is_available() and parameter.dtype in DTYPES


def prepack_linears(model: nn.Module) -> int:
    """Replace every linear layer of `model` by its prepacked form; returns how many. The layers'
    own weights are dropped (a tied LM head keeps the embedding's, which the embedding uses)."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PrepackedLinear(child))
                replaced += 1
    return replaced
