"""Corruption of committed entries: `store verify` names each bad file and exits 1; `score` and `train`
refuse the entry with one `error:` line naming the file and saying to re-extract, and write nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from config_factory import write_config
from reliability_helpers import assert_one_line_error, base_config, copy_store, entry_dirs, run_subprocess, store_digest


@pytest.fixture(scope="session")
def two_entries(zygote, reference, tmp_path_factory):
    """The reference store plus a second entry (another max_length) to swap shards from."""
    d = tmp_path_factory.mktemp("two-entries")
    store = copy_store(reference.store, d / "store")
    cfg = base_config()
    cfg["extract"]["max_length"] = 32
    res = zygote.run(["extract", "--config", str(write_config(d / "other.toml", cfg)), "--store", str(store), "-q"])
    assert res.code == 0, res.stderr
    (other,) = set(entry_dirs(store)) - {reference.key}
    return store, other


def _writable(path):
    os.chmod(path, 0o644)  # published files are read-only; the "disk" does not care
    return path


def flip_byte(d, other_dir, name="shard_00002.h5"):
    p = _writable(d / name)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return name, "sha256 mismatch"


def flip_byte_table(d, other_dir):
    return flip_byte(d, other_dir, "shard_00001.parquet")


def truncate(d, other_dir):
    p = _writable(d / "shard_00003.h5")
    p.write_bytes(p.read_bytes()[:1000])
    return "shard_00003.h5", "size mismatch"


def delete(d, other_dir):
    (d / "shard_00004.parquet").unlink()
    return "shard_00004.parquet", "missing"


def manifest_not_json(d, other_dir):
    p = _writable(d / "manifest.json")
    p.write_text(p.read_text()[:-40])  # cut mid-way: what a torn write would leave
    return "manifest.json", "manifest invalid"


def manifest_wrong_sha(d, other_dir):
    p = _writable(d / "manifest.json")
    m = json.loads(p.read_text())
    m["shards"][5]["sha256"] = "0" * 64
    p.write_text(json.dumps(m))
    return "shard_00005.h5", "sha256 mismatch"


def manifest_escapes(d, other_dir):
    p = _writable(d / "manifest.json")
    m = json.loads(p.read_text())
    m["shards"][0]["file"] = f"../{other_dir.name}/shard_00000.h5"
    p.write_text(json.dumps(m))
    return "manifest.json", "path escapes store"


def swapped_shard(d, other_dir):
    _writable(d / "shard_00002.h5").unlink()
    shutil.copy2(other_dir / "shard_00002.h5", d / "shard_00002.h5")
    return "shard_00002.h5", "mismatch"


CORRUPTIONS = {
    f.__name__: f
    for f in (flip_byte, flip_byte_table, truncate, delete, manifest_not_json, manifest_wrong_sha, manifest_escapes, swapped_shard)
}
RUNNERS = ["fork", pytest.param("subprocess", marks=pytest.mark.slow)]


@pytest.fixture
def corrupt(request, two_entries, reference, tmp_path):
    """A copy of the two-entry store with the reference entry damaged by CORRUPTIONS[name]."""

    def make(name):
        src, other = two_entries
        store = copy_store(src, tmp_path / "store")
        bad, reason = CORRUPTIONS[name](store / "entries" / reference.key, store / "entries" / other)
        return store, other, bad, reason

    return make


def _run(runner, cli, argv):
    return cli(argv) if runner == "fork" else run_subprocess([str(a) for a in argv])


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_verify_names_each_bad_file(name, runner, corrupt, cli, reference):
    from store import Store

    store, other, bad, reason = corrupt(name)
    res = _run(runner, cli, ["store", "verify", "--store", store])
    assert res.code == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stdout.strip().splitlines()
    problems, summary = lines[:-1], lines[-1]
    assert problems and all(reference.key in ln for ln in problems), res.stdout  # only the damaged entry
    assert any(f"{reference.key}/{bad}: " in ln and reason in ln for ln in problems), res.stdout
    assert summary.startswith(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in 1 of 2 entries"), summary
    # the healthy entry still verifies on its own, and listing the store still works
    assert _run(runner, cli, ["store", "verify", "--store", store, other]).code == 0
    assert {i.key for i in Store(store).list()} == {reference.key, other}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("stage,table", [("score", "variability.parquet"), ("train", "train.parquet")])
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_stages_refuse_corrupt_entry(name, stage, table, runner, corrupt, cli, reference, tmp_path):
    store, other, bad, reason = corrupt(name)
    before = store_digest(store)
    out = tmp_path / "out"
    res = _run(runner, cli, [stage, "--config", reference.config, "--store", store, "--out", out, "-q"])
    line = assert_one_line_error(res, bad, "extract")
    assert "corrupt" in line or "invalid" in line or "escapes" in line, line
    assert not (out / table).exists() and not (out / "report.md").exists()
    assert store_digest(store) == before  # no scores/heads entry committed, nothing repaired behind our back


def test_corrupt_scores_entry_stops_train(cli, reference, tmp_path):
    """Train verifies the scores entry it reads too."""
    store = copy_store(reference.store, tmp_path / "store")
    res = cli(["score", "--config", reference.config, "--store", store, "--out", tmp_path / "out", "-q"])
    assert res.code == 0, res.stderr
    (scores,) = set(entry_dirs(store)) - {reference.key}
    p = _writable(store / "entries" / scores / "variability.parquet")
    p.write_bytes(p.read_bytes()[:-1] + b"\0")
    res = cli(["train", "--config", reference.config, "--store", store, "--out", tmp_path / "out2", "-q"])
    assert_one_line_error(res, "variability.parquet")
    assert not (tmp_path / "out2" / "train.parquet").exists()
