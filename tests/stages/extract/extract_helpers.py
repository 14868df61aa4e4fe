"""Shared helpers for the extract-stage tests: a toy split, one config factory, cached tiny models.

Everything runs on the CPU in float32 with the tiny random models of each family
(``tiny-random-<family>``: 2 layers, hidden 32, FFN 64), so the whole module stays fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from pipeline.config import ExtractConfig, ModelConfig
from pipeline.data import Split
from pipeline.models import resolve
from stages.entries import FeatureRequest
from stages.extract.runner import LoadedModel, load_for_extract

FAMILIES = ("llama", "bert", "roberta", "mpnet", "t5")

# Very different lengths (2..46 tokens); the 4th is longer than MAX_LENGTH and gets truncated;
# many words are outside the tiny 1000-word vocabulary (unknown tokens are fine).
TEXTS = (
    "good",
    "a gripping , funny and ultimately moving film .",
    "bad !",
    "the story is thin , the acting is wooden , the jokes fall flat , and by the end the whole thing feels like a long , "
    "dull , tired exercise in style over substance that never finds its heart or its voice .",
    "it 's a charming little movie .",
    "what is the capital of france ?",
    "not worth the time .",
    "an often funny , sometimes touching and always intelligent comedy about love and family .",
    "who wrote hamlet ?",
    "zyxwvut qqqq",
    "the performances are strong but the script lets them down in the second half .",
    "yes",
)
LABELS = np.array([1, 1, 0, 0, 1, 2, 0, 1, 2, 0, 1, 1], dtype=np.int64)
LONG_ROW = 3

# 12 rows in shards of 5 -> 3 shards (5, 5, 2); a budget of 48 padded tokens with at most 4 rows
# gives several batches per shard, most of them with rows of different lengths.
BASE = dict(max_length=24, shard_rows=5, token_budget=48, max_batch_size=4, device="cpu", compute_dtype="float32")


def _cfg(**overrides) -> ExtractConfig:
    """The test ExtractConfig: BASE with overrides."""
    return ExtractConfig(**{**BASE, **overrides})


def make_split(texts=TEXTS, labels=None, name: str = "train", dataset: str = "toy") -> Split:
    labels = LABELS[: len(texts)] if labels is None else np.asarray(labels, dtype=np.int64)
    return Split(dataset, name, tuple(texts), labels, "<memory>")


def make_request(
    family: str = "bert",
    *,
    split: Split | None = None,
    thresholds: tuple[float, ...] = (0.0,),
    spec=None,
    name: str | None = None,
    sink: str = "auto",
    **overrides,
) -> FeatureRequest:
    model = ModelConfig(name=name or family, source=f"tiny-random-{family}", thresholds=tuple(thresholds), sink=sink)
    return FeatureRequest(split or make_split(), model, spec or resolve(model.source), _cfg(**overrides))


_LOADED: dict[str, LoadedModel] = {}


def loaded_model(family: str) -> LoadedModel:
    """The tiny model of ``family`` through the real loader, built once per session (no hooks left on it)."""
    if family not in _LOADED:
        req = make_request(family)
        _LOADED[family] = load_for_extract(req.model, req.spec, req.extract)()
    return _LOADED[family]


class CountingLoader:
    """A ``load_model`` callable for ``extract_entry`` that counts its calls."""

    def __init__(self, family: str = "bert", load=None):
        self.family = family
        self.calls = 0
        self._load = load

    def __call__(self) -> LoadedModel:
        self.calls += 1
        return self._load() if self._load is not None else loaded_model(self.family)


def entry_files(store_root: Path, key: str) -> dict[str, str]:
    """sha256 of every file of an entry directory except the manifest (which holds a timestamp)."""
    folder = Path(store_root) / "entries" / key
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"
    }


def replace_cfg(request: FeatureRequest, **overrides) -> FeatureRequest:
    return dataclasses.replace(request, extract=dataclasses.replace(request.extract, **overrides))
