"""FFN activation sparsity per layer and per neuron, computed out of core.

Firing rules: for ReLU and GELU FFNs a neuron fires on a token when its
activation a > t (exact "non-zero" for ReLU at t = 0); for gated FFNs
(SwiGLU/GeGLU, act(gate) * up) when |a| > t, since the sign of the product
carries no information. Extract counts every threshold of a short list in
one pass. A sentence fires a neuron when the neuron fires on at least one
of its real tokens, i.e. when the stored per-sentence statistic (max of a,
or max of |a| for the magnitude rule) is > t. That stored value (float16
typically) is compared in float64, so a sentence whose max sits within
float16 rounding of the threshold may disagree with extract's token
counts, which were taken in the model's compute dtype.

Per-neuron class selectivity, with r_k the share of class-k sentences that
fire the neuron, m = max_k r_k and o = mean of the other K-1 rates::

    selectivity = (m - o) / (m + o)     in [0, 1]; 0 where m == 0

1 means only one class fires it; 0 means all classes fire it equally (or
it never fires). NaN when there is a single class.

Keyword score (the "KT-score" of Li et al., 2022): of the sentences that
fire a neuron, the share that contain a keyword; NaN where none fires it.
It only means something against the base rate p0 (the share of all
sentences that contain a keyword): lift = score / p0, and the one-sided
hypergeometric p-value P(X >= k) for X the keyword sentences among n
sentences drawn without replacement from the N of the split, K of which
contain a keyword, where n sentences fire the neuron and k of them contain
a keyword. Ranking by that p-value keeps a neuron seen on a handful of
sentences from topping the table by luck.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import dask
import dask.array as da
import numpy as np

from stages.score.variability import chunk_sum

if TYPE_CHECKING:  # pandas builds the result tables on the client only: Dask workers that
    import pandas as pd  # run the counting tasks stay small without it

# bytes of the boolean working block of _count_block (cache-sized, reused)
BLOCK_BYTES = 2**20


def sparsity_stats(
    fire_count, n_tokens, ffn_stat, labels, has_keyword, thresholds, *, rule: str = "gt", scheduler=None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-layer and per-neuron firing statistics in one pass over ``ffn_stat``.

    Parameters
    ----------
    fire_count : dask or numpy array, (n_shards, n_thresholds, n_layers, ffn), int
        Per-shard counts of real tokens that fire at each threshold; a
        (n_shards, n_layers, ffn) array is one threshold.
    n_tokens : array-like, (n_shards,)
        Real tokens per shard.
    ffn_stat : dask or numpy array, (n_rows, n_layers, ffn)
        Per-sentence max over real tokens of the activation (rule "gt") or of
        its magnitude (rule "abs_gt").
    labels, has_keyword : array-like, (n_rows,)
        Class label and keyword flag of each sentence, in row order.
    thresholds : float or sequence of float
        The firing thresholds extract used for ``fire_count``, in its order.
    rule : str
        "gt" (a > t) or "abs_gt" (|a| > t); reported in the layer table.
    scheduler : optional
        Forwarded to ``dask.compute``.

    Returns
    -------
    layers : DataFrame
        threshold, rule, layer, n_neurons, token_fire_fraction,
        dead_fraction, sentence_fire_fraction.
    neurons : DataFrame
        threshold, layer, neuron, token_fire_rate, sentence_fire_rate,
        n_fire_sentences, n_keyword_fire_sentences, keyword_score,
        keyword_base_rate, keyword_lift, keyword_p_value, selectivity,
        top_class.
    """
    plan = SparsityPlan(fire_count, n_tokens, ffn_stat, labels, has_keyword, thresholds, rule=rule)
    (values,) = dask.compute(plan.lazy(), scheduler=scheduler)
    return plan.finish(values)


