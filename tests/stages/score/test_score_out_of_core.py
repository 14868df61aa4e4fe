"""Score over a real store entry several times larger than each Dask worker's memory."""

import numpy as np
import pandas as pd
import pytest
from dask_cluster import memory_bounded_client

from pipeline.config import ExtractConfig, ModelConfig
from pipeline.data import Split
from pipeline.models import resolve
from stages.entries import FeatureRequest
from stages.score.runner import score_entry
from store import Store

pytest.importorskip("distributed")

pytestmark = pytest.mark.slow

ROWS, SHARD, LAYERS, HIDDEN, FFN = 16_384, 2_048, 8, 768, 1_536
WORKER_LIMIT = 200e6


def _entry(tmp_path):
    """A committed features entry of ~630 MB written shard by shard (never whole in memory)."""
    labels = np.arange(ROWS) % 3
    texts = tuple(f"sentence {i} about physics" if i % 7 == 0 else f"sentence {i}" for i in range(ROWS))
    split = Split("synth", "train", texts, labels, "<synthetic>")
    request = FeatureRequest(
        split,
        ModelConfig(name="m", source="tiny-random-bert"),
        resolve("tiny-random-bert"),
        ExtractConfig(poolings=("mean",), shard_rows=SHARD),
    )
    store = Store(tmp_path / "store")
    desc = {**request.description(), "n_layers": LAYERS, "hidden_size": HIDDEN, "ffn_size": FFN}
    writer = store.writer(request.key, desc, n_shards=ROWS // SHARD)
    direction = np.random.default_rng(1).normal(size=(3, HIDDEN))
    for k in range(ROWS // SHARD):
        rng = np.random.default_rng(k)
        lo, hi = k * SHARD, (k + 1) * SHARD
        y = labels[lo:hi]
        hidden = rng.standard_normal((SHARD, LAYERS + 1, HIDDEN), dtype=np.float32)
        hidden += (np.linspace(0, 2, LAYERS + 1)[None, :, None] * direction[y][:, None, :]).astype(np.float32)
        ffn_max = np.maximum(rng.standard_normal((SHARD, LAYERS, FFN), dtype=np.float32) - 1.5, 0)
        table = pd.DataFrame(
            {
                "row": np.arange(lo, hi),
                "label": y,
                "text": list(texts[lo:hi]),
                "n_tokens": np.full(SHARD, 9),
                "truncated": np.zeros(SHARD, dtype=bool),
            }
        )
        fire = (ffn_max > 0).sum(axis=0).astype(np.int64)
        writer.write_shard(
            k,
            {"hidden/mean": hidden.astype(np.float16), "ffn/max": ffn_max.astype(np.float16), "ffn/fire_count": fire},
            table,
            row_start=lo,
            attrs={"ffn/fire_count": {"threshold": 0.0, "n_tokens": 9 * SHARD}},
        )
        del hidden, ffn_max
    entry = writer.commit(expected_shards=ROWS // SHARD)
    return request, entry


def test_score_on_entry_three_times_worker_memory(tmp_path):
    request, entry = _entry(tmp_path)
    on_disk = sum(f["bytes"] for f in entry.manifest["shards"])
    assert on_disk > 3 * WORKER_LIMIT
    with memory_bounded_client(WORKER_LIMIT) as client:
        workers = set(client.scheduler_info()["workers"])
        remote = score_entry(entry, request, ["physics"], rows_per_chunk=256, scheduler=client)
        assert set(client.scheduler_info()["workers"]) == workers, "a worker was restarted: memory was not bounded"
    local = score_entry(entry, request, ["physics"], rows_per_chunk=1024, scheduler="threads")
    var_r, var_l = remote[0], local[0]
    assert np.isfinite(var_r["variability"]).all()
    np.testing.assert_allclose(var_r["variability"], var_l["variability"], rtol=1e-9)
    assert var_r.loc[var_r["layer"] == LAYERS, "variability"].item() < var_r.loc[var_r["layer"] == 1, "variability"].item()
    for a, b in zip(remote[1:], local[1:]):
        pd.testing.assert_frame_equal(a, b)
