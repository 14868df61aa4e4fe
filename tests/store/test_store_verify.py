"""verify names every damaged file; open refuses manifests that are invalid or point outside the entry."""

from __future__ import annotations

import json
import os

import pytest

from store import CorruptEntryError, Store, StoreError, commands


@pytest.fixture
def entry_dir(tmp_path, write_entry):
    store = Store(tmp_path / "fs")
    key, _, _ = write_entry(store)
    return store, key, tmp_path / "fs" / "entries" / key


def _writable(path):
    os.chmod(path, 0o644)
    return path


def test_clean_store_verifies(entry_dir):
    store, key, _ = entry_dir
    assert store.verify() == []
    assert commands.verify(store, []) == (f"ok: 1 entry verified in {store.url}", 0)


def test_flipped_byte(entry_dir):
    store, key, d = entry_dir
    path = _writable(d / "shard_00001.h5")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = store.verify([key])
    assert [(p.path, p.reason) for p in problems] == [(str(path), "sha256 mismatch")]
    assert store.verify([key[:8]]) == store.verify([key[:16]]) == problems  # a prefix, as open and the CLI take
    text, code = commands.verify(store, [key])
    assert code == 1 and f"{path}: sha256 mismatch" in text
    with pytest.raises(CorruptEntryError, match="shard_00001.h5: sha256 mismatch"):
        store.open(key, verify=True)


def test_truncated_file(entry_dir):
    store, key, d = entry_dir
    path = _writable(d / "shard_00002.parquet")
    path.write_bytes(path.read_bytes()[:-10])
    assert [(p.path, p.reason) for p in store.verify()] == [(str(path), "size mismatch (truncated?)")]


def test_deleted_shard(entry_dir):
    store, key, d = entry_dir
    (d / "shard_00000.h5").unlink()
    assert [(p.path, p.reason) for p in store.verify()] == [(str(d / "shard_00000.h5"), "missing")]
    text, code = commands.verify(store, [])
    assert code == 1 and "shard_00000.h5: missing" in text


def _edit_manifest(d, edit):
    path = _writable(d / "manifest.json")
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", ["../other/shard_00000.h5", "/etc/passwd", "..", "../" + "b" * 64 + "/manifest.json"])
def test_manifest_pointing_outside_the_entry(entry_dir, bad):
    store, key, d = entry_dir

    def edit(m):
        m["files"].append({"name": bad, "sha256": "0" * 64, "bytes": 1})

    _edit_manifest(d, edit)
    assert [p.reason for p in store.verify()] == ["path escapes store"]
    with pytest.raises(CorruptEntryError, match="path escapes store"):
        store.open(key)


def test_shard_path_outside_the_entry(entry_dir):
    store, key, d = entry_dir
    _edit_manifest(d, lambda m: m["shards"][0].update(file="../../tmp/shard_00000.h5"))
    with pytest.raises(CorruptEntryError, match="path escapes store"):
        store.open(key)


def test_hand_edited_invalid_manifest(entry_dir):
    store, key, d = entry_dir
    path = _writable(d / "manifest.json")
    path.write_text(path.read_text()[:-20] + "# edited by hand")
    assert [(p.path, p.reason) for p in store.verify()] == [(str(path), "manifest invalid")]
    with pytest.raises(CorruptEntryError, match="manifest invalid: .*manifest.json is not valid JSON"):
        store.open(key)
    info = {i.key: i for i in store.list()}[key]
    assert not info.complete
    assert store.find(kind="features") == []


def test_manifest_with_wrong_structure(entry_dir):
    store, key, d = entry_dir
    _edit_manifest(d, lambda m: m["shards"][1].update(n_rows="five"))
    with pytest.raises(CorruptEntryError, match=r"shards\[1\].n_rows"):
        store.open(key)
    _edit_manifest(d, lambda m: m.update(key="c" * 64))
    with pytest.raises(CorruptEntryError, match="does not match directory"):
        store.open(key)


def test_verify_uncommitted_key(tmp_path, write_entry):
    store = Store(tmp_path / "fs")
    key, _, _ = write_entry(store, commit=False)
    assert [p.reason for p in store.verify([key])] == ["not committed"]
    assert store.verify() == []


def test_verify_command_rejects_bad_key(tmp_path):
    with pytest.raises(StoreError, match="invalid store key 'not-a-key': expected a key or a unique prefix of 8"):
        commands.verify(Store(tmp_path / "fs"), ["not-a-key"])


@pytest.mark.parametrize(
    "edit, where, reason",
    [
        (lambda m: m["shards"][1].update(n_rows=4), "shard_00001.h5", "the file says n_rows 5, the manifest 4"),
        (lambda m: m.update(n_rows=14), "manifest.json", "n_rows 14 but the shards hold 15"),
        (lambda m: m["shards"][2].update(row_start=11), "shard_00002.h5", "the file says row_start 10, the manifest 11"),
    ],
    ids=["shard-n_rows", "total-n_rows", "row_start"],
)
def test_edited_row_counts_fail_verify(entry_dir, edit, where, reason):
    """Hashes do not cover the manifest itself: its row counts are checked against the files."""
    store, key, d = entry_dir
    _edit_manifest(d, edit)
    problems = store.verify([key])
    assert any(p.path == str(d / where) and p.reason == f"row count mismatch: {reason}" for p in problems), problems
    with pytest.raises(CorruptEntryError, match="row count mismatch"):
        store.open(key, verify=True)


def test_row_dataset_shorter_than_its_table_fails_verify(tmp_path, description, make_shard):
    store = Store(tmp_path / "fs")
    desc = description(max_length=7)
    from store import fingerprint

    key = fingerprint(desc)
    w = store.writer(key, desc, n_shards=2)
    for i in range(2):
        arrays, table, row_start, attrs = make_shard(i)
        if i == 1:
            arrays["hidden/mean"] = arrays["hidden/mean"][:3]
        w.write_shard(i, arrays, table, row_start=row_start, attrs=attrs)
    w.commit()
    path = str(tmp_path / "fs" / "entries" / key / "shard_00001.h5")
    assert [(p.path, p.reason) for p in store.verify([key])] == [(path, "row count mismatch: dataset hidden/mean has 3 rows, expected 5")]


def test_problems_of_several_entries_come_in_entry_and_file_order(tmp_path, write_entry, monkeypatch):
    """Files are hashed concurrently; the report still lists entry by entry, file by file."""
    import threading

    from tests.store.conftest import make_description

    store = Store(tmp_path / "fs")
    keys = [write_entry(store, description={**make_description(), "name": f"e{i}"})[0] for i in range(3)]
    for key, names in zip(keys, (["shard_00002.h5", "shard_00000.parquet"], [], ["shard_00001.h5", "shard_00000.h5"])):
        for name in names:
            path = _writable(tmp_path / "fs" / "entries" / key / name)
            path.write_bytes(path.read_bytes()[:-1])
    seen = set()
    sha256 = store.fs.sha256
    monkeypatch.setattr(store.fs, "sha256", lambda path: (seen.add(threading.current_thread().name), sha256(path))[1])
    problems = store.verify(list(reversed(keys)))
    want = [(keys[2], "shard_00000.h5"), (keys[2], "shard_00001.h5"), (keys[0], "shard_00000.parquet"), (keys[0], "shard_00002.h5")]
    assert [(p.key, p.path) for p in problems] == [(k, str(tmp_path / "fs" / "entries" / k / name)) for k, name in want]
    assert {p.reason for p in problems} == {"size mismatch (truncated?)"}
    assert all(name.startswith("store-verify") for name in seen) and seen
