"""Extract one store entry: one model over one split, shard by shard, resumable.

Two layers: `extract_entry` is the local shard scheduler (which shards this process claims, the
progress bar, the commit), and `compute_and_write` / `compute_shard` + `publish_shard` are the unit
of work it schedules, which `stages.extract.cluster` runs as Dask tasks instead. The model is loaded
only when a shard is missing; locally, writing runs on a background thread so the device does not
wait on disk; each shard is claimed with a store lease before it is computed (so processes on the
same entry split the work), published atomically by the store, and the manifest is committed by
whichever process finishes the last shard.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pandas as pd

from pipeline.config import ExtractConfig, ModelConfig
from pipeline.errors import PipelineError
from stages.entries import FeatureRequest
from stages.extract.batching import plan_batches
from store.errors import plural

log = logging.getLogger(__name__)


class NonFiniteError(PipelineError):
    """NaN/inf in pooled features; the entry is not committed unless allow_nonfinite is set."""


@dataclass
class EntryStats:
    model: str
    split: str
    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    cached: bool = False
    committed: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    family: object
    device: object


def tokenize(tokenizer, texts: list[str], max_length: int, sink: int | None = None) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """Token ids and special-token masks, truncated to ``max_length``; also which texts were cut.

    One untruncated pass gives every length; a text that fits is exactly what truncation would
    return (truncation is a no-op below ``max_length``), so only the texts that are too long are
    tokenised again, with the tokenizer's own truncation. A ``sink`` token id is put in front of
    every text that does not start with it, marked special, within ``max_length``.
    """
    if sink is not None:
        ids, special, truncated = tokenize(tokenizer, texts, max_length - 1)
        for i, row in enumerate(ids):
            if not row or row[0] != sink:
                ids[i], special[i] = [sink, *row], [1, *special[i]]
        return ids, special, truncated
    enc = tokenizer(texts, add_special_tokens=True, truncation=False, return_special_tokens_mask=True)
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    truncated = np.fromiter((len(x) > max_length for x in ids), dtype=bool, count=len(ids))
    if truncated.any():
        cut = np.flatnonzero(truncated)
        enc = tokenizer(
            [texts[i] for i in cut], add_special_tokens=True, truncation=True, max_length=max_length, return_special_tokens_mask=True
        )
        for j, i in enumerate(cut):
            ids[i], special[i] = enc["input_ids"][j], enc["special_tokens_mask"][j]
    return ids, special, truncated


def _pad(tokenizer, ids: list[list[int]], special: list[list[int]], family: str, device):
    """Right-pad a batch (positions of real tokens then match an unpadded run for every family)."""
    import torch

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise PipelineError(f"{type(tokenizer).__name__} has no pad token: set one before extracting")
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max())
    real = np.arange(width) < lengths[:, None]  # row-major order of real positions = concatenation order
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    input_ids[real] = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    special_t = np.ones((len(ids), width), dtype=np.int64)
    special_t[real] = np.fromiter(chain.from_iterable(special), dtype=np.int64, count=int(lengths.sum()))
    input_ids_t = torch.from_numpy(input_ids).to(device)
    inputs = {"input_ids": input_ids_t, "attention_mask": torch.from_numpy(real.astype(np.int64)).to(device)}
    if family == "bert":
        inputs["token_type_ids"] = torch.zeros_like(input_ids_t)
    return inputs, torch.from_numpy(special_t).to(device)


def _surely_finite(t, storage) -> bool:
    """True if every value of ``t`` is finite once cast to ``storage``: one min/max pass, no copy.

    A finite value no larger in magnitude than the storage dtype's largest finite value casts to
    a finite value; anything else (NaN, inf, or out of range) returns False and the caller
    checks the cast values exactly.
    """
    import torch

    if t.numel() == 0:
        return True
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # NaN propagates to both
    lim = float(torch.finfo(storage).max)
    return -lim <= lo and hi <= lim


@dataclass
class ShardArrays:
    """One shard computed in memory: arrays in row order, its row table and per-dataset attrs."""

    row_start: int
    arrays: dict[str, np.ndarray]
    table: pd.DataFrame
    attrs: dict[str, dict]
    tokens: int
    truncated: int

    @property
    def rows(self) -> int:
        return len(self.table)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def extract_shard(
    loaded: LoadedModel, request: FeatureRequest, texts: list[str], row_start: int, labels: np.ndarray, progress=None
) -> ShardArrays:
    """Compute one shard in memory (``texts`` are rows ``row_start...`` of the split)."""
    import torch

    from pipeline.models.families import RULE_ABS, sink_token_id
    from stages.extract.capture import FfnCapture, _pooling_threads, forward_features

    cfg = request.extract
    sink = sink_token_id(loaded.tokenizer, loaded.family, request.sink, getattr(loaded.model, "config", None))
    ids, special, truncated = tokenize(loaded.tokenizer, texts, cfg.max_length, sink)
    lengths = np.array([len(x) for x in ids])
    n = len(texts)
    storage = getattr(torch, cfg.storage_dtype)
    out: dict[str, np.ndarray] = {}
    fire = None
    counted = 0
    with (
        torch.inference_mode(),
        FfnCapture(loaded.model, loaded.family, request.ffn_arrays, request.thresholds, magnitude=request.fire_rule == RULE_ABS) as capture,
    ):
        for batch in plan_batches(lengths, cfg.token_budget, cfg.max_batch_size):
            inputs, special_t = _pad(
                loaded.tokenizer, [ids[i] for i in batch], [special[i] for i in batch], loaded.family.name, loaded.device
            )
            feats = forward_features(
                loaded.model,
                capture,
                inputs,
                special_t,
                poolings=cfg.poolings,
                include_special=cfg.special_tokens_in_mean,
                pooler=request.pooler,
                skip_sink=sink is not None,
            )
            with _pooling_threads(torch.device(loaded.device)):  # small passes: few threads
                for name, t in feats.arrays.items():
                    check = not cfg.allow_nonfinite and not _surely_finite(t, storage)
                    t = t.to(storage)
                    if check and (bad := ~torch.isfinite(t)).any():
                        b, layer = (int(v) for v in bad.nonzero()[0][:2])
                        raise NonFiniteError(
                            f"{request.model.name}/{request.split.name}: non-finite {name} at layer {layer}, row {row_start + int(batch[b])} "
                            f"(in {cfg.storage_dtype}); set extract.allow_nonfinite = true to store it anyway, or use storage_dtype = 'float32'"
                        )
                    host = t.cpu()
                    if name not in out:
                        out[name] = np.empty((n, *host.shape[1:]), dtype=host.numpy().dtype)
                    out[name][batch] = host.numpy()
            fire = feats.fire_count if fire is None else fire + feats.fire_count
            counted += feats.n_counted
            if progress is not None:
                progress.update(len(batch))
                progress.tokens += int(lengths[batch].sum())
    out["ffn/fire_count"] = fire.cpu().numpy()
    attrs = {
        "ffn/fire_count": {
            "thresholds": list(request.thresholds),
            "rule": request.fire_rule,
            "n_tokens": int(counted),
            "special_tokens_counted": bool(cfg.special_tokens_in_mean),
            "sink_token": -1 if sink is None else int(sink),
        }
    }
    table = pd.DataFrame(
        {
            "row": np.arange(row_start, row_start + n, dtype=np.int64),
            "label": labels.astype(np.int64),
            "text": texts,
            "n_tokens": lengths.astype(np.int64),
            "truncated": truncated,
        }
    )
    return ShardArrays(row_start, out, table, attrs, int(lengths.sum()), int(truncated.sum()))


def n_shards(n_rows: int, shard_rows: int) -> int:
    return max(1, math.ceil(n_rows / shard_rows))


def shard_rows_range(request: FeatureRequest, index: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of shard ``index`` of ``request``'s split."""
    step = request.extract.shard_rows
    return index * step, min((index + 1) * step, len(request.split))


