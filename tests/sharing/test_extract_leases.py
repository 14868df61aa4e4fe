"""extract_entry claims each shard with a lease: it skips and waits for shards another writer holds,
and takes over the shard of a writer that died."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.config import ExtractConfig, ModelConfig
from pipeline.data import Split
from pipeline.models import resolve
from stages.entries import FeatureRequest
from stages.extract import runner
from stages.extract.runner import extract_entry, load_for_extract
from store import Store

TEXTS = tuple(f"sentence number {i} is {'good' if i % 2 else 'bad'} ." for i in range(12))
LABELS = np.array([i % 2 for i in range(12)], dtype=np.int64)


@pytest.fixture(scope="module")
def request_and_model():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model = ModelConfig(name="bert", source="tiny-random-bert")
    cfg = ExtractConfig(max_length=16, shard_rows=4, device="cpu", compute_dtype="float32")
    request = FeatureRequest(Split("toy", "train", TEXTS, LABELS, "<memory>"), model, resolve(model.source), cfg)
    loaded = load_for_extract(request.model, request.spec, request.extract)()
    yield request, loaded
    torch.set_num_threads(previous)


def _shard_hashes(store, key):
    return [(s["sha256"], s["table_sha256"]) for s in store.open(key).manifest["shards"]]


@pytest.fixture(scope="module")
def reference(request_and_model, tmp_path_factory):
    request, loaded = request_and_model
    store = Store(tmp_path_factory.mktemp("ref"))
    assert extract_entry(request, store, lambda: loaded, progress=False).committed
    return _shard_hashes(store, request.key)


def test_skips_and_waits_for_a_shard_held_by_another_writer(tmp_path, request_and_model, reference, monkeypatch):
    request, loaded = request_and_model
    store = Store(tmp_path)
    other = store.writer(request.key, request.description(), n_shards=3)
    held = other.shard_lease(1, ttl=60)
    assert held is not None
    computed = []
    real = runner.extract_shard

    def recording(loaded_, req, texts, row_start, labels, progress=None):
        computed.append(row_start)
        return real(loaded_, req, texts, row_start, labels, progress)

    monkeypatch.setattr(runner, "extract_shard", recording)

    def slow_other_writer():  # the "other process" finishes shard 1 a little later
        time.sleep(1.0)
        shard = real(loaded, request, list(TEXTS[4:8]), 4, LABELS[4:8])
        other.write_shard(1, shard.arrays, shard.table, row_start=shard.row_start, attrs=shard.attrs)
        held.release()
        other.close()  # the other process is done with the entry

    t = threading.Thread(target=slow_other_writer)
    t.start()
    stats = extract_entry(request, store, lambda: loaded, progress=False, lease_ttl=10)
    t.join()
    assert computed == [0, 8]  # shard 1 was left to its holder
    assert stats.committed and stats.rows == 8
    assert _shard_hashes(store, request.key) == reference
    assert store.verify() == [] and list((tmp_path / "leases").iterdir()) == []


def test_takes_over_the_shard_of_a_crashed_writer(tmp_path, request_and_model, reference):
    request, loaded = request_and_model
    store = Store(tmp_path)
    store.writer(request.key, request.description(), n_shards=3)
    (tmp_path / "leases" / f"{request.key}.shard_00000.json").write_text(
        json.dumps({"owner": "crashed", "host": "another-machine", "pid": 1, "expires": time.time() - 1})
    )
    stats = extract_entry(request, store, lambda: loaded, progress=False)
    assert stats.committed and stats.rows == len(TEXTS)
    assert _shard_hashes(store, request.key) == reference
    assert list((tmp_path / "leases").iterdir()) == []


def test_failure_releases_the_lease_so_a_rerun_resumes_at_once(tmp_path, request_and_model, reference, monkeypatch):
    request, loaded = request_and_model
    store = Store(tmp_path)
    real = runner.extract_shard

    def failing(loaded_, req, texts, row_start, labels, progress=None):
        if row_start == 4:
            raise RuntimeError("simulated failure")
        return real(loaded_, req, texts, row_start, labels, progress)

    monkeypatch.setattr(runner, "extract_shard", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        extract_entry(request, store, lambda: loaded, progress=False)
    assert list((tmp_path / "leases").iterdir()) == []
    monkeypatch.setattr(runner, "extract_shard", real)
    t0 = time.perf_counter()
    assert extract_entry(request, store, lambda: loaded, progress=False).committed
    assert time.perf_counter() - t0 < 30
    assert _shard_hashes(store, request.key) == reference
