"""Data splits: four formats, configurable columns, one-line DataErrors naming the file, the fingerprint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from pipeline_helpers import DEV_ROWS, PROJECT_ROOT, TRAIN_ROWS, write_rows

from pipeline.config import DataConfig
from pipeline.data import Split, carve_dev, data_fingerprint, load_split, load_splits, split_path
from pipeline.errors import DataError

FORMATS = [".tsv", ".csv", ".jsonl", ".parquet"]
# quotes, commas, apostrophes and non-ASCII must survive every format unchanged
TRICKY_ROWS = [('he said "wow" , twice', 1), ("it's café-grade, naïve", 0), ("  leading space kept", 2), ("plain", 0)]


def cfg_for(**kw) -> DataConfig:
    return DataConfig(name="toy", **kw)


def write_splits(folder, ext, train=TRAIN_ROWS, dev=DEV_ROWS, **kw):
    write_rows(folder / f"train{ext}", train, **kw)
    write_rows(folder / f"dev{ext}", dev, **kw)
    return folder


def assert_one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# --- formats and columns ------------------------------------------------------------------------


@pytest.mark.parametrize("ext", FORMATS)
def test_each_format_loads_the_same_texts_and_labels(tmp_path, ext):
    path = write_rows(tmp_path / f"train{ext}", TRICKY_ROWS)
    split = load_split(cfg_for(path=str(tmp_path), splits=("train",)), "train")
    assert split.texts == tuple(t for t, _ in TRICKY_ROWS)
    assert split.labels.dtype == np.int64
    assert split.labels.tolist() == [y for _, y in TRICKY_ROWS]
    assert split.path == str(path)
    assert split.name == "train" and split.dataset == "toy" and len(split) == len(TRICKY_ROWS)


def test_formats_give_the_same_fingerprint(tmp_path):
    prints = set()
    for ext in FORMATS:
        folder = tmp_path / ext.strip(".")
        write_rows(folder / f"train{ext}", TRICKY_ROWS)
        prints.add(load_split(cfg_for(path=str(folder)), "train").fingerprint)
    assert len(prints) == 1


@pytest.mark.parametrize("ext", FORMATS)
def test_configurable_columns(tmp_path, ext):
    write_splits(tmp_path, ext, text_column="sentence", label_column="y")
    cfg = cfg_for(path=str(tmp_path), splits=("train", "dev"), text_column="sentence", label_column="y")
    splits = load_splits(cfg)
    assert splits["train"].texts == tuple(t for t, _ in TRAIN_ROWS)
    assert splits["dev"].labels.tolist() == [y for _, y in DEV_ROWS]


def test_extra_columns_are_ignored(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_text("id\ttext\tlabel\tsource\n1\tgood\t1\tx\n2\tbad\t0\ty\n", encoding="utf-8")
    split = load_split(cfg_for(path=str(tmp_path)), "train")
    assert split.texts == ("good", "bad") and split.labels.tolist() == [1, 0]


def test_explicit_files_override_path(tmp_path):
    write_splits(tmp_path / "folder", ".tsv")
    other = write_rows(tmp_path / "elsewhere" / "my dev.jsonl", [("other text", 1), ("more", 0)])
    cfg = cfg_for(path=str(tmp_path / "folder"), splits=("train", "dev"), files={"dev": str(other)})
    splits = load_splits(cfg)
    assert splits["train"].texts == tuple(t for t, _ in TRAIN_ROWS)
    assert splits["dev"].texts == ("other text", "more")
    assert splits["dev"].path == str(other)


def test_files_without_path(tmp_path):
    tr = write_rows(tmp_path / "a.csv", TRAIN_ROWS)
    dv = write_rows(tmp_path / "b.parquet", DEV_ROWS)
    splits = load_splits(cfg_for(splits=("train", "dev"), files={"train": str(tr), "dev": str(dv)}))
    assert len(splits["train"]) == len(TRAIN_ROWS) and len(splits["dev"]) == len(DEV_ROWS)


def test_split_missing_from_files_and_no_path(tmp_path):
    tr = write_rows(tmp_path / "a.csv", TRAIN_ROWS)
    with pytest.raises(DataError, match=r"data.files has no entry for split 'dev'"):
        load_splits(cfg_for(splits=("train", "dev"), files={"train": str(tr)}))


def test_limit_keeps_first_rows(tmp_path):
    write_splits(tmp_path, ".tsv")
    splits = load_splits(cfg_for(path=str(tmp_path), splits=("train", "dev"), limit=2))
    assert splits["train"].texts == tuple(t for t, _ in TRAIN_ROWS[:2])
    assert len(splits["dev"]) == 2
    big = load_split(cfg_for(path=str(tmp_path), limit=1000), "train")
    assert len(big) == len(TRAIN_ROWS)


def test_shipped_sst2_loads():
    cfg = cfg_for(path=str(PROJECT_ROOT / "data" / "sst2"))
    splits = load_splits(cfg)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [6920, 872, 1821]
    assert set(np.unique(splits["train"].labels).tolist()) == {0, 1}


# --- errors: one line, naming the file -----------------------------------------------------------


def test_no_file_for_split(tmp_path):
    with pytest.raises(DataError) as e:
        load_split(cfg_for(path=str(tmp_path)), "train")
    msg = assert_one_line_naming(e, tmp_path)
    assert "'train'" in msg and ".parquet" in msg


def test_several_files_for_split(tmp_path):
    write_rows(tmp_path / "train.tsv", TRAIN_ROWS)
    write_rows(tmp_path / "train.csv", TRAIN_ROWS)
    with pytest.raises(
        DataError, match=r"several files for split 'train'.*train.csv.*train.tsv|several files for split 'train'.*train.tsv.*train.csv"
    ):
        load_split(cfg_for(path=str(tmp_path)), "train")


def test_explicit_file_not_found(tmp_path):
    missing = tmp_path / "gone.tsv"
    with pytest.raises(DataError, match="data file not found") as e:
        load_split(cfg_for(files={"train": str(missing)}), "train")
    assert_one_line_naming(e, missing)


def test_unsupported_extension(tmp_path):
    p = tmp_path / "train.xlsx"
    p.write_text("x")
    with pytest.raises(DataError, match="unsupported format") as e:
        load_split(cfg_for(files={"train": str(p)}), "train")
    assert_one_line_naming(e, p)


@pytest.mark.parametrize("ext", FORMATS)
def test_empty_file(tmp_path, ext):
    p = tmp_path / f"train{ext}"
    p.write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_split(cfg_for(path=str(tmp_path)), "train")
    assert_one_line_naming(e, p)


@pytest.mark.parametrize("ext", FORMATS)
def test_header_only_has_no_rows(tmp_path, ext):
    p = write_rows(tmp_path / f"train{ext}", [])
    with pytest.raises(DataError, match="no rows") as e:
        load_split(cfg_for(path=str(tmp_path)), "train")
    assert_one_line_naming(e, p)


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("role", ["text", "label"])
def test_missing_column(tmp_path, ext, role):
    p = write_rows(tmp_path / f"train{ext}", TRAIN_ROWS)
    kw = {f"{role}_column": "nope"}
    with pytest.raises(DataError) as e:
        load_split(cfg_for(path=str(tmp_path), **kw), "train")
    msg = assert_one_line_naming(e, p)
    assert f"missing {role} column 'nope'" in msg
    assert f"data.{role}_column" in msg


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text(tmp_path, ext, text):
    p = write_rows(tmp_path / f"train{ext}", [("fine", 1), (text, 0)])
    with pytest.raises(DataError, match="row 2: empty or missing text") as e:
        load_split(cfg_for(path=str(tmp_path)), "train")
    assert_one_line_naming(e, p)


def test_missing_text_in_jsonl(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"label": 0}\n', encoding="utf-8")
    with pytest.raises(DataError, match="row 2: empty or missing text"):
        load_split(cfg_for(path=str(tmp_path)), "train")


@pytest.mark.parametrize(
    ("ext", "payload"),
    [
        (".tsv", b"text\tlabel\ngood\t1\nbad \xff\xfe\t0\n"),
        (".csv", b"text,label\ngood,1\nbad \xe9,0\n"),
        (".jsonl", b'{"text": "good", "label": 1}\n{"text": "bad \xff", "label": 0}\n'),
    ],
)
def test_non_utf8_bytes(tmp_path, ext, payload):
    p = tmp_path / f"train{ext}"
    p.write_bytes(payload)
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        load_split(cfg_for(path=str(tmp_path)), "train")
    assert_one_line_naming(e, p)


@pytest.mark.parametrize(
    ("ext", "label", "fragment"),
    [
        (".tsv", "nan", "'nan' is not an integer"),
        (".tsv", "", "'' is not an integer"),
        (".tsv", "1.0", "'1.0' is not an integer"),
        (".tsv", "pos", "'pos' is not an integer"),
        (".tsv", "--1", "'--1' is not an integer"),
        (".tsv", "\u00b2", "is not an integer"),  # superscript two: isdigit() but not a number
        (".csv", "0.5", "'0.5' is not an integer"),
        (".jsonl", float("nan"), "nan is not an integer"),
        (".jsonl", 1.0, "1.0 is a float"),
        (".jsonl", 0.5, "0.5 is not an integer"),
        (".jsonl", "pos", "'pos' is not an integer"),
        (".jsonl", True, "True is not an integer"),
        (".jsonl", None, "is not an integer"),
        (".parquet", float("nan"), "is not an integer"),
        (".parquet", 1.0, "is a float"),
        (".parquet", "1", None),  # a string column of digits is accepted
    ],
)
def test_bad_labels(tmp_path, ext, label, fragment):
    p = write_rows(
        tmp_path / f"train{ext}", [("first", label), ("second", "0" if isinstance(label, str) else 0.0 if isinstance(label, float) else 0)]
    )
    cfg = cfg_for(path=str(tmp_path))
    if fragment is None:
        assert load_split(cfg, "train").labels.tolist() == [1, 0]
        return
    with pytest.raises(DataError) as e:
        load_split(cfg, "train")
    msg = assert_one_line_naming(e, p)
    assert "row 1" in msg and fragment in msg


def test_integer_labels_with_spaces_and_negatives(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_text("text\tlabel\na\t 3\nb\t-1\n", encoding="utf-8")
    assert load_split(cfg_for(path=str(tmp_path)), "train").labels.tolist() == [3, -1]


def test_dev_class_not_in_train(tmp_path):
    write_splits(tmp_path, ".tsv", dev=[("x", 1), ("y", 7)])
    with pytest.raises(DataError) as e:
        load_splits(cfg_for(path=str(tmp_path), splits=("train", "dev")))
    msg = assert_one_line_naming(e, tmp_path / "dev.tsv")
    assert "[7]" in msg and "'train'" in msg


def test_dev_may_miss_a_class(tmp_path):
    write_splits(tmp_path, ".tsv", dev=[("x", 1), ("y", 1)])
    assert load_splits(cfg_for(path=str(tmp_path), splits=("train", "dev")))["dev"].labels.tolist() == [1, 1]


def test_single_class_train(tmp_path):
    write_splits(tmp_path, ".tsv", train=[("a", 1), ("b", 1)], dev=[("x", 1)])
    with pytest.raises(DataError, match=r"single class \(\[1\]\)") as e:
        load_splits(cfg_for(path=str(tmp_path), splits=("train", "dev")))
    assert_one_line_naming(e, tmp_path / "train.tsv")


def test_single_class_after_limit(tmp_path):
    write_splits(tmp_path, ".tsv", train=[("a", 1), ("b", 1), ("c", 0)], dev=[("x", 1)])
    with pytest.raises(DataError, match="single class"):
        load_splits(cfg_for(path=str(tmp_path), splits=("train", "dev"), limit=2))


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive(tmp_path):
    texts = [t for t, _ in TRAIN_ROWS]
    labels = np.array([y for _, y in TRAIN_ROWS])
    base = data_fingerprint(texts, labels)
    assert len(base) == 64 and int(base, 16) >= 0
    assert data_fingerprint(list(texts), labels.copy()) == base
    assert data_fingerprint(tuple(texts), labels.tolist()) == base  # container types do not matter
    assert data_fingerprint(texts, labels.astype(np.int32)) == base  # nor the integer width

    changed_text = texts.copy()
    changed_text[2] = changed_text[2] + "!"
    assert data_fingerprint(changed_text, labels) != base

    changed_label = labels.copy()
    changed_label[1] = 1 - changed_label[1]
    assert data_fingerprint(texts, changed_label) != base

    assert data_fingerprint(texts[::-1], labels[::-1]) != base  # order matters
    assert data_fingerprint(texts[:-1], labels[:-1]) != base


def test_fingerprint_is_unambiguous_at_text_boundaries():
    assert data_fingerprint(["ab", "c"], [0, 0]) != data_fingerprint(["a", "bc"], [0, 0])


def test_fingerprint_rejects_length_mismatch():
    with pytest.raises(ValueError):
        data_fingerprint(["a", "b"], [0])


def test_split_fingerprint_follows_file_content(tmp_path):
    cfg = cfg_for(path=str(tmp_path))
    write_rows(tmp_path / "train.tsv", TRAIN_ROWS)
    base = load_split(cfg, "train").fingerprint
    assert load_split(cfg, "train").fingerprint == base

    # same rows in another format and with other column names: same data, same fingerprint
    (tmp_path / "train.tsv").unlink()
    write_rows(tmp_path / "train.parquet", TRAIN_ROWS, text_column="s", label_column="y")
    assert load_split(DataConfig(name="other-name", path=str(tmp_path), text_column="s", label_column="y"), "train").fingerprint == base
    (tmp_path / "train.parquet").unlink()

    rows = list(TRAIN_ROWS)
    rows[0] = (rows[0][0] + " again", rows[0][1])
    write_rows(tmp_path / "train.tsv", rows)
    assert load_split(cfg, "train").fingerprint != base

    rows = list(TRAIN_ROWS)
    rows[0] = (rows[0][0], 1 - rows[0][1])
    write_rows(tmp_path / "train.tsv", rows)
    assert load_split(cfg, "train").fingerprint != base


def test_split_path_prefers_files(tmp_path):
    write_rows(tmp_path / "train.tsv", TRAIN_ROWS)
    assert split_path(cfg_for(path=str(tmp_path)), "train") == tmp_path / "train.tsv"
    assert str(split_path(cfg_for(path=str(tmp_path), files={"train": "x.csv"}), "train")) == "x.csv"


def test_parquet_int_labels_roundtrip(tmp_path):
    df = pd.DataFrame({"text": ["a", "b"], "label": np.array([5, 2], dtype=np.int32)})
    df.to_parquet(tmp_path / "train.parquet")
    assert load_split(cfg_for(path=str(tmp_path)), "train").labels.tolist() == [5, 2]


@pytest.mark.parametrize("ext", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_string_labels_become_sorted_class_indices(tmp_path, ext):
    write_splits(tmp_path, ext, train=[("a", "pos"), ("b", "neg"), ("c", " neutral "), ("d", "pos")], dev=[("x", "neg"), ("y", "pos")])
    splits = load_splits(cfg_for(path=str(tmp_path), splits=("train", "dev")))
    train, dev = splits["train"], splits["dev"]
    assert train.label_names == dev.label_names == ("neg", "neutral", "pos")
    assert train.labels.tolist() == [2, 0, 1, 2] and dev.labels.tolist() == [0, 2]
    assert load_split(cfg_for(path=str(tmp_path), splits=("train", "dev")), "dev").labels.tolist() == [0, 2]


def test_string_labels_fingerprint_covers_the_names(tmp_path):
    write_splits(tmp_path / "a", ".tsv", train=[("a", "pos"), ("b", "neg")], dev=[("x", "neg")])
    write_splits(tmp_path / "b", ".tsv", train=[("a", "yes"), ("b", "no")], dev=[("x", "no")])
    write_splits(tmp_path / "c", ".tsv", train=[("a", 1), ("b", 0)], dev=[("x", 0)])
    fps = [load_splits(cfg_for(path=str(tmp_path / d), splits=("train", "dev")))["train"] for d in "abc"]
    assert [s.labels.tolist() for s in fps] == [[1, 0]] * 3
    assert len({s.fingerprint for s in fps}) == 3
    assert fps[2].label_names is None
    assert fps[2].fingerprint == data_fingerprint(("a", "b"), np.array([1, 0]))  # integer labels: the key is unchanged


def test_string_label_not_in_train(tmp_path):
    write_splits(tmp_path, ".tsv", train=[("a", "pos"), ("b", "neg")], dev=[("x", "neg"), ("y", "meh")])
    with pytest.raises(DataError) as e:
        load_splits(cfg_for(path=str(tmp_path), splits=("train", "dev")))
    msg = assert_one_line_naming(e, tmp_path / "dev.tsv")
    assert "'meh'" in msg and "['neg', 'pos']" in msg


@pytest.mark.parametrize("ext", [".tsv", ".csv", ".jsonl"])
def test_non_utf8_error_names_the_real_line_and_offset(tmp_path, ext):
    """Far into a large file (past the readers' first buffer), the position is the file's, not the buffer's."""
    rows = [f"row number {i} with some padding text" for i in range(20000)]
    if ext == ".jsonl":
        lines = [f'{{"text": "{t}", "label": {i % 2}}}' for i, t in enumerate(rows)]
        head = ""
    else:
        sep = "\t" if ext == ".tsv" else ","
        lines = [f"{t}{sep}{i % 2}" for i, t in enumerate(rows)]
        head = f"text{sep}label\n"
    data = (head + "\n".join(lines[:15000])).encode() + b"\nbad \xff byte" + ("\n" + "\n".join(lines[15000:]) + "\n").encode()
    p = tmp_path / f"train{ext}"
    p.write_bytes(data)
    offset = data.index(b"\xff")
    line = data.count(b"\n", 0, offset) + 1
    with pytest.raises(DataError) as e:
        load_split(cfg_for(path=str(tmp_path)), "train")
    assert f"not valid UTF-8 (line {line}, byte offset {offset})" in assert_one_line_naming(e, p)


# --- a dev split carved from train (data.dev_fraction) --------------------------------------------


def _unbalanced_train() -> Split:
    """200 rows with unique texts, 4 classes of 100, 60, 30 and 10 rows, interleaved."""
    labels = np.array([0] * 100 + [1] * 60 + [2] * 30 + [3] * 10, dtype=np.int64)
    labels = labels[np.random.default_rng(123).permutation(len(labels))]
    return Split("toy", "train", tuple(f"text {i}" for i in range(len(labels))), labels, "<memory>")


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_carve_dev_is_a_stratified_disjoint_partition_in_file_order(fraction):
    train = _unbalanced_train()
    rest, dev = carve_dev(train, fraction, seed=0)
    assert (rest.name, dev.name) == ("train", "dev") and rest.dataset == dev.dataset == "toy"
    # a partition of the training rows: disjoint, nothing lost, each part in file order
    assert not set(rest.texts) & set(dev.texts)
    assert sorted(rest.texts + dev.texts) == sorted(train.texts)
    index = {t: i for i, t in enumerate(train.texts)}
    for part in (rest, dev):
        rows = [index[t] for t in part.texts]
        assert rows == sorted(rows)
        assert part.labels.tolist() == train.labels[rows].tolist()
    # stratified: round(fraction * class size) of every class, at least one in dev and one left
    for label, size in zip(range(4), (100, 60, 30, 10)):
        want = min(size - 1, max(1, round(fraction * size)))
        assert int((dev.labels == label).sum()) == want
        assert int((rest.labels == label).sum()) == size - want
    assert len(dev) == sum(min(n - 1, max(1, round(fraction * n))) for n in (100, 60, 30, 10))
    assert rest.carved == dev.carved == {"dev_fraction": fraction, "seed": 0, "from": "train"}


def test_carve_dev_keeps_a_row_of_each_class_on_both_sides():
    """A class of two rows with a tiny fraction: one row goes to dev, one stays."""
    train = Split("toy", "train", ("a", "b", "c", "d", "e"), np.array([0, 0, 0, 1, 1]), "<memory>")
    rest, dev = carve_dev(train, 0.01, seed=3)
    assert sorted(dev.labels.tolist()) == [0, 1] and sorted(rest.labels.tolist()) == [0, 0, 1]


def test_carve_dev_is_deterministic_for_a_seed_and_changes_with_it():
    train = _unbalanced_train()
    first = carve_dev(train, 0.2, seed=7)
    again = carve_dev(train, 0.2, seed=7)
    assert first[1].texts == again[1].texts and first[0].texts == again[0].texts
    assert first[1].fingerprint == again[1].fingerprint
    other = carve_dev(train, 0.2, seed=8)
    assert other[1].texts != first[1].texts and other[1].fingerprint != first[1].fingerprint
    assert len(other[1]) == len(first[1])  # same per-class sizes, other rows
    assert other[1].carved["seed"] == 8


def test_load_splits_carves_dev_with_the_experiment_seed():
    """The shipped TREC (no dev file): train 5,452 -> 10% of each of its six classes as dev, the test split untouched."""
    cfg = cfg_for(path=str(PROJECT_ROOT / "data" / "trec"), splits=("train", "test"), dev_fraction=0.1)
    whole = load_split(cfg_for(path=str(PROJECT_ROOT / "data" / "trec")), "train")
    splits = load_splits(cfg, seed=0)
    assert list(splits) == ["train", "test", "dev"]
    assert len(splits["train"]) + len(splits["dev"]) == len(whole) == 5452 and len(splits["test"]) == 500
    counts = np.bincount(whole.labels)
    assert len(counts) == 6
    assert np.bincount(splits["dev"].labels, minlength=6).tolist() == [round(0.1 * n) for n in counts]
    assert splits["test"].carved is None and splits["test"].fingerprint == load_split(cfg, "test").fingerprint
    assert load_splits(cfg, seed=0)["dev"].fingerprint == splits["dev"].fingerprint
    assert load_splits(cfg, seed=1)["dev"].fingerprint != splits["dev"].fingerprint


def test_dev_fraction_and_seed_enter_the_features_key():
    """The carved splits' features keys record the cut: another fraction or seed is another key, and a
    carved train split never shares a key with the whole one."""
    from pipeline.config import ExtractConfig, ModelConfig
    from pipeline.models import resolve
    from stages.entries import FeatureRequest

    model = ModelConfig(name="bert", source="tiny-random-bert")
    spec = resolve(model.source)

    def key(split: Split) -> str:
        return FeatureRequest(split, model, spec, ExtractConfig()).key

    train = _unbalanced_train()
    keys = {}
    for fraction, seed in ((0.1, 0), (0.2, 0), (0.1, 1)):
        rest, dev = carve_dev(train, fraction, seed)
        assert FeatureRequest(dev, model, spec, ExtractConfig()).key_material()["carved"] == {
            "dev_fraction": fraction,
            "seed": seed,
            "from": "train",
        }
        keys[(fraction, seed)] = (key(rest), key(dev))
    keys["whole"] = (key(train),)
    flat = [k for ks in keys.values() for k in ks]
    assert len(set(flat)) == len(flat) == 7
    # the record itself is in the key: the same rows with another recorded fraction are another entry
    rest, dev = carve_dev(train, 0.1, 0)
    relabelled = dataclasses.replace(dev, carved={**dev.carved, "dev_fraction": 0.11})
    assert relabelled.fingerprint == dev.fingerprint and key(relabelled) != key(dev)
