"""The keys file under concurrent writers: `sluice keys create` run from 8 processes at once keeps
every key, and a reader never sees a half-written file."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from pathlib import Path

from meshproc import REPO_ROOT

from services.edge_http.core import keys

WRITERS = 8


def test_parallel_creations_keep_every_key_and_readers_never_see_half_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys.create(path, "first")
    stop, read_errors, reads = threading.Event(), [], [0]

    def read_while_written() -> None:
        store = keys.KeyStore(path)
        while not stop.is_set():
            try:
                keys.load(path)
                store.verify("sk-sluice-000000000000-nothing")
                reads[0] += 1
            except Exception as err:  # a torn or half-written file would fail to parse here
                read_errors.append(err)

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        argv = [sys.executable, "-m", "services.cli", "keys", "create", "--keys-file", str(path), "--name"]
        writers = [
            subprocess.Popen([*argv, f"writer-{i}"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i in range(WRITERS)
        ]
        printed = [writer.communicate(timeout=60)[0].decode().strip() for writer in writers]
    finally:
        stop.set()
        reader.join()
    assert [writer.returncode for writer in writers] == [0] * WRITERS
    assert not read_errors and reads[0] > 0
    names = sorted(record.name for record in keys.load(path).keys)
    assert names == sorted(["first", *(f"writer-{i}" for i in range(WRITERS))])
    store = keys.KeyStore(path)
    verified = [store.verify(key) for key in printed]
    assert [record.name if record else None for record in verified] == [f"writer-{i}" for i in range(WRITERS)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_revoking_while_creating_loses_neither(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    for i in range(4):
        keys.create(path, f"old-{i}")
    argv = [sys.executable, "-m", "services.cli", "keys"]
    common = ["--keys-file", str(path)]
    jobs = [[*argv, "revoke", *common, "--name", f"old-{i}"] for i in range(4)]
    jobs += [[*argv, "create", *common, "--name", f"new-{i}"] for i in range(4)]
    running = [subprocess.Popen(job, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for job in jobs]
    assert [process.wait(timeout=60) for process in running] == [0] * len(jobs)
    assert sorted(record.name for record in keys.load(path).keys) == [f"new-{i}" for i in range(4)]
