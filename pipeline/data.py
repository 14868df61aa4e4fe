"""Labelled text splits: reading, validation and the data fingerprint that enters store keys."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DATA_FORMATS, DataConfig
from pipeline.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """One split's texts and integer labels, in file order; with string labels in the files,
    `label_names` holds the sorted class names and `labels` the index of each row's name."""

    dataset: str
    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    path: str
    label_names: tuple[str, ...] | None = None
    carved: dict | None = None  # {"dev_fraction", "seed", "from"} for splits cut out of the training split

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def fingerprint(self) -> str:
        """sha256 of the texts and labels in order: the data's part of every store key."""
        return data_fingerprint(self.texts, self.labels, self.label_names)


def data_fingerprint(texts, labels, label_names: tuple[str, ...] | None = None) -> str:
    """Integer labels hash as before; class names, when there are any, are hashed too (a renamed class
    changes the data)."""
    h = hashlib.sha256()
    if label_names is not None:
        h.update(json.dumps(["label_names", list(label_names)]).encode("utf-8"))
    for t, y in zip(texts, labels, strict=True):
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        h.update(int(y).to_bytes(8, "little", signed=True))
    return h.hexdigest()


def split_path(cfg: DataConfig, split: str) -> Path:
    """The file of a split: explicit `files` first, else <path>/<split>.<ext>."""
    if split in cfg.files:
        return Path(cfg.files[split])
    if not cfg.path:
        raise DataError(f"data.files has no entry for split {split!r} and data.path is empty")
    folder = Path(cfg.path)
    found = [folder / f"{split}{ext}" for ext in DATA_FORMATS if (folder / f"{split}{ext}").is_file()]
    if not found:
        raise DataError(f"no file for split {split!r} in {folder} (looked for {split}{{{','.join(DATA_FORMATS)}}})")
    if len(found) > 1:
        raise DataError(f"several files for split {split!r} in {folder}: {[p.name for p in found]}; keep one or use data.files")
    return found[0]


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    ext = path.suffix.lower()
    if ext not in DATA_FORMATS:
        raise DataError(f"{path}: unsupported format {ext!r}; use one of {list(DATA_FORMATS)}")
    try:
        if ext == ".parquet":
            return pd.read_parquet(path)
        if ext == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        sep = "\t" if ext == ".tsv" else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quoting=3 if ext == ".tsv" else 0, encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8 ({_first_bad_utf8(path)})") from None
    except (ValueError, pd.errors.ParserError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot parse: {first}") from None


_INT = re.compile(r"-?[0-9]+")


def _is_int_label(v) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, np.integer)) or isinstance(v, str) and bool(_INT.fullmatch(v.strip()))


def _string_labels(path: Path, column: pd.Series) -> list[str] | None:
    """The labels as class names when every one is a non-empty string that is not an integer, else None
    (then the integer rules apply, so a stray 'pos' among integers stays an error, not a new class)."""
    values = column.tolist()
    if values and all(isinstance(v, str) and v.strip() and not _INT.fullmatch(v.strip()) for v in values):
        return [v.strip() for v in values]
    return None


def train_label_names(cfg: DataConfig) -> tuple[str, ...] | None:
    """The sorted class names of the training split, or None when its labels are integers."""
    path = split_path(cfg, cfg.splits[0])
    df = _read_frame(path)
    if cfg.label_column not in df.columns:
        return None  # load_split reports the missing column
    if cfg.limit:
        df = df.iloc[: cfg.limit]
    names = _string_labels(path, df[cfg.label_column])
    return None if names is None else tuple(sorted(set(names)))