class SparsityPlan:
    """``sparsity_stats`` as a lazy graph plus a finishing step, so a caller
    can compute it in the same ``dask.compute`` as other passes over the
    same shards::

        plan = SparsityPlan(fire_count, n_tokens, ffn_max, labels, kw, [t])
        values, other = dask.compute(plan.lazy(), other_lazy)
        layers, neurons = plan.finish(values)
    """

    def __init__(self, fire_count, n_tokens, ffn_stat, labels, has_keyword, thresholds, *, rule: str = "gt"):
        self.thresholds = tuple(float(t) for t in np.atleast_1d(thresholds))
        fire_count = _as_dask(fire_count)
        if fire_count.ndim == 3:  # one threshold, stored without its axis
            fire_count = fire_count[:, None]
        self.fire_count, self.ffn_max = fire_count, _as_dask(ffn_stat)
        self.rule = rule
        self.n_tokens = np.asarray(n_tokens, dtype=np.int64)
        self.classes = np.unique(np.asarray(labels))
        self.yidx, self.class_sizes = _label_index(labels, self.ffn_max.shape[0])
        self.kw = np.asarray(has_keyword, dtype=bool)
        _check_shapes(self.fire_count, self.n_tokens, self.ffn_max, self.kw, len(self.thresholds))

    def lazy(self) -> tuple:
        """(token fires (T, L, F), sentence fires (T, K+1, L, F)), both int64, lazy."""
        return (
            chunk_sum(self.fire_count, _shard_sum, out_axes={1: 0, 2: 1, 3: 2}, name="sparsity-token-fires"),
            chunk_sum(
                self.ffn_max,
                _count_block_multi,
                row_args=(self.yidx, self.kw),
                kwargs={"n_classes": self.class_sizes.size, "thresholds": self.thresholds},
                out_axes={1: 2, 2: 3},
                name="sparsity-sentence-fires",
            ),
        )

    def finish(self, values) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(layers, neurons) tables from the computed ``lazy()`` values, one block per threshold."""
        token_fires, sentence_fires = values
        return sparsity_tables(
            token_fires, sentence_fires, self.thresholds, self.rule, self.n_tokens, self.class_sizes, self.kw, self.classes
        )


def sparsity_tables(
    token_fires, sentence_fires, thresholds, rule: str, n_tokens, class_sizes, kw, classes
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layers, neurons) tables from token fires (T, L, F) and sentence fires (T, K+1, L, F), one block per threshold."""
    import pandas as pd

    token_fires, sentence_fires = np.asarray(token_fires), np.asarray(sentence_fires)
    n_tok = int(np.asarray(n_tokens, dtype=np.int64).sum())
    n_rows = int(np.asarray(class_sizes).sum())
    layers, neurons = [], []
    for i, t in enumerate(thresholds):
        per_class, kw_fires = sentence_fires[i, :-1], sentence_fires[i, -1]
        nt = _neuron_table(token_fires[i], per_class, kw_fires, n_tok, class_sizes, kw, classes)
        nt.insert(0, "threshold", t)
        neurons.append(nt)
        lt = _layer_table(token_fires[i], per_class, n_tok, n_rows, t)
        lt.insert(0, "rule", rule)
        lt.insert(0, "threshold", lt.pop("threshold"))
        layers.append(lt)
    return pd.concat(layers, ignore_index=True), pd.concat(neurons, ignore_index=True)


def keyword_mask(texts: Sequence[str], keywords: Sequence[str]) -> np.ndarray:
    """Whether each text contains any keyword as a whole word or phrase.

    Matched on the lower-cased text; a multi-word keyword matches with any
    whitespace between its words; a word edge is anything but a letter,
    digit, underscore or hyphen, so "physics" does not match
    "astrophysics", "science" does not match "science-fiction" (a hyphen
    joins words), "computer's" matches "computer" and "c++" works.
    """
    pattern = _keyword_pattern(keywords)
    if pattern is None:
        return np.zeros(len(texts), dtype=bool)
    return np.array([pattern.search(t.lower()) is not None for t in texts], dtype=bool)


def top_keyword_neurons(neurons_df: pd.DataFrame, k: int, *, min_fire_sentences: int = 5) -> pd.DataFrame:
    """Top-``k`` neurons per (model, threshold, layer) by significance of their keyword score.

    Ranked by the one-sided hypergeometric p-value (smallest first), ties to
    the higher lift, then the lower neuron index. Neurons fired by fewer than
    ``min_fire_sentences`` sentences are left out. Every model gets its own
    ``k`` per layer: models never compete for one layer index's places.
    """
    eligible = neurons_df[(neurons_df["n_fire_sentences"] >= min_fire_sentences) & neurons_df["keyword_p_value"].notna()]
    groups = [c for c in ("model", "threshold", "layer") if c in eligible]
    ranked = eligible.sort_values(
        [*groups, "keyword_p_value", "keyword_lift", "neuron"], ascending=[True] * len(groups) + [True, False, True], kind="mergesort"
    )
    return ranked.groupby(groups, sort=True).head(k).reset_index(drop=True)


