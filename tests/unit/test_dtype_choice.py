"""Which number format the inference service loads a model in."""

from __future__ import annotations

import pytest
import torch

from services.inference import loader
from services.inference.loader import pick_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bf16_only_where_the_cpu_multiplies_it_natively(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    assert pick_dtype("auto", CPU) == expected
    assert pick_dtype("auto", CUDA) == torch.bfloat16  # GPUs: always


def test_a_format_named_in_the_settings_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("float32", CPU) == torch.float32
    assert pick_dtype("float16", CPU) == torch.float16
