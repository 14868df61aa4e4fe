"""Fixtures for sharing a store across processes, machines and object storage.

`tiny_config` writes a small experiment (tiny random models, a slice of SST-2) whose stages run in
seconds; `s3_server` starts a real S3-compatible server (moto in server mode) on 127.0.0.1 and points
the standard AWS variables at it, exactly as a user would for MinIO or Ceph.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from sharing_helpers import write_config


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    return write_config(tmp_path / "tiny.toml")


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 with bucket 'team-features'; AWS_* variables point at it.

    Yields the endpoint URL. Stores then open as plain `s3://team-features/<prefix>` URLs with no
    storage options, as in production with AWS_ENDPOINT_URL set.
    """
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.update(env)
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(k, None)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().makedirs("team-features", exist_ok=True)  # moto keeps buckets process-wide across servers
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
