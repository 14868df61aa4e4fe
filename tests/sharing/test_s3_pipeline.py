"""extract, score and train with `--store s3://...` against a local S3 server, then pull/push round trips."""

from __future__ import annotations

import json

import pytest
from sharing_helpers import run_cli, tree_digest, write_config

from pipeline.cli import main
from store import Store

pytestmark = pytest.mark.slow

URL = "s3://team-features/team"


def _remote_digest(store: Store) -> dict[str, str]:
    import hashlib

    sfs = store.fs
    root = sfs.join("entries")
    return {sfs.rel(f["name"]).removeprefix("entries/"): hashlib.sha256(sfs.cat(f["name"])).hexdigest() for f in sfs.walk_files(root)}


def test_stages_on_s3_and_pull_push_round_trip(s3_server, tmp_path, capsys):
    cfg = str(write_config(tmp_path / "tiny.toml", models=("llama", "bert"), limit=60, shard_rows=30))
    assert main(["extract", "--config", cfg, "--store", URL, "-q"]) == 0
    assert main(["score", "--config", cfg, "--store", URL, "--out", str(tmp_path / "rep"), "-q"]) == 0
    assert main(["train", "--config", cfg, "--store", URL, "--out", str(tmp_path / "rep"), "-q"]) == 0
    assert (tmp_path / "rep" / "variability.parquet").exists() and (tmp_path / "rep" / "train.parquet").exists()
    capsys.readouterr()

    # a separate process configured only by the environment sees the same store
    out = run_cli("store", "ls", "--json", "--store", URL, timeout=120)
    rows = json.loads(out[out.index("[") :])
    kinds = sorted(r["kind"] for r in rows)
    assert kinds.count("features") == 6 and "scores" in kinds and all(r["complete"] for r in rows)
    assert all(r["created_by"]["code_version"].startswith("layerstore ") for r in rows)
    assert main(["store", "verify", "--store", URL]) == 0

    remote = Store(URL)
    original = _remote_digest(remote)
    local = tmp_path / "cache"
    assert main(["store", "pull", "--store", str(local), "--from", URL]) == 0
    assert f"{len(rows)} copied, 0 already present" in capsys.readouterr().out
    assert tree_digest(local / "entries") == original
    assert main(["extract", "--config", cfg, "--store", str(local), "-q"]) == 0  # all cached: nothing recomputed

    mirror = URL + "-mirror"
    assert main(["store", "push", "--store", str(local), "--to", mirror]) == 0
    assert _remote_digest(Store(mirror)) == original
    assert main(["store", "push", "--store", str(local), "--to", mirror]) == 0
    assert f"0 copied, {len(rows)} already present" in capsys.readouterr().out
