"""The heads' on-store format: two blobs per head, their names in a heads entry, one format check."""

from __future__ import annotations

import numpy as np
import pytest

from stages.entries.heads_format import (
    META_NAME,
    TENSORS_NAME,
    check_format,
    entry_files,
    labels_from_json,
    labels_to_json,
    pack,
    read_entry_head,
    unpack,
)
from store import Store, fingerprint


def test_pack_unpack_through_a_heads_entry(tmp_path):
    blobs = pack({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"format": "x-head", "version": 1})
    assert sorted(blobs) == [META_NAME, TENSORS_NAME]
    files = entry_files("selected-bert-mean", blobs)
    assert sorted(files) == ["selected-bert-mean.json", "selected-bert-mean.safetensors"]
    desc = {"kind": "heads", "dataset": {"name": "toy", "split": "heads"}, "model": {"name": "bert"}}
    writer = Store(str(tmp_path)).writer(fingerprint(desc), desc, n_shards=0)
    for name, data in files.items():
        writer.write_file(name, data)
    back = read_entry_head(writer.commit(), "selected-bert-mean")
    assert back == blobs
    arrays, meta = unpack(back)
    assert np.array_equal(arrays["w"], np.arange(6, dtype=np.float32).reshape(2, 3)) and meta == {"format": "x-head", "version": 1}


def test_check_format_names_what_it_found():
    check_format({"format": "concat-head", "version": 1}, "concat-head", 1)
    with pytest.raises(ValueError, match=r"not a concat-head v1 head: format='fusion-head' version=1"):
        check_format({"format": "fusion-head", "version": 1}, "concat-head", 1)
    with pytest.raises(ValueError, match=r"not a linear-probe v1 probe: format='linear-probe' version=2"):
        check_format({"format": "linear-probe", "version": 2}, "linear-probe", 1, what="probe")


@pytest.mark.parametrize("labels", [np.array([0, 2, 5]), np.array(["neg", "pos"], dtype=object), np.array([True, False])])
def test_labels_round_trip(labels):
    back = labels_from_json(labels_to_json(labels))
    assert back.tolist() == labels.tolist()
