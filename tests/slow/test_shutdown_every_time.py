"""Stopping `sluice up` works every time, not most times: 20 starts in a row, each stopped in the
middle of a stream, alternately by SIGTERM and by Ctrl-C to the whole process group.
(`make test-slow`; about 5 minutes.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from meshproc import STOP_SIGNALS, assert_stops_cleanly_mid_stream, start_mesh

pytestmark = pytest.mark.slow
ROUNDS = 20
DRAIN_GRACE_S = 10


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_stopping_mid_stream_drains_and_exits_0(tmp_path: Path, certs_dir: Path, model_dir: Path, round_: int) -> None:
    how = list(STOP_SIGNALS)[round_ % len(STOP_SIGNALS)]
    mesh = start_mesh(tmp_path, certs_dir, model_dir, "--drain-grace-s", str(DRAIN_GRACE_S))
    try:
        assert_stops_cleanly_mid_stream(mesh, how, DRAIN_GRACE_S, max_tokens=64)
    finally:
        mesh.stop()