def _as_dask(a) -> da.Array:
    """Wrap numpy input so both kinds take the same path."""
    return a if isinstance(a, da.Array) else da.from_array(np.asarray(a))


def _label_index(labels, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels as 0..K-1 (sorted label order) and the class sizes."""
    labels = np.asarray(labels)
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},), got {labels.shape}")
    _, yidx = np.unique(labels, return_inverse=True)
    yidx = yidx.reshape(-1).astype(np.int64)
    return yidx, np.bincount(yidx)


def _check_shapes(fire_count, n_tokens, ffn_max, kw, n_thresholds: int) -> None:
    """Fail early on inputs that cannot belong to the same split."""
    if fire_count.ndim != 4 or ffn_max.ndim != 3:
        raise ValueError("fire_count must be 4-D (shards, thresholds, layers, ffn) and ffn_max 3-D")
    if fire_count.shape[1] != n_thresholds:
        raise ValueError(f"fire_count has {fire_count.shape[1]} thresholds, {n_thresholds} given")
    if fire_count.shape[2:] != ffn_max.shape[1:]:
        raise ValueError(f"fire_count {fire_count.shape} and ffn_max {ffn_max.shape} disagree on (n_layers, ffn)")
    if n_tokens.shape != (fire_count.shape[0],):
        raise ValueError("n_tokens must have one entry per shard")
    if kw.shape != (ffn_max.shape[0],):
        raise ValueError("has_keyword must have one entry per row")


def _shard_sum(block: np.ndarray) -> np.ndarray:
    """Per-shard firing counts summed over the shards of one chunk, (1, T, L, F)."""
    return block.sum(axis=0, keepdims=True, dtype=np.int64)


def _count_block(x: np.ndarray, yb: np.ndarray, kwb: np.ndarray, n_classes: int, threshold: float) -> np.ndarray:
    """Fired-sentence counts per class and for keyword sentences.

    ``value > threshold`` is decided exactly as in float64: for float16
    data with a threshold >= 0 by comparing bit patterns (see
    ``_fp16_fire_bounds``), otherwise in float64. Rows go in blocks of
    about ``BLOCK_BYTES`` booleans, so no temporary grows with the chunk.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1)
    out = np.zeros((1, n_classes + 1) + x.shape[1:], dtype=np.int64)
    acc = out.reshape(n_classes + 1, flat.shape[1])
    bounds = _fp16_fire_bounds(threshold) if x.dtype == np.float16 else None
    # at most 255 rows per block: per-block counts fit uint8, summed without casts
    step = max(1, min(n, 255, BLOCK_BYTES // max(flat.shape[1], 1)))
    fired = np.empty((step, flat.shape[1]), dtype=bool)
    spare = np.empty_like(fired)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        f, g = fired[: hi - lo], spare[: hi - lo]
        if bounds is None:
            np.greater(flat[lo:hi], np.float64(threshold), out=f)
        else:
            bits = flat[lo:hi].view(np.int16)
            np.greater(bits, bounds[0], out=f)
            np.less_equal(bits, bounds[1], out=g)
            f &= g
        rows = f.view(np.uint8)
        yk = yb[lo:hi]
        for k in np.flatnonzero(np.bincount(yk, minlength=n_classes)):
            acc[k] += np.add.reduce(rows[yk == k], axis=0, dtype=np.uint8)
        kwk = kwb[lo:hi]
        if kwk.any():
            acc[n_classes] += np.add.reduce(rows[kwk], axis=0, dtype=np.uint8)
    return out


def _count_block_multi(x: np.ndarray, yb: np.ndarray, kwb: np.ndarray, n_classes: int, thresholds: Sequence[float]) -> np.ndarray:
    """``_count_block`` for each threshold: (1, T, K+1, L, F)."""
    return np.stack([_count_block(x, yb, kwb, n_classes, t)[0] for t in thresholds])[None]


def _fp16_fire_bounds(threshold: float) -> tuple[int, int] | None:
    """(lo, hi) such that float16 ``x > threshold`` iff ``lo < bits <= hi``
    for the int16 view of x; None where that shortcut does not apply.

    For a threshold t >= 0 only positive values can fire, and positive
    float16 bit patterns order like their values: lo is the pattern of the
    largest float16 <= t, hi = 0x7C00 (+inf) keeps NaNs (0x7C01..0x7FFF)
    out. Negative values and -0 have the sign bit set, so int16 < 0 <= lo.
    """
    t = float(threshold)
    if not (t >= 0.0):  # negative or NaN: plain float64 comparison
        return None
    with np.errstate(over="ignore"):
        h = np.float16(t)  # nearest; inf above the float16 range
    if float(h) > t:
        h = np.nextafter(h, np.float16(-np.inf))
    return int(np.array(h, dtype=np.float16).view(np.int16)), 0x7C00


def keyword_p_values(k: np.ndarray, n: np.ndarray, n_keyword: int, n_total: int) -> np.ndarray:
    """One-sided hypergeometric P(X >= k): X keyword sentences among ``n`` drawn from ``n_total``, ``n_keyword`` of them
    with a keyword. NaN where n == 0."""
    k, n = np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64)
    # neurons share (k, n) pairs (dead ones, ones every sentence fires, ...): each distinct pair once
    pairs, inverse = np.unique(np.stack([k.ravel(), n.ravel()]), axis=1, return_inverse=True)
    p = hypergeom_sf(pairs[0], pairs[1], n_keyword, n_total)[inverse.reshape(-1)].reshape(k.shape)
    return np.where(n > 0, p, np.nan)


# probability terms per block of hypergeom_sf: (draw counts x window) float64 arrays of 16 MiB
_SF_BLOCK = 2**21


def hypergeom_sf(k: np.ndarray, n: np.ndarray, n_keyword: int, n_total: int) -> np.ndarray:
    """P(X >= k) for X hypergeometric (``n`` draws), summed exactly from the probability terms.

    The pairs that share a draw count ``n`` are answered from one reverse cumulative sum of the
    terms j = (smallest k) .. min(n, n_keyword), each term a sum of log factorials from one table.
    The neurons of a score share a few thousand draw counts, so this is one vectorised pass where
    ``scipy.stats.hypergeom.sf`` sums the terms again for every pair (10-40x slower on the default
    run). Relative error about 1e-11 (the rounding of log N!); underflows to 0 below 1e-308.
    """
    from scipy.special import gammaln

    shape = np.shape(k)
    k, n = np.asarray(k, dtype=np.int64).ravel(), np.asarray(n, dtype=np.int64).ravel()
    big_k, big_n = int(n_keyword), int(n_total)
    if not 0 <= big_k <= big_n or np.any((n < 0) | (n > big_n)):
        raise ValueError(f"hypergeom_sf needs 0 <= n_keyword <= n_total and 0 <= n <= n_total (n_total={big_n}, n_keyword={big_k})")
    lf = gammaln(np.arange(big_n + 1, dtype=np.float64) + 1.0)  # log i!
    draws, row = np.unique(n, return_inverse=True)
    row = row.reshape(-1)
    first = np.full(len(draws), big_n, dtype=np.int64)
    np.minimum.at(first, row, k)
    lo = np.maximum(first, np.maximum(draws - (big_n - big_k), 0))
    hi = np.minimum(draws, big_k)
    width = np.maximum(hi - lo + 1, 1)
    log_norm = lf[big_n] - lf[draws] - lf[big_n - draws]
    col = k - lo[row]
    out = np.where(col < 0, 1.0, 0.0)  # below the support: certain; above it: impossible
    local = np.empty(len(draws), dtype=np.int64)
    for rows in _by_width(width):
        j = lo[rows, None] + np.arange(int(width[rows].max()))[None]
        valid = j <= hi[rows, None]
        j = np.minimum(j, hi[rows, None])
        d = draws[rows, None]
        logp = lf[big_k] - lf[j] - lf[big_k - j] + lf[big_n - big_k] - lf[d - j] - lf[big_n - big_k - d + j] - log_norm[rows, None]
        logp[~valid] = -np.inf
        top = logp.max(axis=1)
        tail = np.cumsum(np.exp(logp - top[:, None])[:, ::-1], axis=1)[:, ::-1]  # smallest terms first
        local[:] = -1
        local[rows] = np.arange(len(rows))
        mine = np.flatnonzero((local[row] >= 0) & (col >= 0) & (col < width[row]))
        r = local[row[mine]]
        with np.errstate(divide="ignore"):
            out[mine] = np.exp(np.log(tail[r, col[mine]]) + top[r])
    return np.clip(out, 0.0, 1.0).reshape(shape)


def _by_width(width: np.ndarray):
    """Indices in blocks of similar width, each block's (rows x widest) at most _SF_BLOCK terms."""
    order = np.argsort(width, kind="stable")
    a = 0
    while a < len(order):
        b = a + 1
        while b < len(order) and (b + 1 - a) * int(width[order[b]]) <= _SF_BLOCK:
            b += 1
        yield order[a:b]
        a = b


def _neuron_table(
    token_fires: np.ndarray,
    per_class: np.ndarray,
    kw_fires: np.ndarray,
    n_tok: int,
    class_sizes: np.ndarray,
    kw: np.ndarray,
    classes: np.ndarray,
) -> pd.DataFrame:
    """One row per (layer, neuron)."""
    n_layers, n_ffn = token_fires.shape
    fired = per_class.sum(axis=0)
    n_rows, n_kw = int(class_sizes.sum()), int(kw.sum())
    base = n_kw / n_rows if n_rows else np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        token_rate = token_fires / n_tok if n_tok else np.full(fired.shape, np.nan)
        keyword = np.where(fired > 0, kw_fires / np.maximum(fired, 1), np.nan)
        lift = keyword / base if base > 0 else np.full(fired.shape, np.nan)
    rates = per_class / class_sizes[:, None, None]
    top_class = classes[rates.argmax(axis=0)]
    import pandas as pd

    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(n_layers), n_ffn),
            "neuron": np.tile(np.arange(n_ffn), n_layers),
            "token_fire_rate": np.asarray(token_rate, dtype=np.float64).ravel(),
            "sentence_fire_rate": (fired / class_sizes.sum()).ravel(),
            "n_fire_sentences": fired.ravel().astype(np.int64),
            "n_keyword_fire_sentences": kw_fires.ravel().astype(np.int64),
            "keyword_score": keyword.ravel(),
            "keyword_base_rate": np.full(fired.size, base),
            "keyword_lift": np.asarray(lift, dtype=np.float64).ravel(),
            "keyword_p_value": keyword_p_values(kw_fires.ravel(), fired.ravel(), n_kw, n_rows),
            "selectivity": _selectivity(per_class, class_sizes).ravel(),
            "top_class": np.where(fired.ravel() > 0, top_class.ravel(), -1)
            if np.issubdtype(classes.dtype, np.integer)
            else top_class.ravel(),
        }
    )


