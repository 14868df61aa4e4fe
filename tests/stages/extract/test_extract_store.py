"""Extract against the store: --shard I/N, resume after a crash, cache hits, non-finite values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from extract_helpers import TEXTS, CountingLoader, entry_files, make_request, make_split

import stages.extract.runner as runner
from pipeline.config import DataConfig, ExperimentConfig, ModelConfig, ScoreConfig, TrainConfig
from stages.extract import NonFiniteError
from stages.extract.runner import LoadedModel, extract_entry
from store import Store, StoreError
from store.writer import EntryWriter

FAMILY = "bert"


def _manifest(root: Path, key: str) -> dict:
    return json.loads((Path(root) / "entries" / key / "manifest.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One single-process run of the default request: (request, store root)."""
    root = tmp_path_factory.mktemp("single")
    request = make_request(FAMILY)
    stats = extract_entry(request, Store(root), CountingLoader(FAMILY), progress=False)
    assert stats.committed
    return request, root


def _assert_identical(root_a: Path, root_b: Path, key: str):
    files_a, files_b = entry_files(root_a, key), entry_files(root_b, key)
    assert files_a == files_b
    assert sorted(files_a) == [f"shard_{i:05d}.{ext}" for i in range(3) for ext in ("h5", "parquet")]
    man_a, man_b = _manifest(root_a, key), _manifest(root_b, key)
    assert man_a["shards"] == man_b["shards"]
    assert man_a["description"] == man_b["description"] and man_a["n_rows"] == man_b["n_rows"] == len(TEXTS)


def test_shard_i_of_n_matches_single_process(tmp_path, uninterrupted):
    request, single_root = uninterrupted
    store = Store(tmp_path)
    loaders = [CountingLoader(FAMILY), CountingLoader(FAMILY)]
    first = extract_entry(request, store, loaders[0], shard=(0, 2), progress=False)
    assert not first.committed and not store.exists(request.key)
    assert first.rows == 5 + 2  # shards 0 and 2 of (5, 5, 2) rows
    with pytest.raises(StoreError):
        store.open(request.key)
    second = extract_entry(request, store, loaders[1], shard=(1, 2), progress=False)
    assert second.committed and second.rows == 5 and store.exists(request.key)
    assert [ld.calls for ld in loaders] == [1, 1]
    _assert_identical(tmp_path, single_root, request.key)
    assert store.verify([request.key]) == []


def test_shard_worker_with_nothing_to_do_does_not_load(tmp_path):
    request = make_request(FAMILY, shard_rows=100)  # one shard: worker 1/2 has nothing to compute
    loader = CountingLoader(FAMILY)
    stats = extract_entry(request, Store(tmp_path), loader, shard=(1, 2), progress=False)
    assert loader.calls == 0 and not stats.committed and stats.rows == 0