def _first_bad_utf8(path: Path) -> str:
    """'line N, byte offset B' of the first invalid byte in the file (the reader's own offset counts
    from its current buffer, not from the start of the file)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"line {line}, byte offset {e.start}"
    return "the file decodes now; it may have changed while being read"


def _labels(path: Path, column: pd.Series) -> np.ndarray:
    out = np.empty(len(column), dtype=np.int64)
    for i, v in enumerate(column.tolist()):
        if isinstance(v, bool) or v is None:
            raise DataError(f"{path}: row {i + 1}: label {v!r} is not an integer")
        if isinstance(v, str):
            s = v.strip()
            if not re.fullmatch(r"-?[0-9]+", s):  # not isdigit(): "--1" and "²" pass it, then int() fails
                raise DataError(f"{path}: row {i + 1}: label {v!r} is not an integer")
            out[i] = int(s)
        elif isinstance(v, (int, np.integer)):
            out[i] = int(v)
        elif isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
            raise DataError(f"{path}: row {i + 1}: label {v!r} is a float; labels must be integers")
        else:
            raise DataError(f"{path}: row {i + 1}: label {v!r} is not an integer")
    return out


_FROM_TRAIN = object()


def load_split(cfg: DataConfig, split: str, label_names=_FROM_TRAIN) -> Split:
    """Read and check one split; every problem is a one-line DataError naming the file.

    String labels become indices into the training split's sorted class names (`label_names`,
    read from the training file unless given), so every split numbers the classes alike.
    """
    if label_names is _FROM_TRAIN:
        label_names = train_label_names(cfg)
    path = split_path(cfg, split)
    df = _read_frame(path)
    if len(df) == 0:
        raise DataError(f"{path}: no rows")
    for col, role in ((cfg.text_column, "text"), (cfg.label_column, "label")):
        if col not in df.columns:
            raise DataError(f"{path}: missing {role} column {col!r}; columns are {list(df.columns)} (set data.{role}_column)")
    if cfg.limit:
        df = df.iloc[: cfg.limit]
    texts = []
    for i, t in enumerate(df[cfg.text_column].tolist()):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{path}: row {i + 1}: empty or missing text")
        texts.append(t)
    if label_names is None:
        labels = _labels(path, df[cfg.label_column])
    else:
        names = [v.strip() if isinstance(v, str) else v for v in df[cfg.label_column].tolist()]
        index = {n: i for i, n in enumerate(label_names)}
        unknown = sorted({repr(n) for n in names if n not in index})
        if unknown:
            raise DataError(
                f"{path}: labels {', '.join(unknown)} do not occur in the training split {cfg.splits[0]!r} (classes: {list(label_names)})"
            )
        labels = np.array([index[n] for n in names], dtype=np.int64)
    _warn_duplicates(path, texts, labels)
    return Split(cfg.name, split, tuple(texts), labels, str(path), label_names)


def _warn_duplicates(path: Path, texts: list[str], labels: np.ndarray) -> None:
    """Duplicated rows are warnings, not errors: SST-2 train itself repeats 9 (text, label) rows and TREC 71.

    A text with two different labels is label noise the user should see, but it is not an error either:
    every statistic and probe stays well defined, and noisy corpora are legitimate inputs.
    """
    frame = pd.DataFrame({"text": texts, "label": labels})
    exact = int(frame.duplicated().sum())
    if exact:
        log.info("%s: %d duplicate (text, label) row(s) kept as they are", path, exact)
    n_labels = frame.drop_duplicates().groupby("text", sort=False)["label"].nunique()
    conflicting = n_labels[n_labels > 1]
    if len(conflicting):
        log.warning(
            "%s: %d text(s) occur with different labels, e.g. %r; kept as they are (label noise)",
            path,
            len(conflicting),
            conflicting.index[0][:60],
        )


def carve_dev(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split ``train`` into (rest, dev): ``fraction`` of each class, drawn with ``seed``, both in file order.

    Stratified so every class is in dev (TREC has a class with under 100 examples); at least one
    row per class goes to dev and at least one stays. Both splits record how they were cut, and
    that record enters their store keys.
    """
    rng = np.random.default_rng(seed)
    dev_mask = np.zeros(len(train), dtype=bool)
    for label in np.unique(train.labels):
        rows = np.flatnonzero(train.labels == label)
        k = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        dev_mask[rng.permutation(rows)[:k]] = True
    carved = {"dev_fraction": float(fraction), "seed": int(seed), "from": train.name}

    def part(name: str, keep: np.ndarray) -> Split:
        idx = np.flatnonzero(keep)
        return Split(
            train.dataset,
            name,
            tuple(train.texts[i] for i in idx),
            train.labels[idx],
            train.path,
            label_names=train.label_names,
            carved=carved,
        )

    return part(train.name, ~dev_mask), part("dev", dev_mask)


def load_splits(cfg: DataConfig, seed: int = 0) -> dict[str, Split]:
    """All configured splits, with labels checked for consistency against the training split.

    With ``cfg.dev_fraction``, a ``dev`` split is carved out of the training split with ``seed``.
    """
    names = train_label_names(cfg)
    splits = {s: load_split(cfg, s, names) for s in cfg.splits}
    if cfg.dev_fraction:
        splits[cfg.splits[0]], splits["dev"] = carve_dev(splits[cfg.splits[0]], cfg.dev_fraction, seed)
    train = splits[cfg.splits[0]]
    classes = np.unique(train.labels)
    if len(classes) < 2:
        raise DataError(f"{train.path}: training split {train.name!r} has a single class ({classes.tolist()}); need at least 2")
    for s in splits.values():
        extra = sorted(set(np.unique(s.labels).tolist()) - set(classes.tolist()))
        if extra:
            raise DataError(f"{s.path}: labels {extra} do not occur in the training split {train.name!r}")
    return splits
