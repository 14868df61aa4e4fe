"""gc against live writers: every interleaving of a gc with a writer, step by step, loses nothing.

Each store operation (list, read, write, publish, remove) of the writer and of gc is one step. A
scheduler runs the two in their own threads but lets only one take a step at a time: the first
runs `i` steps, the other `j` steps, then each runs to its end. Over every (i, j), and both
orders, the writer must commit a verified entry, and gc must finish without error. gc runs with
its clock an hour ahead (so nothing is protected by being recent): only the leases protect.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import store.lease as lease_mod
from store import Store, fingerprint

_OPS = (
    "exists",
    "cat",
    "open",
    "size",
    "sha256",
    "listdir",
    "write_bytes",
    "publish",
    "overwrite",
    "remove",
    "makedirs",
    "ensure_writable",
    "open_random_access",
)
# A writer waiting for gc's lock polls it: stop the writer after this many steps so gc can go on.
SPIN_LIMIT = 400
_FACTORIES: dict = {}
ALL = 1000  # "to its end": more steps than either actor takes, still finite so a polling writer parks


class Scheduler:
    """Lets the thread of one actor take a given number of store steps while the other waits."""

    def __init__(self):
        self.cond = threading.Condition()
        self.budget: dict[str, float] = {}
        self.parked: dict[str, bool] = {}
        self.done: dict[str, bool] = {}
        self.errors: dict[str, BaseException] = {}
        self.steps: dict[str, int] = {}
        self.threads: dict[str, threading.Thread] = {}

    def instrument(self, who: str, st: Store) -> None:
        sfs = st.fs
        for name in _OPS:
            orig = getattr(sfs, name)

            def gated(*args, _orig=orig, **kwargs):
                if threading.current_thread() is self.threads.get(who):  # heartbeat threads pass freely
                    self._gate(who)
                return _orig(*args, **kwargs)

            setattr(sfs, name, gated)

    def _gate(self, who: str) -> None:
        with self.cond:
            self.parked[who] = True
            self.cond.notify_all()
            while self.budget[who] <= 0:
                self.cond.wait()
            self.parked[who] = False
            self.budget[who] -= 1
            self.steps[who] += 1

    def start(self, who: str, fn) -> None:
        def body():
            try:
                self._gate(who)  # the first step is the start: gc reads its clock only when scheduled
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors[who] = exc
            finally:
                with self.cond:
                    self.done[who] = True
                    self.cond.notify_all()

        self.budget[who], self.parked[who], self.done[who], self.steps[who] = 0, False, False, 0
        self.threads[who] = threading.Thread(target=body, name=who, daemon=True)
        self.threads[who].start()

    def run(self, who: str, n: float) -> None:
        """Let `who` take `n` more steps (or finish), then park it again."""
        with self.cond:
            self.budget[who] = n
            self.cond.notify_all()
            ok = self.cond.wait_for(lambda: self.done[who] or (self.parked[who] and self.budget[who] <= 0), timeout=60)
            assert ok, f"{who} neither finished nor parked"
            self.budget[who] = 0


def _writer_job(st: Store, key: str, desc: dict, n_shards: int):
    """What extract does with an entry: list done shards, claim, write and release each, commit."""

    def job():
        w = st.writer(key, desc, n_shards=n_shards)
        for i in sorted(set(range(n_shards)) - w.done_shards()):
            lease = w.shard_lease(i, ttl=60, heartbeat=False)
            assert lease is not None, f"shard {i} lease refused"
            arrays, table, row_start, attrs = _FACTORIES["shard"](i)
            w.write_shard(i, arrays, table, row_start=row_start, attrs=attrs)
            lease.release()
        w.commit(expected_shards=n_shards)

    return job


def _prepare(root, resume: bool):
    desc = _FACTORIES["description"](max_length=99)
    key = fingerprint(desc)
    if resume:  # a crashed run left shard 0 and a temporary behind
        w = Store(root).writer(key, desc, n_shards=2)
        arrays, table, row_start, attrs = _FACTORIES["shard"](0)
        w.write_shard(0, arrays, table, row_start=row_start, attrs=attrs)
        w.close()
        (root / "tmp" / f"{key}.shard_00001.h5.dead.part").write_bytes(b"half")
    return key, desc


def _interleave(root, resume: bool, first: str, i: int, j: int) -> Scheduler:
    key, desc = _prepare(root, resume)
    writer_store, gc_store = Store(root), Store(root)
    sched = Scheduler()
    sched.instrument("writer", writer_store)
    sched.instrument("gc", gc_store)
    sched.start("writer", _writer_job(writer_store, key, desc, 2))
    # gc's clock runs an hour ahead of the writer's: every file it sees looks old enough to delete
    sched.start("gc", lambda: gc_store.gc(grace_seconds=-3600))
    second = "gc" if first == "writer" else "writer"
    sched.run(first, min(i, ALL))
    sched.run(second, min(j, ALL))
    sched.run(first, SPIN_LIMIT)
    sched.run(second, float("inf"))
    sched.run(first, float("inf"))
    assert not sched.errors, f"{first} {i} steps, then {second} {j} steps: {sched.errors!r}"
    st = Store(root)
    assert st.exists(key), f"{first} {i} steps, then {second} {j} steps: entry not committed"
    assert st.verify([key]) == []
    entry = st.open(key)
    assert entry.n_rows == 10
    np.testing.assert_array_equal(entry.array("hidden/mean")[5:].compute(), _FACTORIES["shard"](1)[0]["hidden/mean"])
    return sched


def _sweep(tmp_path, resume: bool) -> tuple[int, int]:
    """gc as one block at each step of the writer; returns (writer steps, most steps gc took)."""
    n_writer = _interleave(tmp_path / "alone", resume, "writer", float("inf"), 0).steps["writer"]
    n_gc = max(_interleave(tmp_path / f"w{i}", resume, "writer", i, float("inf")).steps["gc"] for i in range(n_writer + 1))
    return n_writer, n_gc


@pytest.fixture(autouse=True)
def _setup(monkeypatch, description, make_shard):
    """No sleep in the writer's wait for gc's lock; the shared description and shard factories."""
    monkeypatch.setattr(lease_mod, "GC_WAIT_POLL", 0.0, raising=False)
    _FACTORIES.update(description=description, shard=make_shard)


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_gc_at_every_step_of_a_writer(tmp_path, resume):
    """gc as one block at each step of the writer, and the writer as one block at each step of gc."""
    n_writer, n_gc = _sweep(tmp_path, resume)
    assert n_writer > 20 and n_gc > 3
    for j in range(n_gc + 1):
        _interleave(tmp_path / f"g{j}", resume, "gc", j, float("inf"))


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_gc_lists_leases_then_a_writer_moves_on(tmp_path, resume):
    """The reported race: gc reads the leases, the writer goes on (next shard lease, more shards), gc deletes."""
    n_writer, n_gc = _sweep(tmp_path, resume)
    for i in range(0, n_writer, 4):
        for j in range(1, n_gc):
            _interleave(tmp_path / f"{i}-{j}", resume, "writer", i, j)


@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_gc_interleaved_with_a_writer_exhaustively(tmp_path, resume):
    """Every (first steps, second steps) split point, in both orders."""
    n_writer, n_gc = _sweep(tmp_path, resume)
    for first, n_first, n_second in (("writer", n_writer, n_gc), ("gc", n_gc, n_writer)):
        for i in range(n_first + 1):
            for j in range(n_second + 1):
                _interleave(tmp_path / f"{first}-{i}-{j}", resume, first, i, j)
