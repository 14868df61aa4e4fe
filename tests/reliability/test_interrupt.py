"""Ctrl-C during extract: one line saying the work so far is kept, and a rerun resumes to the same bytes."""

from __future__ import annotations

import os
import signal
import threading
import time

from reliability_helpers import entry_digest, entry_dirs


def test_ctrl_c_during_extract_keeps_the_work_and_a_rerun_resumes(cli, reference, tmp_path):
    store_path = tmp_path / "store"
    argv = ["extract", "--config", reference.config, "--store", store_path, "-q"]

    def interrupt_after_first_shard(pid: int) -> None:
        def watch():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if list(store_path.glob("entries/*/shard_00001.h5")):
                    os.kill(pid, signal.SIGINT)  # our own forked child
                    return
                time.sleep(0.005)

        threading.Thread(target=watch, daemon=True).start()

    res = cli(argv, on_running=interrupt_after_first_shard, pace=0.05)
    assert res.code == 130, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: the shards written so far are kept"), res.stderr
    assert "run the same command again to resume" in lines[0]
    kept = sorted(p.name for p in entry_dirs(store_path)[reference.key].iterdir())
    assert "shard_00001.h5" in kept and "manifest.json" not in kept
    resumed = cli(argv)
    assert resumed.code == 0, resumed.stderr
    assert entry_digest(entry_dirs(store_path)[reference.key]) == reference.digest