LEASE_TTL = 300.0


@dataclass(frozen=True)
class ShardResult:
    """What one computed and published shard reports back: small enough to send from a Dask worker."""

    index: int
    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    bytes_written: int = 0
    computed: bool = False  # False: it was already published by someone else
    seconds: float = 0.0  # compute time


def compute_shard(loaded: LoadedModel, request: FeatureRequest, index: int, progress=None) -> ShardArrays:
    """Shard ``index`` of ``request`` computed in memory (not yet written)."""
    lo, hi = shard_rows_range(request, index)
    split = request.split
    return extract_shard(loaded, request, list(split.texts[lo:hi]), lo, split.labels[lo:hi], progress)


def publish_shard(writer, index: int, shard: ShardArrays, lease=None, seconds: float = 0.0) -> ShardResult:
    """Publish a computed shard through the store, then give up its lease (also on failure)."""
    try:
        writer.write_shard(index, shard.arrays, shard.table, row_start=shard.row_start, attrs=shard.attrs)
    finally:
        if lease is not None:
            lease.release()
    return ShardResult(index, shard.rows, shard.tokens, shard.truncated, shard.nbytes, computed=True, seconds=seconds)


def compute_and_write(compute: Callable[[], ShardArrays], writer, index: int, lease) -> ShardResult:
    """Run ``compute`` for shard ``index`` and publish what it returns; ``lease`` is released whatever happens.

    The unit of work of a cluster task; the local scheduler splits it in two to overlap the next
    shard's compute with this shard's write.
    """
    t0 = time.perf_counter()
    try:
        shard = compute()
    except BaseException:
        lease.release()
        raise
    return publish_shard(writer, index, shard, lease, seconds=time.perf_counter() - t0)