def _selectivity(per_class: np.ndarray, class_sizes: np.ndarray) -> np.ndarray:
    """(max - mean of others) / (max + mean of others) of class fire rates."""
    n_classes = class_sizes.size
    if n_classes < 2:
        return np.full(per_class.shape[1:], np.nan)
    rates = per_class / class_sizes[:, None, None]
    top = rates.max(axis=0)
    others = (rates.sum(axis=0) - top) / (n_classes - 1)
    denom = top + others
    return np.where(top > 0, (top - others) / np.where(top > 0, denom, 1.0), 0.0)


def _layer_table(token_fires: np.ndarray, per_class: np.ndarray, n_tok: int, n_rows: int, threshold: float) -> pd.DataFrame:
    """One row per layer."""
    n_layers, n_ffn = token_fires.shape
    fired = per_class.sum(axis=0)
    token_fraction = token_fires.sum(axis=1) / (n_tok * n_ffn) if n_tok else np.full(n_layers, np.nan)
    import pandas as pd

    return pd.DataFrame(
        {
            "layer": np.arange(n_layers),
            "n_neurons": np.full(n_layers, n_ffn, dtype=np.int64),
            "threshold": np.full(n_layers, threshold),
            "token_fire_fraction": token_fraction,
            "dead_fraction": (token_fires == 0).mean(axis=1),
            "sentence_fire_fraction": fired.sum(axis=1) / (n_rows * n_ffn),
        }
    )


def _keyword_pattern(keywords: Sequence[str]) -> re.Pattern | None:
    """One alternation, longest first, with edges that are neither word characters nor hyphens."""
    words = sorted({" ".join(k.split()).lower() for k in keywords if k.strip()}, key=lambda w: (-len(w), w))
    if not words:
        return None
    parts = [r"\s+".join(re.escape(p) for p in w.split(" ")) for w in words]
    return re.compile(r"(?<![\w-])(?:" + "|".join(parts) + r")(?![\w-])")
