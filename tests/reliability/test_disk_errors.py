"""Disk full and unwritable stores during extract: a clear one-line error, nothing half-committed, and a
rerun after the problem is fixed ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import errno
import os

import pytest
from reliability_helpers import assert_one_line_error, entry_digest, entry_dirs


@pytest.fixture
def one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference run, so the bytes can match
    yield
    torch.set_num_threads(previous)


def _enospc_after(monkeypatch, which: str, n: int):
    """The n-th write of a `which` temporary writes half its bytes, then fails with ENOSPC (below the store's
    own I/O layer, so the store's handling is what is tested)."""
    from fsspec.implementations.local import LocalFileSystem

    orig = LocalFileSystem.pipe_file
    seen = [0]

    def pipe_file(self, path, value, *a, **kw):
        if which in os.path.basename(path):
            seen[0] += 1
            if seen[0] == n:
                with open(path, "wb") as f:
                    f.write(value[: len(value) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(self, path, value, *a, **kw)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", pipe_file)
    return seen


@pytest.mark.parametrize("which,n", [(".h5.", 4), (".parquet.", 8), ("manifest.json", 1)], ids=["shard-h5", "last-shard-table", "manifest"])
def test_disk_full_then_rerun(which, n, reference, tmp_path, monkeypatch, capsys, one_thread):
    from pipeline.cli import main
    from store import Store

    store_path = tmp_path / "store"
    seen = _enospc_after(monkeypatch, which, n)
    code = main(["extract", "--config", str(reference.config), "--store", str(store_path), "-q"])
    err = capsys.readouterr().err
    assert seen[0] == n, "the fault was never injected"
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on device" in lines[0].lower() and str(store_path) in lines[0], lines[0]
    store = Store(store_path)
    assert not store.exists(reference.key) and store.verify() == []
    assert not [p for p in (store_path / "tmp").iterdir() if p.suffix == ".part"], "partial temporary left behind"
    monkeypatch.undo()  # space is freed
    assert main(["extract", "--config", str(reference.config), "--store", str(store_path), "-q"]) == 0
    assert store.verify() == []
    assert entry_digest(entry_dirs(store_path)[reference.key]) == reference.digest


def test_disk_full_in_process_api(reference, tmp_path, monkeypatch, one_thread):
    """The library call (no CLI) raises a StoreError naming the store and what to do."""
    from pipeline import orchestrate
    from pipeline.config import load_config
    from store import Store, StoreError

    _enospc_after(monkeypatch, ".h5.", 2)
    with pytest.raises(StoreError, match="(?i)no space left on device") as ei:
        orchestrate.extract(load_config(reference.config), str(tmp_path / "store"), progress=False)
    assert str(tmp_path / "store") in str(ei.value) and "\n" not in str(ei.value)
    assert Store(tmp_path / "store").verify() == [] and not Store(tmp_path / "store").exists(reference.key)


def test_store_path_under_a_regular_file(cli, reference, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    res = cli(["extract", "--config", reference.config, "--store", tmp_path / "file" / "store", "-q"])
    assert_one_line_error(res, str(tmp_path / "file" / "store"), "not writable")


def test_store_path_is_a_regular_file(cli, reference, tmp_path):
    (tmp_path / "store").write_text("not a directory")
    res = cli(["extract", "--config", reference.config, "--store", tmp_path / "store", "-q"])
    assert_one_line_error(res, str(tmp_path / "store"))
    assert (tmp_path / "store").read_text() == "not a directory"


def test_missing_store_path_is_created(cli, reference, tmp_path):
    store_path = tmp_path / "new" / "deeper" / "store"
    res = cli(["extract", "--config", reference.config, "--store", store_path, "-q"])
    assert res.code == 0, res.stderr
    assert entry_digest(entry_dirs(store_path)[reference.key]) == reference.digest


def test_read_only_directory_in_store(cli, reference, tmp_path):
    """A store whose tmp/ is a file (e.g. a botched copy): a one-line error, not a traceback."""
    store_path = tmp_path / "store"
    store_path.mkdir()
    (store_path / "tmp").write_text("oops")
    res = cli(["extract", "--config", reference.config, "--store", store_path, "-q"])
    assert_one_line_error(res, "tmp")
