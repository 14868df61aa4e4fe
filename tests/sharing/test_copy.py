"""`store push` / `store pull`: entries copied file by file, verified by sha256, manifest published last."""

from __future__ import annotations

import os
import stat

import pytest
from sharing_helpers import make_entry, tree_digest

from pipeline.cli import main
from store import CorruptEntryError, Store, StoreError, commands
from store.transfer import copy_entry


def _entries(root):
    return tree_digest(root / "entries")


def test_push_then_pull_is_byte_identical_and_skips_present(tmp_path, capsys):
    laptop, shared, other = tmp_path / "laptop", tmp_path / "shared", tmp_path / "other"
    keys = [make_entry(Store(laptop), name) for name in ("bert", "llama")]
    assert main(["store", "push", "--store", str(laptop), "--to", str(shared)]) == 0
    out = capsys.readouterr().out
    assert "2 copied, 0 already present" in out and "verified by sha256" in out
    assert _entries(shared) == _entries(laptop)
    assert Store(shared).verify() == []

    assert main(["store", "pull", "--store", str(other), "--from", str(shared), keys[0]]) == 0
    assert "1 copied" in capsys.readouterr().out
    assert set(os.listdir(other / "entries")) == {keys[0]}
    assert main(["store", "pull", "--store", str(other), "--from", str(shared)]) == 0
    assert "1 copied, 1 already present" in capsys.readouterr().out
    assert _entries(other) == _entries(laptop)  # manifests included: byte-identical round trip
    assert os.listdir(other / "tmp") == []


def test_corrupt_source_is_refused_and_nothing_is_committed(tmp_path):
    src, dst = Store(tmp_path / "a"), Store(tmp_path / "b")
    key = make_entry(src)
    shard = tmp_path / "a" / "entries" / key / "shard_00001.h5"
    os.chmod(shard, stat.S_IWUSR | stat.S_IRUSR)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptEntryError, match="shard_00001.h5"):
        copy_entry(src, dst, key)
    assert not dst.exists(key)
    assert os.listdir(tmp_path / "b" / "tmp") == []


def test_unfinished_destination_file_with_other_bytes_is_an_error(tmp_path):
    src, dst = Store(tmp_path / "a"), Store(tmp_path / "b")
    key = make_entry(src)
    (tmp_path / "b" / "entries" / key).mkdir(parents=True)
    (tmp_path / "b" / "entries" / key / "shard_00000.h5").write_bytes(b"something else")
    with pytest.raises(CorruptEntryError, match="unfinished copy"):
        copy_entry(src, dst, key)
    assert not dst.exists(key)


def test_resumed_copy_reuses_files_already_there(tmp_path):
    src, dst = Store(tmp_path / "a"), Store(tmp_path / "b")
    key = make_entry(src)
    (tmp_path / "b" / "entries" / key).mkdir(parents=True)
    first = tmp_path / "a" / "entries" / key / "shard_00000.h5"
    (tmp_path / "b" / "entries" / key / first.name).write_bytes(first.read_bytes())
    result = copy_entry(src, dst, key)
    assert result.status == "copied" and result.files == 4  # 2 shards x (h5, parquet) + notes.json - the one present
    assert dst.verify() == []


def test_missing_key_and_empty_store(tmp_path):
    src, dst = Store(tmp_path / "a"), Store(tmp_path / "b")
    assert "nothing to copy" in commands.copy(src, dst)
    with pytest.raises(StoreError, match="no committed entry"):
        copy_entry(src, dst, "0" * 64)


def test_ls_shows_who_when_and_code_version(tmp_path, capsys):
    from pipeline.store_cli import open_store
    from pipeline.version import code_version

    store = open_store(str(tmp_path))
    make_entry(store)
    assert main(["store", "ls", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CREATED_BY" in out and "CODE" in out and code_version() in out
    assert code_version().startswith("layerstore ")
