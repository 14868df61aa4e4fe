"""Bad inputs through the CLI: exit non-zero with one `error:` line naming the problem, no traceback, and
nothing committed in the store. Duplicates and over-long texts are warnings (exit 0)."""

from __future__ import annotations

import json

import pytest
from config_factory import SST2, write_config
from reliability_helpers import assert_one_line_error, base_config, copy_store, entry_dirs, run_subprocess, write_tsv

RUNNERS = ["fork", pytest.param("subprocess", marks=pytest.mark.slow)]
GOOD = [("a good film", 1), ("a bad film", 0), ("great fun", 1), ("dull and slow", 0)]


@pytest.fixture(params=RUNNERS)
def run(request, cli):
    if request.param == "fork":
        return cli
    return lambda argv, **kw: run_subprocess([str(a) for a in argv])


def data_config(tmp_path, splits=("train",), **extract):
    cfg = base_config(tmp_path / "data")
    cfg["data"]["splits"] = list(splits)
    cfg["extract"].update(extract)
    return cfg


def extract_fails(run, tmp_path, cfg, *needles):
    store = tmp_path / "store"
    res = run(["extract", "--config", write_config(tmp_path / "config.toml", cfg), "--store", store, "-q"])
    line = assert_one_line_error(res, *needles)
    assert not entry_dirs(store), "something was written to the store"
    return line


def _tsv(tmp_path, rows, name="train.tsv", header=("text", "label")):
    return write_tsv(tmp_path / "data" / name, rows, header)


