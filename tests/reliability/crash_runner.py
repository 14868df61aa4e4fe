"""Test-only runner: `pipeline.cli.main` in forked children of one pre-imported interpreter, with kill hooks.

    python tests/reliability/crash_runner.py serve

reads one JSON request per line on stdin ({"argv": [...], "log": path, "kill": {...} | null,
"announce": bool, "pace": seconds, "env": {...}}), forks a child per request and writes JSON events on stdout:
{"event": "forked", "pid"}, {"event": "started", "pid"} (with announce, when the child first
writes to the store), {"event": "exit", "pid", "code", "signal"}.

Importing torch/transformers costs seconds per interpreter; a forked child starts in milliseconds
and is still a separate process that SIGKILL ends without any cleanup, which is what a crash is.
Nothing here is imported by library code: the hooks monkeypatch the store inside the child only.

A kill point is {"op": "write_bytes"|"publish"|"link"|"commit", "match": substring of the path,
"n": the n-th matching call, "when": "before"|"after"|"partial"}; "partial" (write_bytes only)
writes the first half of the bytes to the temporary, fsyncs it, then dies.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill_hook(spec: dict) -> None:
    """Monkeypatch the store in this process so that it SIGKILLs itself at the requested point."""
    import store.fs as sfs_mod
    import store.writer as writer_mod

    op, match, n, when = spec["op"], spec.get("match", ""), int(spec.get("n", 1)), spec.get("when", "before")
    seen = [0]

    def hit(path: str) -> bool:
        if match not in path:
            return False
        seen[0] += 1
        return seen[0] == n

    if op == "write_bytes":
        orig = sfs_mod.StoreFS.write_bytes

        def write_bytes(self, path, data):
            if hit(path):
                if when == "partial":
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    _die()
                if when == "before":
                    _die()
                orig(self, path, data)
                _die()
            return orig(self, path, data)

        sfs_mod.StoreFS.write_bytes = write_bytes
    elif op == "publish":
        orig_pub = sfs_mod.StoreFS.publish

        def publish(self, tmp, dst):
            if hit(dst):
                if when == "before":
                    _die()
                orig_pub(self, tmp, dst)
                _die()
            return orig_pub(self, tmp, dst)

        sfs_mod.StoreFS.publish = publish
    elif op == "link":
        real_link = os.link

        def link(src, dst, *a, **kw):
            if hit(os.fspath(dst)):
                if when == "before":
                    _die()
                real_link(src, dst, *a, **kw)
                _die()  # published, temporary not yet unlinked
            return real_link(src, dst, *a, **kw)

        os.link = link
    elif op == "commit":
        orig_commit = writer_mod.EntryWriter.commit

        def commit(self, *a, **kw):
            if hit(self.key):
                _die()
            return orig_commit(self, *a, **kw)

        writer_mod.EntryWriter.commit = commit
    else:
        raise ValueError(f"unknown kill op {op!r}")


def install_announce(proto_fd: int) -> None:
    """Write a 'started' event when the child first writes to the store (its first shard is computed)."""
    import store.fs as sfs_mod

    orig = sfs_mod.StoreFS.write_bytes
    done = [False]

    def write_bytes(self, path, data):
        if not done[0] and (".h5." in path or ".parquet." in path):  # a shard's temporary, not a lease
            done[0] = True
            os.write(proto_fd, (json.dumps({"event": "started", "pid": os.getpid()}) + "\n").encode())
        return orig(self, path, data)

    sfs_mod.StoreFS.write_bytes = write_bytes


def install_pace(seconds: float) -> None:
    """Sleep after every shard temporary is written: spreads the work over time so that a random kill
    delay lands inside it despite scheduling noise (timing only; the bytes written are unchanged)."""
    import time

    import store.fs as sfs_mod

    orig = sfs_mod.StoreFS.write_bytes

    def write_bytes(self, path, data):
        orig(self, path, data)
        if ".h5." in path or ".parquet." in path:
            time.sleep(seconds)

    sfs_mod.StoreFS.write_bytes = write_bytes


def preload() -> None:
    """Import everything a run needs so a forked child does no heavy imports."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)  # before any op: no OpenMP pool exists when we fork
    import dask.array  # noqa: F401
    import h5py  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import transformers  # noqa: F401
    from transformers import BertModel, LlamaModel, RobertaModel, T5EncoderModel  # noqa: F401

    import pipeline.cli  # noqa: F401
    import pipeline.models.random_init  # noqa: F401
    import pipeline.orchestrate  # noqa: F401
    import stages.extract.capture  # noqa: F401
    import stages.extract.runner  # noqa: F401
    import stages.score.runner  # noqa: F401
    import stages.train.runner  # noqa: F401
    import store  # noqa: F401


def child(req: dict, proto_fd: int) -> None:
    code = 1
    try:
        os.chdir(req.get("cwd") or ROOT)
        os.environ.update(req.get("env") or {})
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        out = os.open(req["log"] + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(log, 2)
        sys.stdin = open(os.devnull)
        # Ctrl-C as in a terminal: a runner started in the background (`cmd &` in a script, CI)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if req.get("pace"):
            install_pace(float(req["pace"]))
        if req.get("kill"):
            install_kill_hook(req["kill"])
        if req.get("announce"):
            install_announce(proto_fd)
        from pipeline.cli import main

        try:
            code = main(req["argv"])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def serve() -> None:
    preload()
    proto_fd = os.dup(1)
    proto = os.fdopen(proto_fd, "w", buffering=1)
    print(json.dumps({"event": "ready", "pid": os.getpid()}), file=proto, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(req, proto_fd)
        print(json.dumps({"event": "forked", "pid": pid}), file=proto, flush=True)
        _, status = os.waitpid(pid, 0)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        print(json.dumps({"event": "exit", "pid": pid, "code": code, "signal": sig}), file=proto, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        raise SystemExit("usage: crash_runner.py serve")