def claim_shards(writer, remaining: list[int], lease_ttl: float, *, on_wait=None, what: str = ""):
    """Yield ``(index, lease)`` for every shard of ``remaining`` this process gets to compute.

    A shard another live process holds is skipped and retried after a pause (``on_wait`` runs
    first, e.g. to flush a pending write); a shard that appears published is dropped. Ends when
    every shard of ``remaining`` is published or handed out.
    """
    remaining = list(remaining)
    poll = min(2.0, lease_ttl / 10)
    waited = False
    while remaining:
        progressed = False
        for k in list(remaining):
            if k in writer.done_shards():
                remaining.remove(k)
                continue
            lease = writer.shard_lease(k, lease_ttl)
            if lease is None:
                continue  # another process computes it; come back to it later
            if k in writer.done_shards():  # published between the listing and the claim
                lease.release()
                remaining.remove(k)
                continue
            remaining.remove(k)
            progressed = True
            yield k, lease
        if remaining and not progressed:
            if on_wait is not None:
                on_wait()
            if not waited:
                log.info("%s: waiting for shards %s, which other processes are writing", what, remaining)
                waited = True
            time.sleep(poll)


def commit_if_complete(writer, total: int) -> bool:
    """Commit the entry if all ``total`` shards are published; True if it is committed (by anyone)."""
    if len(writer.done_shards()) == total:
        writer.commit(expected_shards=total)
        return True
    return writer.committed()


def extract_entry(
    request: FeatureRequest, store, load_model, *, shard: tuple[int, int] = (0, 1), progress: bool = True, lease_ttl: float = LEASE_TTL
) -> EntryStats:
    """Fill the missing shards of ``request`` that belong to ``shard`` = (I, N), then commit if all are there.

    ``load_model`` is called at most once and only if there is work to do, so a cached
    entry costs no model load. Each shard is claimed with a store lease before it is computed, so
    several processes on one entry (same or overlapping ``--shard``) split its shards dynamically: a
    shard another live process holds is skipped, and waited for at the end (taken over if its lease
    expires); whoever sees the last shard published commits the entry, once. Compute runs here while
    the previous shard is written on a background thread.
    """
    from pipeline.progress import tqdm

    split = request.split
    stats = EntryStats(request.model.name, split.name)
    if store.exists(request.key):
        stats.cached = stats.committed = True
        return stats
    cfg = request.extract
    total = n_shards(len(split), cfg.shard_rows)
    writer = store.writer(request.key, request.description(), n_shards=total)
    index, count = shard
    done = writer.done_shards()
    remaining = [k for k in range(total) if k % count == index and k not in done]
    what = f"{request.model.name}/{split.name}"
    t0 = time.perf_counter()
    bar = None
    pending: list[Future] = []

    def flush() -> None:
        while pending:
            count_shard(stats, pending.pop().result())

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        for k, lease in claim_shards(writer, remaining, lease_ttl, on_wait=flush, what=what):
            try:
                if bar is None:
                    loaded = load_model()
                    t0 = time.perf_counter()
                    rows_todo = sum(hi - lo for lo, hi in (shard_rows_range(request, j) for j in remaining))
                    bar = tqdm(total=rows_todo, desc=f"extract {what}", unit="row", disable=not progress, leave=True)
                    bar.tokens = 0
                computed = compute_shard(loaded, request, k, bar)
                flush()
            except BaseException:
                lease.release()
                raise
            pending.append(pool.submit(publish_shard, writer, k, computed, lease))
            bar.set_postfix_str(f"{bar.tokens / (time.perf_counter() - t0):,.0f} tok/s")
        flush()
    if bar is not None:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    if stats.truncated:
        log.warning("%s: %d text(s) longer than max_length=%d were truncated", what, stats.truncated, cfg.max_length)
    stats.committed = commit_if_complete(writer, total)
    if not stats.committed:
        log.info(
            "%s: %d of %s present; the process that writes the last one commits the entry",
            what,
            len(writer.done_shards()),
            plural(total, "shard"),
        )
    return stats


def count_shard(stats: EntryStats, result: ShardResult) -> None:
    """Count a published shard into an entry's stats (``seconds`` only where the caller does not time the entry)."""
    stats.seconds += result.seconds
    stats.rows += result.rows
    stats.tokens += result.tokens
    stats.truncated += result.truncated
    stats.bytes_written += result.bytes_written


def load_for_extract(model_cfg: ModelConfig, spec, extract_cfg: ExtractConfig):
    """A loader closure: the model is built only if some shard needs computing."""

    def load() -> LoadedModel:
        from pipeline.device import resolve_device, resolve_dtype
        from pipeline.models import load as load_model

        device = resolve_device(extract_cfg.device)
        dtype = resolve_dtype(extract_cfg.compute_dtype, device)
        t0 = time.perf_counter()
        model, tokenizer, family = load_model(spec, device=device, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
        log.info(
            "loaded %s (%s, %s, %s) in %.1f s",
            model_cfg.name,
            spec.display,
            device,
            str(dtype).removeprefix("torch."),
            time.perf_counter() - t0,
        )
        return LoadedModel(model, tokenizer, family, device)

    return load
