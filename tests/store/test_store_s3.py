"""An s3:// store against a local moto server: conditional puts and byte-range HDF5 reads (needs the dev extra)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from store import Store, StoreError, commands, fingerprint

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_options():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    s3fs.S3FileSystem(**options).mkdir("feature-bucket")
    yield options
    server.stop()


def test_s3_round_trip(s3_options, write_entry, make_shard, description):
    store = Store("s3://feature-bucket/team-store", storage_options=s3_options)
    key, inputs, _ = write_entry(store)
    entry = store.open(key, verify=True)
    np.testing.assert_array_equal(entry.array("hidden/mean").compute(), np.concatenate([i[0]["hidden/mean"] for i in inputs]))
    pd.testing.assert_frame_equal(entry.table(), pd.concat([i[1] for i in inputs], ignore_index=True))
    assert commands.verify(store, [key])[1] == 0

    second = store.writer(key, entry.description, n_shards=3)
    assert second.done_shards() == {0, 1, 2}
    assert second.commit().manifest == entry.manifest

    desc = description(kind="head")
    w = store.writer(fingerprint(desc), desc, n_shards=0)
    w.write_file("head.json", b"{}")
    with pytest.raises(StoreError, match="different content"):
        w.write_file("head.json", b"[]")
    assert w.commit().read_file("head.json") == b"{}"
    assert store.gc(grace_seconds=0) == []