def test_empty_file(run, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_bytes(b"")
    extract_fails(run, tmp_path, data_config(tmp_path), "train.tsv")


def test_header_only(run, tmp_path):
    _tsv(tmp_path, [])
    extract_fails(run, tmp_path, data_config(tmp_path), "train.tsv", "no rows")


def test_missing_column(run, tmp_path):
    _tsv(tmp_path, GOOD, header=("text", "sentiment"))
    extract_fails(run, tmp_path, data_config(tmp_path), "train.tsv", "label column 'label'")


def test_empty_text(run, tmp_path):
    _tsv(tmp_path, [*GOOD, ("   ", 1)])
    extract_fails(run, tmp_path, data_config(tmp_path), "train.tsv", "row 5", "empty")


def test_non_utf8_bytes(run, tmp_path):
    p = _tsv(tmp_path, GOOD)
    p.write_bytes(p.read_bytes() + b"caf\xe9 \xff\xfe\t1\n")
    extract_fails(run, tmp_path, data_config(tmp_path), "train.tsv", "utf-8")


@pytest.mark.parametrize("label", ["nan", "1.5", "1.0", "positive", ""])
def test_bad_label_tsv(label, run, tmp_path):
    _tsv(tmp_path, [*GOOD, ("fine", label)])
    extract_fails(run, tmp_path, data_config(tmp_path), "train.tsv", "row 5", "label")


@pytest.mark.parametrize("label", [1.0, float("nan"), "positive", None, True], ids=["float", "nan", "string", "null", "bool"])
def test_bad_label_jsonl(label, run, tmp_path):
    (tmp_path / "data").mkdir()
    lines = [json.dumps({"text": t, "label": y}) for t, y in GOOD] + [json.dumps({"text": "fine", "label": label})]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    line = extract_fails(run, tmp_path, data_config(tmp_path), "train.jsonl", "label")
    assert "row 5" in line or "float" in line


def test_class_in_dev_not_in_train(run, tmp_path):
    _tsv(tmp_path, GOOD)
    _tsv(tmp_path, [("meh", 2), ("ok", 1)], "dev.tsv")
    cfg = data_config(tmp_path, splits=("train", "dev"))
    extract_fails(run, tmp_path, cfg, "dev.tsv", "[2]", "training split")


def test_single_class_train(run, tmp_path):
    _tsv(tmp_path, [(t, 1) for t, _ in GOOD])
    extract_fails(run, tmp_path, data_config(tmp_path), "train.tsv", "single class")


def test_unknown_model(run, tmp_path, reference):
    cfg = base_config()
    cfg["models"][0]["source"] = "no-such-org/no-such-model"
    extract_fails(run, tmp_path, cfg, "no-such-org/no-such-model")


def test_missing_model_folder(run, tmp_path):
    cfg = base_config()
    cfg["models"][0]["source"] = str(tmp_path / "nowhere")
    extract_fails(run, tmp_path, cfg, str(tmp_path / "nowhere"))


def test_malformed_toml(run, tmp_path):
    p = tmp_path / "config.toml"
    p.write_text('name = "x"\n[data\nname = "sst2"\n')
    res = run(["extract", "--config", p, "--store", tmp_path / "store", "-q"])
    assert_one_line_error(res, "config.toml", "malformed toml")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("where", ["top", "extract", "model"])
def test_unknown_config_key(where, run, tmp_path):
    cfg = base_config()
    {"top": cfg, "extract": cfg["extract"], "model": cfg["models"][0]}[where]["shard_rowz"] = 3
    extract_fails(run, tmp_path, cfg, "unknown key", "shard_rowz")


def test_missing_config_file(run, tmp_path):
    res = run(["extract", "--config", tmp_path / "nope.toml", "--store", tmp_path / "store", "-q"])
    assert_one_line_error(res, "nope.toml", "not found")


def test_fusion_layer_out_of_range(run, reference, tmp_path):
    """train.fusion.inputs naming layer 99 fails before any head is fitted, and writes nothing."""
    store = copy_store(reference.store, tmp_path / "store")
    cfg = base_config()
    cfg["train"]["fusion"]["inputs"] = ["bert:99:mean"]
    out = tmp_path / "out"
    res = run(["train", "--config", write_config(tmp_path / "c.toml", cfg), "--store", store, "--out", out, "-q"])
    assert_one_line_error(res, "train.fusion.inputs", "layer 99", "out of range")
    assert set(entry_dirs(store)) == {reference.key} and not (out / "train.parquet").exists()


# warnings, exit 0 -------------------------------------------------------------------------------------

LONG = " ".join(["remarkably"] * 3000)


@pytest.fixture(scope="module")
def noisy_run(zygote, tmp_path_factory):
    """One extract over data with exact duplicates, a text with two labels and two over-long texts."""
    d = tmp_path_factory.mktemp("noisy")
    rows = [ln.split("\t") for ln in (SST2 / "train.tsv").read_text().splitlines()[1:41]]
    rows += [rows[0], rows[1], (rows[2][0], str(1 - int(rows[2][1]))), (LONG, "1"), (LONG + " again", "0")]
    write_tsv(d / "data" / "train.tsv", rows)
    cfg = base_config(d / "data", rows=0)
    res = zygote.run(["extract", "--config", write_config(d / "c.toml", cfg), "--store", d / "store"])
    return res, d / "store"


def test_exact_duplicates_are_reported_and_kept(noisy_run):
    res, _ = noisy_run
    assert res.code == 0, res.stderr
    assert "2 duplicate (text, label) row(s)" in res.stderr and "error:" not in res.stderr


def test_conflicting_labels_warn(noisy_run):
    res, _ = noisy_run
    assert res.code == 0
    assert "1 text(s) occur with different labels" in res.stderr


def test_long_texts_truncated_and_counted(noisy_run):
    from store import Store

    res, store_path = noisy_run
    assert res.code == 0
    assert "2 text(s) longer than max_length=64 were truncated" in res.stderr
    (key,) = entry_dirs(store_path)
    table = Store(store_path).open(key, verify=True).table()
    assert int(table["truncated"].sum()) == 2 and table["n_tokens"].max() == 64


# non-finite activations (in-process) ------------------------------------------------------------------


def test_nonfinite_activations_commit_nothing(reference, tmp_path, monkeypatch):
    import torch

    import pipeline.orchestrate as extract_pkg
    from pipeline import orchestrate
    from pipeline.config import load_config
    from stages.extract.runner import NonFiniteError
    from store import Store

    orig = extract_pkg.load_for_extract
    calls = [0]

    def poison(module, args, output):
        calls[0] += 1
        return output * float("nan") if calls[0] >= 3 else output  # a few good batches first

    def load_for_extract(*a, **kw):
        load = orig(*a, **kw)

        def wrapped():
            loaded = load()
            loaded.model.get_input_embeddings().register_forward_hook(poison)
            return loaded

        return wrapped

    monkeypatch.setattr(extract_pkg, "load_for_extract", load_for_extract)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(NonFiniteError, match="non-finite") as ei:
            orchestrate.extract(load_config(reference.config), str(tmp_path / "store"), progress=False)
    finally:
        torch.set_num_threads(previous)
    assert "\n" not in str(ei.value) and "allow_nonfinite" in str(ei.value)
    store = Store(tmp_path / "store")
    assert calls[0] >= 3 and not store.exists(reference.key) and store.verify() == []
