"""`store ls` text and JSON."""

from __future__ import annotations

import json

from store import Store, commands, fingerprint


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
