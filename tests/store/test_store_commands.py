"""`store ls` text and JSON."""

from __future__ import annotations

import json

import pytest

from store import Store, StoreError, commands, fingerprint


def test_ls_json_and_table(tmp_path, write_entry, description):
    store = Store(tmp_path / "fs")
    key, _, _ = write_entry(store)
    other, _, _ = write_entry(store, n_shards=2, description=description(**{"model.name": "roberta"}), commit=False)
    rows = json.loads(commands.ls(store, as_json=True))
    assert {r["key"] for r in rows} == {key, other}
    by_key = {r["key"]: r for r in rows}
    done = by_key[key]
    assert set(done) == {"name", "kind", "key", "rows", "layers", "bytes", "created", "age_seconds", "complete", "created_by"}
    assert done["name"] == "sst2/train/bert" and done["kind"] == "features" and done["rows"] == 15
    assert done["layers"] == 3 and done["complete"] is True and done["bytes"] > 0
    assert set(done["created_by"]) == {"user", "host", "code_version"}
    assert by_key[other]["complete"] is False and by_key[other]["name"] == "sst2/train/roberta"
    text = commands.ls(store)
    assert key[:12] in text and key not in text and "sst2/train/bert" in text and "KiB" in text


def test_ls_plain_name_and_empty(tmp_path):
    store = Store(tmp_path / "fs")
    assert "no entries" in commands.ls(store)
    assert json.loads(commands.ls(store, as_json=True)) == []
    desc = {"kind": "head", "name": "fused-mlp"}
    w = store.writer(fingerprint(desc), desc, n_shards=0)
    w.write_file("head.json", b"{}")
    w.commit()
    assert json.loads(commands.ls(store, as_json=True))[0]["name"] == "fused-mlp"


def test_find_by_dotted_fields(tmp_path, write_entry, description):
    store = Store(tmp_path / "fs")
    bert, _, _ = write_entry(store)
    roberta, _, _ = write_entry(store, description=description(**{"model.name": "roberta"}))
    write_entry(store, description=description(**{"dataset.split": "dev"}), commit=False)
    found = store.find(kind="features", **{"dataset.name": "sst2", "dataset.split": "train", "model.name": "bert"})
    assert [e.key for e in found] == [bert]
    assert {e.key for e in store.find(kind="features")} == {bert, roberta}
    assert store.find(**{"dataset.nope": 1}) == []


def test_key_prefixes_resolve_like_git(tmp_path, write_entry, description):
    store = Store(tmp_path / "fs")
    a, _, _ = write_entry(store)
    b, _, _ = write_entry(store, description=description(**{"model.name": "roberta"}))
    assert store.resolve(a) == a and store.resolve(a[:8]) == a and store.resolve(b[:20]) == b
    assert store.open(b[:9]).key == b
    with pytest.raises(StoreError, match=r"unique prefix of 8\+ lowercase hex"):
        store.resolve(a[:7])
    with pytest.raises(StoreError, match=r"no entry 00000000 in .*; `store ls` lists the entries"):
        store.resolve("00000000")
    text, code = commands.verify(store, [a[:12]])
    assert code == 0 and text.startswith("ok: 1 entry verified")


def test_ambiguous_prefix_lists_the_matches(tmp_path, write_entry, description, monkeypatch):
    store = Store(tmp_path / "fs")
    a, _, _ = write_entry(store)
    b, _, _ = write_entry(store, description=description(**{"model.name": "roberta"}))
    fake = [a, a[:8] + b[8:]]  # two keys with one 8-character prefix, as the store would list them
    monkeypatch.setattr(Store, "_keys", lambda self: sorted(fake))
    with pytest.raises(StoreError) as err:
        store.resolve(a[:8])
    msg = str(err.value)
    assert "\n" not in msg and "ambiguous" in msg and "2 entries match" in msg
    assert a[:16] in msg and fake[1][:16] in msg and "sst2/train/bert" in msg


def test_ls_filters_and_total(tmp_path, write_entry, description):
    store = Store(tmp_path / "fs")
    bert, _, _ = write_entry(store)
    roberta, _, _ = write_entry(store, description=description(**{"model.name": "roberta"}))
    dev, _, _ = write_entry(store, description=description(**{"dataset.split": "dev"}))
    rows = lambda **f: {r["key"] for r in json.loads(commands.ls(store, as_json=True, **f))}  # noqa: E731
    assert rows() == {bert, roberta, dev}
    assert rows(model="roberta") == {roberta}
    assert rows(split="dev") == {dev}
    assert rows(dataset="sst2", split="train") == {bert, roberta}
    assert rows(kind="scores") == set()
    text = commands.ls(store, split="train")
    sizes = sum(i.bytes for i in store.list() if i.key in (bert, roberta))
    assert text.splitlines()[-1] == f"total: 2 entries, {commands.human_bytes(sizes)}"
    assert "no entries matching --model t5" in commands.ls(store, model="t5")


def test_rm_removes_and_refuses_a_live_writer(tmp_path, write_entry, description):
    store = Store(tmp_path / "fs")
    done, _, _ = write_entry(store)
    busy, _, w = write_entry(store, description=description(**{"model.name": "roberta"}), commit=False)
    text = commands.rm(store, [done[:10]])
    assert f"removed {done[:12]} sst2/train/bert" in text and text.endswith(f"removed 1 entry from {store.url}")
    assert not (tmp_path / "fs" / "entries" / done).exists() and not store.exists(done)
    with pytest.raises(StoreError, match=r"being written \(live lease\).*--force"):
        store.rm([busy])
    assert (tmp_path / "fs" / "entries" / busy).exists()
    assert store.rm([busy], force=True) == [busy]
    assert not (tmp_path / "fs" / "entries" / busy).exists()
    w.close()
    with pytest.raises(StoreError, match="no entry"):
        store.rm([busy])


def test_human_bytes_is_iec():
    assert [commands.human_bytes(n) for n in (0, 1023, 1536, 5 * 2**20, 3 * 2**30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 GiB"]


def test_counts_read_as_english():
    from store.errors import plural

    assert [plural(1, "shard"), plural(3, "shard"), plural(1, "entry"), plural(2, "entry"), plural(0, "key")] == [
        "1 shard",
        "3 shards",
        "1 entry",
        "2 entries",
        "0 keys",
    ]
