"""The notebook API: features and trained heads from a store in one call each.

    >>> from pipeline import load_features, load_head
    >>> X, y = load_features("featurestore", dataset="sst2", split="train", model="bert", layer=4)

Everything is read from the store (verified first); no config file or data file is needed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from pipeline.config import BLOCK_POOLINGS
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def _store(store):
    from pipeline.version import code_version
    from store import Store

    return store if isinstance(store, Store) else Store(os.fspath(store), code_version=code_version())


def _feature_entry(st, dataset, split, model, key):
    from store.store import display_name, lookup

    match = {k: v for k, v in (("dataset.name", dataset), ("dataset.split", split), ("model.name", model)) if v is not None}
    if key is not None:
        entry = st.open(key, verify=True)
        if entry.description.get("kind") != "features":
            raise PipelineError(f"entry {entry.key[:12]} is a {entry.description.get('kind')} entry, not features")
        for dotted, wanted in match.items():
            have = lookup(entry.description, dotted)
            if have != wanted:
                found = f"{dotted}={have!r}" if isinstance(have, str) else f"no {dotted}"
                raise PipelineError(f"entry {entry.key[:12]} has {found}, not {wanted!r}; drop the name or the key")
        return entry
    found = st.find(kind="features", **match)
    if not found:
        wanted = ", ".join(f"{k.split('.')[0] if k != 'dataset.split' else 'split'}={v!r}" for k, v in match.items())
        raise PipelineError(f"no features with {wanted or 'any name'} in {st.url}; `store ls --kind features` lists them")
    if len(found) > 1:
        listed = ", ".join(f"{e.key[:12]} ({display_name(e.description)})" for e in found)
        raise PipelineError(f"{len(found)} feature entries match in {st.url}: {listed}; narrow dataset/split/model or pass key=")
    return st.open(found[0].key, verify=True)


def load_features(
    store,
    *,
    dataset: str | None = None,
    split: str | None = None,
    model: str | None = None,
    layer: int = -1,
    pooling: str = "mean",
    key: str | None = None,
    as_frame: bool = False,
    lazy: bool = False,
):
    """``(X, y)`` of one cached feature entry: pooled hidden states at ``layer`` and the labels.

    Parameters
    ----------
    store : str, path or Store
        The store path or fsspec URL.
    dataset, split, model : str, optional
        Names as ``store ls`` shows them (``sst2/train/bert``); together they must pick one entry.
    layer : int, default -1
        Hidden-state index (0 = embeddings, i = output of block i); negative counts from the top.
    pooling : {'mean', 'first', 'last', 'pooler'}, default 'mean'
        ``pooler`` is the model's trained pooler output (what the LLMEmbed head reads as
        ``model:pooler``), stored as one layer: ``layer`` must be 0 or -1.
    key : str, optional
        An entry key or unique prefix instead of the names.
    as_frame : bool, default False
        X as a pandas DataFrame (columns ``h0..h{d-1}``) and y as a Series named ``label``.
    lazy : bool, default False
        X as a Dask array (one chunk per shard), read only when computed.

    Returns
    -------
    X : ndarray (n_rows, hidden_size), float32; a DataFrame or Dask array as asked
    y : ndarray (n_rows,); class names when the data had names, else integers

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> X, y = load_features("featurestore", dataset="sst2", split="train", model="bert", layer=4)
    >>> clf = LogisticRegression(max_iter=1000).fit(X, y)
    """
    if pooling not in BLOCK_POOLINGS:
        raise ValueError(f"pooling={pooling!r}: expected one of {list(BLOCK_POOLINGS)}")
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
        raise ValueError(f"layer={layer!r}: expected an int (0 = embeddings, negative counts from the top)")
    if as_frame and lazy:
        raise ValueError("as_frame=True and lazy=True: choose one (a Dask array, or a pandas frame in memory)")
    entry = _feature_entry(_store(store), dataset, split, model, key)
    n_layers = 0 if pooling == "pooler" else int(entry.description["n_layers"])
    index = layer if layer >= 0 else n_layers + 1 + layer
    if not 0 <= index <= n_layers:
        what = "(the pooler output is one layer)" if pooling == "pooler" else f"for {entry.description.get('name')}"
        raise ValueError(f"layer={layer}: expected 0..{n_layers} (or -1..-{n_layers + 1}) {what}")
    if f"hidden/{pooling}" not in entry.datasets():
        if pooling == "pooler":
            raise PipelineError(f"entry {entry.key[:12]} has no pooler output (random weights, or no trained pooler in the checkpoint)")
        raise PipelineError(f"pooling {pooling!r} was not extracted for entry {entry.key[:12]}; add it to extract.poolings")
    X = entry.array(f"hidden/{pooling}")[:, index, :].astype(np.float32)
    labels = entry.table()["label"].to_numpy()
    names = entry.description.get("dataset", {}).get("label_names")
    y = np.asarray(names, dtype=object)[labels] if names is not None else labels
    if lazy:
        return X, y
    X = X.compute()
    if as_frame:
        import pandas as pd

        return pd.DataFrame(X, columns=[f"h{i}" for i in range(X.shape[1])]), pd.Series(y, name="label")
    return X, y


class LabelledHead:
    """A fitted head whose ``predict`` returns class names; ``predict_proba`` columns follow ``classes_``.

    ``name`` is the head's name in its heads entry and ``blocks`` the features it reads, as
    ``model:layer:pooling``: a probe reads one block, a fused head a dict with these keys.
    """

    def __init__(self, head: Any, classes: list, name: str = "", blocks: list[str] | None = None):
        self.head = head
        self.classes_ = np.asarray(classes)
        self.name = name
        self.blocks = list(blocks or [])

    def predict_proba(self, X) -> np.ndarray:
        return self.head.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __repr__(self) -> str:
        return f"LabelledHead({self.name!r}, blocks={self.blocks}, classes={self.classes_.tolist()})"


def load_head(store, name: str | None = None, *, key: str | None = None):
    """The fitted head ``name`` (``fusion``, ``selected:bert:mean``, ``probe:bert:3:mean``, ...) of a heads entry.

    ``key`` (a heads entry key or prefix) picks the entry; without it the newest heads entry in the
    store is used. Without ``name``, the head with the best dev accuracy. The result has the
    scikit-learn ``predict``/``predict_proba``: a probe takes the features ``load_features`` returns
    for its model, layer and pooling; ``fusion``/``concat`` take a dict ``{"model:layer:pooling": X}``.
    With string labels, ``predict`` returns the class names.
    """
    from stages.predict import _head_blocks, class_names, default_head, find_heads, label_names

    st = _store(store)
    if key is not None:
        key = st.resolve(key)  # a bad key fails with the store's message, not as a CLI head name
    else:
        heads = sorted((i for i in st.list() if i.complete and i.kind == "heads"), key=lambda i: -(i.created or 0))
        if not heads:
            raise PipelineError(f"no heads entry in {st.url}; run `make train` first")
        if len({i.name for i in heads}) > 1:
            log.info("several experiments have heads in %s; using the newest (%s); pass key= to choose", st.url, heads[0].name)
        key = heads[0].key
    entry, chosen = find_heads(st, key if name is None else f"{key}:{name}")
    name = chosen or default_head(entry)
    head, blocks = _head_blocks(name, entry)
    return LabelledHead(head, class_names(head, label_names(entry)), name, [str(b) for b in blocks])
