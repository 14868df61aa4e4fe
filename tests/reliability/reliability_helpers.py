"""Helpers of the reliability tests: configs, CLI runners (real subprocess or forked zygote), entry digests."""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from config_factory import SST2, apply_overrides, sst2_experiment

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PYTHON = sys.executable


# configs ----------------------------------------------------------------------------------------------


def base_config(data_path: str | Path = SST2, *, rows: int = 120, shard_rows: int = 16) -> dict:
    """One tiny random BERT over the first `rows` rows of one split (train is also dev and test)."""
    cfg = sst2_experiment("reliability", ("bert",), data=data_path, rows=rows, splits=("train",), max_length=64, shard_rows=shard_rows)
    return apply_overrides(
        cfg,
        {
            "score.scheduler": "synchronous",
            "train": {
                "dev_split": "train",
                "test_split": "train",
                "Cs": [1.0],
                "fusion": {"inputs": ["bert:-1:mean", "bert:-1:first"], "average": [], "width": 8, "hidden": 8, "epochs": 2},
            },
        },
    )


def write_tsv(path: Path, rows, header=("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")
    return path


# running the CLI ------------------------------------------------------------------------------------


@dataclass
class Result:
    code: int | None  # exit status, None if killed
    signal: int | None
    stdout: str
    stderr: str
    work_seconds: float | None = None  # from the 'started' event (first write to the store) to exit

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]


def run_subprocess(argv: list[str], *, timeout: float = 300, env: dict | None = None) -> Result:
    """`python -m pipeline ARGV` in a fresh interpreter."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    p = subprocess.run([PYTHON, "-m", "pipeline", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)
    return Result(p.returncode if p.returncode >= 0 else None, -p.returncode if p.returncode < 0 else None, p.stdout, p.stderr)


class Zygote:
    """Client of `crash_runner.py serve`: runs `pipeline.cli.main` in forked, pre-imported children."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [PYTHON, str(HERE / "crash_runner.py"), "serve"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / "zygote.err", "wb"),
        )
        self._buf = b""
        self._n = 0
        ev = self._event(timeout=300)
        assert ev["event"] == "ready", ev
        self.lock = threading.Lock()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our zygote; it holds nothing worth a slow interpreter shutdown
                self.proc.wait()

    def _event(self, timeout: float | None) -> dict | None:
        """Next JSON event line, or None if none arrives within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"zygote died; see {self.workdir / 'zygote.err'}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def run(
        self,
        argv: list[str],
        *,
        kill: dict | None = None,
        kill_after: float | None = None,
        env: dict | None = None,
        timeout: float = 300,
        on_running=None,
        pace: float = 0.0,
    ) -> Result:
        """Run the CLI in a fresh child; `kill` is a kill point (see crash_runner), `kill_after` a delay in
        seconds after the child first writes to the store, after which the test SIGKILLs it; `pace` seconds
        of sleep after each shard temporary spread the work out so random delays land inside it."""
        with self.lock:
            self._n += 1
            log = self.workdir / f"run{self._n}.err"
            req = {
                "argv": [str(a) for a in argv],
                "log": str(log),
                "kill": kill,
                "announce": kill_after is not None,
                "pace": pace,
                "env": env or {},
            }
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            pid = None
            deadline = time.monotonic() + timeout
            kill_at = None
            started = None
            while True:
                wait = deadline - time.monotonic()
                if kill_at is not None:
                    wait = min(wait, max(0.0, kill_at - time.monotonic()))
                ev = self._event(timeout=max(wait, 0.0))
                if ev is None:
                    if kill_at is not None and time.monotonic() >= kill_at:
                        os.kill(pid, signal.SIGKILL)  # our own child, by pid
                        kill_at = None
                        continue
                    os.kill(pid, signal.SIGKILL)
                    raise TimeoutError(f"{argv} ran over {timeout} s")
                if ev["event"] == "forked":
                    pid = ev["pid"]
                    if on_running is not None:
                        on_running(pid)
                elif ev["event"] == "started":
                    started = time.monotonic()
                    if kill_after != float("inf"):
                        kill_at = started + kill_after
                elif ev["event"] == "exit":
                    break
            return Result(
                ev["code"],
                ev["signal"],
                Path(str(log) + ".out").read_text(errors="replace"),
                log.read_text(errors="replace"),
                None if started is None else time.monotonic() - started,
            )


# store digests --------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry_dirs(store: Path) -> dict[str, Path]:
    d = Path(store) / "entries"
    return {p.name: p for p in sorted(d.iterdir())} if d.is_dir() else {}


def manifest_core(path: Path) -> dict:
    """The manifest without what legitimately differs between runs (when and by whom)."""
    try:
        m = json.loads(path.read_text())
    except ValueError:  # a damaged manifest is compared by its bytes
        return {"sha256": sha256_file(path)}
    m.pop("created", None)
    m.pop("created_by", None)
    return m


def entry_digest(entry_dir: Path) -> dict:
    """sha256 of every file of an entry, the manifest compared by content minus its timestamps."""
    out = {}
    for f in sorted(entry_dir.iterdir()):
        out[f.name] = manifest_core(f) if f.name == "manifest.json" else sha256_file(f)
    return out


def store_digest(store: Path) -> dict:
    return {k: entry_digest(p) for k, p in entry_dirs(store).items()}


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def assert_one_line_error(res: Result, *needles: str) -> str:
    """Exit 1, exactly one `error:` line naming every needle (case-insensitive), and no traceback."""
    assert res.signal is None, res
    assert res.code not in (0, None), f"expected failure, got {res.code}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.error_lines
    assert len(lines) == 1, f"expected one error line, got:\n{res.stderr}"
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]
