"""Score's reads: one hashed scan per shard, then the projections of variability's second pass.

Pass 1 is one Dask task per shard (``scan_task``): it opens the shard file once and reads it
front to back (``store.scan``), hashing every byte and computing, from the same bytes, the per-class
moments of every hidden pooling, the fired-sentence counts of the FFN statistic and the token fire
counts; a shard whose bytes differ from the manifest fails the task. Pass 2 (``project_task``)
needs the class means of the whole split, so it reads the hidden poolings again, one task per row
chunk for all poolings at once, by positional reads through the handle the scan kept open.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.models.families import RULE_TEXT
from stages.score.sparsity import _count_block_multi
from stages.score.variability import _moments_block, _projection_block
from store.scan import PIECE_BYTES, KeptHandles, Region, read_rows, scan_shard

FIRE_COUNT = "ffn/fire_count"
NORM_RATIO = "stats/norm_ratio"


def _attrs(ds) -> dict[str, Any]:
    out = {}
    for k, v in ds.attrs.items():
        out[k] = v.item() if isinstance(v, np.generic) else v.decode() if isinstance(v, bytes) else v
    return out


def scan_task(
    src: dict, yidx: np.ndarray, kw: np.ndarray, n_classes: int, poolings: tuple[str, ...], model: str, keep: KeptHandles | None
) -> dict:
    """Pass 1 over one shard (see the module docstring); returns a partial result for ``merge``."""
    out: dict[str, Any] = {}

    def setup(f):
        if FIRE_COUNT not in f:
            raise PipelineError(f"{src['path']} has no dataset {FIRE_COUNT!r}; re-run extract to rebuild the entry")
        attrs = _attrs(f[FIRE_COUNT])
        thresholds = tuple(float(t) for t in np.atleast_1d(attrs.get("thresholds", [attrs.get("threshold", 0.0)])))
        rule = str(attrs.get("rule", "gt"))
        stat = "ffn/absmax" if rule == "abs_gt" else "ffn/max"
        if stat not in f:
            raise PipelineError(
                f"{model}: sparsity needs {stat} (per-sentence max for the rule {RULE_TEXT.get(rule, rule)}); "
                "add 'max' to extract.ffn_poolings and re-extract"
            )
        fc = np.asarray(f[FIRE_COUNT][()], dtype=np.int64)
        out["token_fires"] = fc[None] if fc.ndim == 2 else fc
        out["setup"] = [(thresholds, rule, stat)]
        out["n_tokens"] = [int(attrs.get("n_tokens", 0))]
        out["norm_ratio"] = [np.asarray(f[NORM_RATIO][()], dtype=np.float64) if NORM_RATIO in f else None]
        consumers = {}
        for p in poolings:
            name = f"hidden/{p}"
            if name not in f:
                raise PipelineError(f"{src['path']} has no dataset {name!r}; re-run extract to rebuild the entry")
            out[name] = np.zeros((n_classes + 1, *f[name].shape[1:]))
            consumers[name] = _accumulate(out, name, lambda x, yb: _moments_block(x, yb, n_classes)[0], yidx)
        out[stat] = np.zeros((len(thresholds), n_classes + 1, *f[stat].shape[1:]), dtype=np.int64)
        consumers[stat] = _accumulate(out, stat, lambda x, yb, kwb: _count_block_multi(x, yb, kwb, n_classes, thresholds)[0], yidx, kw)
        for name in consumers:
            if f[name].shape[0] != src["n_rows"]:
                raise PipelineError(
                    f"{src['path']}: dataset {name} has {f[name].shape[0]} rows, the manifest says {src['n_rows']}; re-run extract"
                )
        return consumers, None

    _, regions = scan_shard(src["url"], src["storage_options"], src["path"], sha256=src["sha256"], size=src["size"], setup=setup, keep=keep)
    out["regions"] = [regions]
    stat = out["setup"][0][2]
    out["sentence_fires"] = out.pop(stat)
    out["moments"] = {p: out.pop(f"hidden/{p}") for p in poolings}
    return out


def _accumulate(out: dict, name: str, kernel, *row_args: np.ndarray):
    def consume(lo: int, hi: int, rows: np.ndarray) -> None:
        out[name] += kernel(rows, *(a[lo:hi] for a in row_args))

    return consume


def merge(*parts: dict) -> dict:
    """Sum arrays (and dicts of arrays), concatenate lists in shard order."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if k not in out:
                out[k] = {kk: vv.copy() for kk, vv in v.items()} if isinstance(v, dict) else list(v) if isinstance(v, list) else v.copy()
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    out[k][kk] += vv
            elif isinstance(v, list):
                out[k].extend(v)
            else:
                out[k] += v
    return out


def project_task(
    src: dict, regions: dict[str, Region], lo: int, hi: int, yb: np.ndarray, means: dict, keep: KeptHandles | None
) -> dict[str, np.ndarray]:
    """Pass 2 over rows [lo, hi) of one shard, every pooling in one task: per-class sums of squared
    projections of the centred rows, name -> (K, n_layers, K-1)."""
    out = {}
    for p, (mu, basis) in means.items():
        region = regions[f"hidden/{p}"]
        step = max(1, PIECE_BYTES // max(region.row_bytes, 1))  # rows in pieces: memory bounded whatever the chunk
        acc = None
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            x = read_rows(src["url"], src["storage_options"], src["path"], region, a, b, keep=keep)
            part = _projection_block(x, yb[a - lo : b - lo], mu, basis)[0]
            del x
            if acc is None:
                acc = part
            else:
                acc += part
        out[p] = acc
    return out


def add(*parts: dict) -> dict:
    out = {k: v.copy() for k, v in parts[0].items()}
    for part in parts[1:]:
        for k, v in part.items():
            out[k] += v
    return out