def test_resume_after_crash_recomputes_only_missing_shards(tmp_path, uninterrupted, monkeypatch):
    request, single_root = uninterrupted
    store = Store(tmp_path)
    real_write = EntryWriter.write_shard

    def crash_on_third(self, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt("killed while writing shard 2")
        return real_write(self, index, *args, **kwargs)

    monkeypatch.setattr(EntryWriter, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract_entry(request, store, CountingLoader(FAMILY), progress=False)
    monkeypatch.setattr(EntryWriter, "write_shard", real_write)

    assert not store.exists(request.key)
    with pytest.raises(StoreError):
        store.open(request.key)
    writer = store.writer(request.key, request.description(), n_shards=3)
    assert writer.done_shards() == {0, 1}
    before = entry_files(tmp_path, request.key)

    computed = []
    real_extract_shard = runner.extract_shard

    def recording(loaded, req, texts, row_start, labels, progress=None):
        computed.append(row_start)
        return real_extract_shard(loaded, req, texts, row_start, labels, progress)

    monkeypatch.setattr(runner, "extract_shard", recording)
    loader = CountingLoader(FAMILY)
    stats = extract_entry(request, store, loader, progress=False)
    assert stats.committed and loader.calls == 1
    assert computed == [10]  # only the last shard (rows 10..11)
    assert stats.rows == 2
    after = entry_files(tmp_path, request.key)
    assert {k: after[k] for k in before} == before  # published shards untouched
    _assert_identical(tmp_path, single_root, request.key)


_KILLED_RUN = """
import os, signal, sys, time
import stages.extract.runner as runner
from extract_helpers import CountingLoader, make_request
from store import Store

request = make_request("bert")
store = Store(sys.argv[1])
real = runner.extract_shard

def extract_then_die(loaded, req, texts, row_start, labels, progress=None):
    if row_start == 10:  # holding the lease of shard 2: wait until shards 0 and 1 are published, then die
        writer = store.writer(request.key, request.description(), n_shards=3)
        deadline = time.time() + 60
        while writer.done_shards() != {0, 1} and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(loaded, req, texts, row_start, labels, progress)

runner.extract_shard = extract_then_die
runner.extract_entry(request, store, CountingLoader("bert"), progress=False)
"""


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: ~5 s idle, far more on a busy machine
def test_resume_after_sigkill(tmp_path, uninterrupted, monkeypatch):
    """A process killed with SIGKILL (no cleanup: its shard lease stays behind) resumes at once, identically."""
    import os
    import signal
    import subprocess
    import sys
    import time

    request, single_root = uninterrupted
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parents[2]), str(here), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    store = Store(tmp_path)
    assert not store.exists(request.key)
    assert store.writer(request.key, request.description(), n_shards=3).done_shards() == {0, 1}

    computed = []
    real_extract_shard = runner.extract_shard

    def recording(loaded, req, texts, row_start, labels, progress=None):
        computed.append(row_start)
        return real_extract_shard(loaded, req, texts, row_start, labels, progress)

    monkeypatch.setattr(runner, "extract_shard", recording)
    t0 = time.monotonic()
    stats = extract_entry(request, store, CountingLoader(FAMILY), progress=False)
    assert time.monotonic() - t0 < 30, "the dead process's shard lease should not make the resume wait for its expiry"
    assert stats.committed and computed == [10]
    _assert_identical(tmp_path, single_root, request.key)


def test_crash_in_forward_pass_leaves_earlier_shards_and_no_manifest(tmp_path, uninterrupted, monkeypatch):
    """A failure while computing (not writing) shard 1: shard 0 is kept, the rerun finishes identically."""
    request, single_root = uninterrupted
    store = Store(tmp_path)
    real_extract_shard = runner.extract_shard

    def failing(loaded, req, texts, row_start, labels, progress=None):
        if row_start == 5:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_extract_shard(loaded, req, texts, row_start, labels, progress)

    monkeypatch.setattr(runner, "extract_shard", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        extract_entry(request, store, CountingLoader(FAMILY), progress=False)
    monkeypatch.setattr(runner, "extract_shard", real_extract_shard)
    assert not store.exists(request.key)
    assert store.writer(request.key, request.description(), n_shards=3).done_shards() == {0}
    assert extract_entry(request, store, CountingLoader(FAMILY), progress=False).committed
    _assert_identical(tmp_path, single_root, request.key)


def test_cached_entry_does_not_load_the_model(tmp_path, uninterrupted):
    request, single_root = uninterrupted

    def must_not_load():
        raise AssertionError("the model loader was called for a committed entry")

    stats = extract_entry(request, Store(single_root), must_not_load, progress=False)
    assert stats.cached and stats.committed and stats.rows == 0


def test_orchestrate_extract_second_run_loads_nothing(tmp_path, monkeypatch):
    """Through pipeline.orchestrate.extract (the CLI path): a rerun neither loads a model nor writes."""
    import pipeline.models
    from pipeline import orchestrate
    from stages.entries import feature_requests

    data = tmp_path / "data"
    data.mkdir()
    for split, texts in (("train", TEXTS[:6]), ("dev", TEXTS[6:])):
        rows = "".join(f"{t}\t{y % 2}\n" for y, t in enumerate(texts))
        (data / f"{split}.tsv").write_text("text\tlabel\n" + rows)
    cfg = ExperimentConfig(
        name="toy",
        data=DataConfig(name="toy", path=str(data), splits=("train", "dev")),
        models=(ModelConfig(name="bert", source="tiny-random-bert"),),
        extract=make_request().extract,
        score=ScoreConfig(split="train"),
        train=TrainConfig(dev_split="dev", test_split="dev"),
    )
    url = str(tmp_path / "store")
    assert orchestrate.extract(cfg, url, progress=False) == 0
    keys = [r.key for r in feature_requests(cfg)]
    assert len(set(keys)) == 2 and all(Store(url).exists(k) for k in keys)
    before = {k: entry_files(Path(url), k) for k in keys}

    def must_not_load(*a, **k):
        raise AssertionError("model loaded for a cached entry")

    monkeypatch.setattr(pipeline.models, "load", must_not_load)
    monkeypatch.setattr(runner, "extract_shard", must_not_load)
    assert orchestrate.extract(cfg, url, progress=False) == 0
    assert {k: entry_files(Path(url), k) for k in keys} == before


# non-finite values ---------------------------------------------------------------------------------

TARGET_ROW = 6  # "not worth the time ." in shard 1


def _nan_loader(family: str, row: int = TARGET_ROW):
    """A loader whose model writes NaN into the output of the last block's FFN for one text."""
    from pipeline.models.families import family_of
    from pipeline.models.random_init import random_model

    def load() -> LoadedModel:
        model, tokenizer = random_model(family)
        fam = family_of(model.config)
        target = tokenizer(TEXTS[row])["input_ids"]
        hit: list[int] = []

        def find_rows(module, args, kwargs):
            ids = kwargs["input_ids"]
            hit[:] = [
                b
                for b in range(ids.shape[0])
                if ids[b, : len(target)].tolist() == target
                and (ids.shape[1] == len(target) or ids[b, len(target)] == tokenizer.pad_token_id)
            ]

        def poison(module, args, output):
            output = output.clone()
            for b in hit:
                output[b] = float("nan")
            return output

        model.register_forward_pre_hook(find_rows, with_kwargs=True)
        fam.ffn_projection(fam.block_list(model)[-1]).register_forward_hook(poison)
        return LoadedModel(model, tokenizer, fam, torch.device("cpu"))

    return load


def test_non_finite_raises_and_commits_nothing(tmp_path):
    request = make_request(FAMILY, name="poisoned")
    store = Store(tmp_path)
    with pytest.raises(NonFiniteError) as err:
        extract_entry(request, store, _nan_loader(FAMILY), progress=False)
    msg = str(err.value)
    # hidden_states[2] is the output of block 1 (the last), whose FFN output was poisoned
    assert "poisoned" in msg and "layer 2" in msg and f"row {TARGET_ROW}" in msg and "allow_nonfinite" in msg
    assert not store.exists(request.key)
    assert store.writer(request.key, request.description(), n_shards=3).done_shards() == {0}  # the bad shard is not published


def test_allow_nonfinite_commits_and_stores_the_nan(tmp_path):
    request = make_request(FAMILY, allow_nonfinite=True)
    assert request.key == make_request(FAMILY).key  # allow_nonfinite does not change the bytes of a finite run
    store = Store(tmp_path)
    stats = extract_entry(request, store, _nan_loader(FAMILY), progress=False)
    assert stats.committed
    entry = store.open(request.key)
    mean = entry.array("hidden/mean").compute()
    bad_rows = np.unique(np.argwhere(~np.isfinite(mean))[:, 0]).tolist()
    assert bad_rows == [TARGET_ROW]
    assert np.isnan(mean[TARGET_ROW, 2]).all() and np.isfinite(mean[TARGET_ROW, :2]).all()
    # the poisoned FFN *output* is after the captured FFN *input*: pooled FFN activations stay finite
    assert np.isfinite(entry.array("ffn/mean").compute()).all()


def test_float16_overflow_is_reported(tmp_path):
    """Finite float32 values beyond the float16 range become inf in storage: reported, not stored silently."""

    def load() -> LoadedModel:
        from pipeline.models.families import family_of
        from pipeline.models.random_init import random_model

        model, tokenizer = random_model(FAMILY)
        fam = family_of(model.config)
        fam.ffn_projection(fam.block_list(model)[0]).register_forward_pre_hook(lambda m, args: (args[0] * 1e6,))
        return LoadedModel(model, tokenizer, fam, torch.device("cpu"))

    request = make_request(FAMILY)
    with pytest.raises(NonFiniteError, match="float16"):
        extract_entry(request, Store(tmp_path / "a"), load, progress=False)
    # float32 storage keeps them
    assert extract_entry(make_request(FAMILY, storage_dtype="float32"), Store(tmp_path / "b"), load, progress=False).committed


def test_same_data_under_another_split_name_is_a_cache_hit(tmp_path):
    """Keys are content-addressed: the same texts and labels under another split name are the same entry."""
    a = make_request(FAMILY, split=make_split(name="train"))
    b = make_request(FAMILY, split=make_split(name="dev"))
    assert a.key == b.key
    store = Store(tmp_path)
    assert extract_entry(a, store, CountingLoader(FAMILY), progress=False).committed
    assert extract_entry(b, store, lambda: pytest.fail("loaded"), progress=False).cached
