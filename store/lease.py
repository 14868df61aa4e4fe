"""Leases: advisory, expiring claims on a piece of work (an entry, or one shard of it) under leases/.

A lease is a small JSON file `leases/<name>.json` holding its owner, host, pid and expiry. It is
created by the same conditional publish as every other store file (hard link locally, create-if-absent
on object stores), so of several processes that claim a free lease at once exactly one gets it.
An expired lease (its holder crashed or hung) is taken over; on the holder's own host a lease whose
process is gone counts as expired at once, so a killed run on this machine resumes without waiting.

Leases only avoid duplicate work and tell `gc` what is in progress; they are never needed for
correctness. Shards are deterministic and published write-once, and the manifest is a conditional
create, so even two holders of one lease (two simultaneous take-overs of an expired lease) write the
same bytes and commit the entry once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from . import layout
from .errors import StoreError
from .fs import StoreFS

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


class Lease:
    """A claim on `name` for `ttl` seconds; `try_acquire()` never blocks, `heartbeat()` keeps it alive."""

    def __init__(self, sfs: StoreFS, name: str, ttl: float = 600.0, *, what: str | None = None):
        if not ttl > 0:
            raise ValueError(f"lease ttl={ttl!r}: expected seconds > 0")
        self._sfs = sfs
        self.name = name
        self.what = what or name
        self.path = layout.lease_file(sfs, name)
        self.ttl = float(ttl)
        self.owner = uuid.uuid4().hex
        self.held = False
        self.lost = False
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Lease({self.path!r}, held={self.held})"

    # state ----------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires": time.time() + self.ttl,
            },
            sort_keys=True,
        ).encode()

    def holder(self) -> dict[str, Any] | None:
        """The lease file's content, or None if nobody holds it; unreadable content reads as expired."""
        try:
            lease = json.loads(self._sfs.cat(self.path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("lease %s is not valid JSON; treating it as expired", self.path)
            return {"owner": None, "expires": 0.0}
        return lease if isinstance(lease, dict) else {"owner": None, "expires": 0.0}

    @staticmethod
    def is_live(lease: dict[str, Any], now: float | None = None) -> bool:
        """Unexpired, and (when held on this host) its process still runs."""
        try:
            expires = float(lease.get("expires", 0))
        except (TypeError, ValueError):
            return False
        if expires <= (time.time() if now is None else now):
            return False
        pid = lease.get("pid")
        if lease.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
            return _pid_alive(pid)
        return True

    # acquire / refresh / release ------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired; False if someone else holds a live one."""
        current = self.holder()
        if current is not None and current.get("owner") != self.owner:
            if self.is_live(current):
                return False
            log.warning("taking over expired lease %s of %s pid %s", self._sfs.rel(self.path), current.get("host"), current.get("pid"))
            self._sfs.remove(self.path)
        elif current is not None:  # ours already
            self.held = True
            return True
        self._sfs.makedirs(self._sfs.join(layout.LEASES))
        if not self._sfs.publish_bytes(self._body(), self.path, layout.tmp_path(self._sfs, "lease", self.name)):
            current = self.holder()
            if current is None or current.get("owner") != self.owner:
                return False
        self.held, self.lost = True, False
        return True

    def acquire(self) -> Lease:
        """Take the lease or raise StoreError naming who holds it."""
        if not self.try_acquire():
            raise StoreError(self.held_message(self.holder() or {}))
        return self

    def refresh(self) -> None:
        """Push the expiry forward; StoreError if the lease was lost (expired and taken over)."""
        with self._lock:
            if not self.held:
                raise StoreError(f"refresh of lease {self.what} that is not held")
            current = self.holder()
            if current is None or current.get("owner") != self.owner:
                self.held, self.lost = False, True
                raise StoreError(f"lost the lease of {self.what} (it expired and was taken over); stop writing and resume later")
            self._sfs.overwrite(self.path, self._body(), layout.tmp_path(self._sfs, "lease", self.name))

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still ours."""
        self._stop_heartbeat()
        with self._lock:
            if self.held:
                current = self.holder()
                if current is not None and current.get("owner") == self.owner:
                    self._sfs.remove(self.path)
            self.held = False

    # heartbeat ------------------------------------------------------------------------------------------

    def heartbeat(self, interval: float | None = None) -> Lease:
        """Refresh the lease every `interval` (default ttl/3) seconds on a daemon thread until release."""
        if not self.held or self._thread is not None:
            return self
        interval = self.ttl / 3 if interval is None else interval
        self._stop = stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.refresh()
                except StoreError as exc:
                    log.warning("%s", exc)
                    return
                except Exception as exc:  # noqa: BLE001 - a flaky store must not kill the writer; expiry handles it
                    log.warning("could not refresh lease %s: %s", self.what, exc)

        self._thread = threading.Thread(target=beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _stop_heartbeat(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._stop = self._thread = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def held_message(self, lease: dict[str, Any]) -> str:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("expires", 0) or 0)))
        return (
            f"{self.what} is being written by {lease.get('host')} pid {lease.get('pid')} (lease until {until}); "
            "wait for it, or run `store gc` after the lease expires"
        )


PRESENCE_TTL = 300.0
GC_LOCK_TTL = 60.0
GC_WAIT_POLL = 0.05


def live_leases(sfs: StoreFS, key: str, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """Paths of the live leases of entry `key` (its entry, shard, writer and gc leases), read now."""
    live = []
    for item in sfs.listdir(sfs.join(layout.LEASES)):
        base = item["basename"]
        if not base.endswith(".json") or layout.lease_key(base) != key or item["name"] in exclude:
            continue
        try:
            body = json.loads(sfs.cat(item["name"]))
        except (ValueError, FileNotFoundError):
            continue
        if isinstance(body, dict) and Lease.is_live(body):
            live.append(item["name"])
    return live


class WriterPresence:
    """Tells `gc` and `rm` that a writer is working on an entry, from its first file to its commit.

    Each writer publishes its own lease `<key>.writer_<id>` (heartbeat-refreshed), *then* waits
    while a `<key>.gc` lock is live; gc takes that lock *then* reads the leases of the key, and
    deletes only if none is live. Whichever of the two publishes second sees the other's file
    (Dekker's handshake), so gc never deletes under a writer whose lease is live: the writer
    either is seen by gc, or starts only after gc's deletion is complete.
    """

    def __init__(self, sfs: StoreFS, key: str, ttl: float = PRESENCE_TTL):
        self._sfs = sfs
        self.key = key
        self.lease = Lease(sfs, layout.writer_lease_name(key, uuid.uuid4().hex[:16]), ttl, what=f"writer of entry {key}")

    def acquire(self) -> WriterPresence:
        if self.lease.held:
            return self
        if not self.lease.try_acquire():  # a unique name: only a store that refuses writes gets here
            raise StoreError(f"cannot publish the writer lease of entry {self.key} in {self._sfs.url}")
        self.lease.heartbeat()
        gc_lock = Lease(self._sfs, layout.gc_lock_name(self.key), GC_LOCK_TTL)
        waited = False
        while (holder := gc_lock.holder()) is not None and Lease.is_live(holder):
            if not waited:
                log.info("entry %s: waiting for a running `store gc`/`store rm` to finish with it", self.key)
                waited = True
            time.sleep(GC_WAIT_POLL)
        return self

    def release(self) -> None:
        self.lease.release()
