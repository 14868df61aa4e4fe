"""`predict` on new text: same features as extract stored, hence the same probabilities.

Uses the session's tiny real store (tiny random llama and t5, 2 blocks each, so hidden
states 0..2; see tests/pipeline_e2e/tiny_pipeline.py) after score and train. Both llama
and t5 apply a final norm to their last hidden state, so a probe at layer 0 or 1 only
matches its stored features when predict truncates the model at the right block, and a
probe at layer 2 only when it does not truncate at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline_e2e"))
import tiny_pipeline as tp  # noqa: E402
from config_factory import write_config  # noqa: E402

from pipeline.errors import PipelineError  # noqa: E402
from store import Store  # noqa: E402

DEV_ROWS = [0, 3, 17, 41, 64, 79]  # across all three dev shards (32/32/16 rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg_path, store_dir, out = tp.trained_store(tmp_path_factory)
    return tp.load(cfg_path), Store(str(store_dir)), out


def _stored(cfg, store, blocks, rows) -> dict[str, np.ndarray]:
    """Features of ``rows`` of the dev split for ``blocks``, as the store holds them."""
    from stages.entries import feature_requests, open_features

    reqs = {r.model.name: r for r in feature_requests(cfg) if r.split.name == cfg.train.dev_split}
    return {
        str(b): np.asarray(open_features(store, reqs[b.model]).array(f"hidden/{b.pooling}").compute()[rows, b.layer, :], dtype=np.float32)
        for b in blocks
    }


def _dev_texts(cfg) -> list[str]:
    from pipeline.data import load_split

    split = load_split(cfg.data, cfg.train.dev_split)
    return [split.texts[i] for i in DEV_ROWS]


@pytest.mark.parametrize(
    "head_name",
    [
        "probe:llama:0:mean",  # truncated to one block
        "probe:llama:1:mean",  # intermediate: must not see llama's final norm
        "probe:llama:2:mean",  # top: must see it (no truncation)
        "probe:t5:1:mean",
        "top:t5:mean",  # t5's encoder applies final_layer_norm to its last state
        "fusion",  # blocks of two models, llama at two depths
    ],
)
def test_predict_texts_matches_head_on_stored_features(trained, head_name):
    from stages.predict import _head_blocks, heads_entry, predict_texts

    cfg, store, _ = trained
    head, blocks = _head_blocks(head_name, heads_entry(cfg, store))
    stored = _stored(cfg, store, blocks, DEV_ROWS)
    X = stored if head_name in ("fusion", "concat") else stored[str(blocks[0])]
    want = head.predict_proba(X)
    texts = _dev_texts(cfg)
    got = predict_texts(cfg, store, head_name, texts)
    assert [t for t, _, _ in got] == texts
    np.testing.assert_allclose(np.stack([p for _, _, p in got]), want, rtol=0, atol=1e-5)
    classes = head.classes_ if hasattr(head, "classes_") else head[-1].classes_
    assert [label for _, label, _ in got] == list(classes[np.argmax(want, axis=1)])


def test_predict_block_features_equal_stored_bytes(trained):
    """The features themselves, not just the probabilities: predict rounds like extract stores."""
    from pipeline.blocks import Block
    from stages.predict import block_features

    cfg, store, _ = trained
    blocks = [Block(m, layer, p) for m in ("llama", "t5") for layer in (0, 1, 2) for p in ("mean", "first", "last")]
    got = block_features(cfg, blocks, _dev_texts(cfg))
    want = _stored(cfg, store, blocks, DEV_ROWS)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-3, atol=2e-3, err_msg=name)


def test_unknown_head_lists_available_heads(trained, capsys):
    from pipeline.cli import main

    cfg, store, _ = trained
    rc = main(["predict", "--config", cfg.source, "--store", store.url.removeprefix("file://"), "--head", "nope", "-q", "some text"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "'nope' not found; available:" in err
    for name in ("fusion", "concat", "probe:llama:1:mean", "selected:t5:mean", "top:llama:first"):
        assert name in err


def test_predict_cli_prints_label_and_probabilities(trained, capsys):
    from pipeline.cli import main

    cfg, store, _ = trained
    rc = main(
        [
            "predict",
            "--config",
            cfg.source,
            "--store",
            store.url.removeprefix("file://"),
            "--head",
            "probe:t5:1:mean",
            "-q",
            "a gripping film",
            "dull and lifeless",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 3 and out[0] == "label\tp_0\tp_1\ttext"
    label, p0, p1, text = out[1].split("\t")
    assert label in ("0", "1") and text == "a gripping film"
    assert float(p0) + float(p1) == pytest.approx(1.0, abs=2e-3)


def _cli_rows(capsys, argv, stdin: str | None = None, monkeypatch=None) -> list[str]:
    import io

    from pipeline.cli import main

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out.splitlines()


def test_predict_from_the_store_alone(trained, tmp_path, capsys, monkeypatch):
    """With the data files gone, by head name (config) and by heads key (no config): same output."""
    import json

    from stages.entries import expected_heads_key

    cfg, store, _ = trained
    texts = ["a gripping film", "dull and\nlifeless", "tab\there"]
    url = store.url.removeprefix("file://")
    want = _cli_rows(capsys, ["predict", "--config", cfg.source, "--store", url, "--head", "fusion", "-q", *texts])
    assert len(want) == 1 + len(texts)  # the newline and the tab stay inside their row
    assert want[2].endswith("\tdull and\\nlifeless") and want[3].endswith("\ttab\\there")
    key = expected_heads_key(cfg)
    gone = write_config(tmp_path / "gone.toml", tp.tiny_experiment(data=tmp_path / "deleted-data"))
    assert _cli_rows(capsys, ["predict", "--config", str(gone), "--store", url, "--head", "fusion", "-q", *texts]) == want
    monkeypatch.chdir(tmp_path)  # no configs/default.toml here: the key alone must do
    assert _cli_rows(capsys, ["predict", "--store", url, "--head", f"{key[:10]}:fusion", "-q", *texts]) == want
    from_stdin = _cli_rows(
        capsys,
        ["predict", "--store", url, "--head", f"{key[:10]}:fusion", "--file", "-", "--format", "jsonl", "-q"],
        stdin="a gripping film\nflat\n",
        monkeypatch=monkeypatch,
    )
    rows = [json.loads(line) for line in from_stdin]
    assert [r["text"] for r in rows] == ["a gripping film", "flat"]
    assert rows[0]["label"] == int(want[1].split("\t")[0]) and set(rows[0]["probabilities"]) == {"0", "1"}
    default = _cli_rows(capsys, ["predict", "--store", url, "--head", key[:10], "-q", "flat"])
    assert default[0] == "label\tp_0\tp_1\ttext" and len(default) == 2


def test_predict_refuses_empty_texts(trained, tmp_path):
    from stages.predict import predict_texts

    cfg, store, _ = trained
    with pytest.raises(PipelineError, match="text 2 is empty"):
        predict_texts(cfg, store, "fusion", ["fine", "  "])
    from pipeline.cli import read_lines

    (tmp_path / "t.txt").write_bytes(b"ok\n\nlast\n")
    with pytest.raises(PipelineError, match="line 2 is empty"):
        read_lines(str(tmp_path / "t.txt"))
    (tmp_path / "b.txt").write_bytes(b"fine\nstill fine\nbad \xff here\n")
    with pytest.raises(PipelineError, match=r"not valid UTF-8 at line 3, byte offset 20"):
        read_lines(str(tmp_path / "b.txt"))


def test_head_key_of_another_kind_is_refused(trained):
    from stages.entries import feature_requests
    from stages.predict import predict_texts

    cfg, store, _ = trained
    features = feature_requests(cfg)[0].key
    with pytest.raises(PipelineError, match=r"is a features entry, not heads; `store ls --kind heads"):
        predict_texts(None, store, features[:12], ["text"])


def test_changed_config_never_uses_stale_heads(trained):
    """Heads are looked up by the key of the current config's features: dropping a model
    from the config must not silently serve heads trained with it."""
    import dataclasses

    from stages.predict import predict_texts

    cfg, store, _ = trained
    llama_fusion = dataclasses.replace(cfg.train.fusion, inputs=("llama:-1:mean",), average=())
    only_llama = dataclasses.replace(
        cfg, models=tuple(m for m in cfg.models if m.name == "llama"), train=dataclasses.replace(cfg.train, fusion=llama_fusion)
    )
    with pytest.raises(PipelineError, match=r"no trained heads for 'e2e-tiny' with its current features.*make train"):
        predict_texts(only_llama, store, "probe:t5:1:mean", ["text"])


def test_predict_before_train_says_run_train(tmp_path_factory):
    from stages.predict import predict_texts

    cfg_path, store_dir = tp.extracted_store(tmp_path_factory)
    with pytest.raises(PipelineError, match=r"no trained heads for 'e2e-tiny'.*make train CONFIG=.*tiny\.toml"):
        predict_texts(tp.load(cfg_path), Store(str(store_dir)), "fusion", ["text"])


def test_load_head_predicts_like_the_stored_head(trained):
    """`load_head` + `load_features` in a notebook give what the head gives on the stored features."""
    from pipeline import load_features, load_head
    from stages.entries import expected_heads_key
    from stages.predict import _head_blocks, default_head, heads_entry

    cfg, store, _ = trained
    X, y = load_features(store, dataset="sst2", split=cfg.train.dev_split, model="t5", layer=1)
    head = load_head(store, "probe:t5:1:mean")
    ref, _ = _head_blocks("probe:t5:1:mean", heads_entry(cfg, store))
    np.testing.assert_allclose(head.predict_proba(X), ref.predict_proba(X), rtol=0, atol=0)
    np.testing.assert_array_equal(head.predict(X), ref.predict(X))
    assert y.dtype.kind == "i" and set(head.classes_.tolist()) == {0, 1}
    assert head.name == "probe:t5:1:mean" and head.blocks == ["t5:1:mean"]
    assert repr(head) == "LabelledHead('probe:t5:1:mean', blocks=['t5:1:mean'], classes=[0, 1])"
    best = load_head(store, key=expected_heads_key(cfg)[:10])
    assert hasattr(best, "predict_proba") and best.name == default_head(heads_entry(cfg, store))
    fusion = load_head(store, "fusion")
    assert fusion.blocks == fusion.head.block_names_ and len(fusion.blocks) > 1
    with pytest.raises(ValueError, match=r"invalid store key '.*': expected a key or a unique prefix of 8\+ lowercase hex"):
        load_head(store, key=expected_heads_key(cfg)[:10].upper())
