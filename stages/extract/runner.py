"""Extract one store entry: one model over one split, shard by shard, resumable.

The model is loaded only when a shard is missing; writing runs on a background thread so
the device does not wait on disk; each shard is claimed with a store lease before it is computed
(so processes on the same entry split the work), published atomically by the store, and the
manifest is committed by whichever process finishes the last shard.
"""

from __future__ import annotations

import logging
import math
import time
from itertools import chain
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import ExtractConfig, ModelConfig
from pipeline.data import Split
from pipeline.errors import PipelineError
from stages.extract.batching import plan_batches
from stages.extract.key import FeatureRequest

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


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """Token ids and special-token masks, truncated to ``max_length``; also which texts were cut.

    One untruncated pass gives every length; a text that fits is exactly what truncation would
    return (truncation is a no-op below ``max_length``), so only the texts that are too long are
    tokenised again, with the tokenizer's own truncation.
    """
    enc = tokenizer(texts, add_special_tokens=True, truncation=False, return_special_tokens_mask=True)
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    truncated = np.fromiter((len(x) > max_length for x in ids), dtype=bool, count=len(ids))
    if truncated.any():
        cut = np.flatnonzero(truncated)
        enc = tokenizer([texts[i] for i in cut], add_special_tokens=True, truncation=True, max_length=max_length,
                        return_special_tokens_mask=True)
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


def extract_shard(loaded: LoadedModel, request: FeatureRequest, texts: list[str], row_start: int, labels: np.ndarray, progress=None):
    """Compute one shard in memory: arrays in row order, its table, and its per-shard attrs."""
    import torch

    from stages.extract.capture import FfnCapture, _pooling_threads, forward_features

    cfg = request.extract
    ids, special, truncated = tokenize(loaded.tokenizer, texts, cfg.max_length)
    lengths = np.array([len(x) for x in ids])
    n = len(texts)
    storage = getattr(torch, cfg.storage_dtype)
    out: dict[str, np.ndarray] = {}
    fire = None
    counted = 0
    with torch.inference_mode(), FfnCapture(loaded.model, loaded.family, cfg.ffn_poolings, request.model.threshold) as capture:
        for batch in plan_batches(lengths, cfg.token_budget, cfg.max_batch_size):
            inputs, special_t = _pad(loaded.tokenizer, [ids[i] for i in batch], [special[i] for i in batch], loaded.family.name, loaded.device)
            feats = forward_features(loaded.model, capture, inputs, special_t, poolings=cfg.poolings, include_special=cfg.special_tokens_in_mean,
                                     pooler=request.pooler)
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
    attrs = {"ffn/fire_count": {"threshold": float(request.model.threshold), "n_tokens": int(counted),
                                "special_tokens_counted": bool(cfg.special_tokens_in_mean)}}
    table = pd.DataFrame({
        "row": np.arange(row_start, row_start + n, dtype=np.int64),
        "label": labels.astype(np.int64),
        "text": texts,
        "n_tokens": lengths.astype(np.int64),
        "truncated": truncated,
    })
    return out, table, attrs, int(lengths.sum()), int(truncated.sum())


def n_shards(n_rows: int, shard_rows: int) -> int:
    return max(1, math.ceil(n_rows / shard_rows))


LEASE_TTL = 300.0


def extract_entry(request: FeatureRequest, store, load_model, *, shard: tuple[int, int] = (0, 1), progress: bool = True,
                  lease_ttl: float = LEASE_TTL) -> EntryStats:
    """Fill the missing shards of ``request`` that belong to ``shard`` = (I, N), then commit if all are there.

    ``load_model`` is called at most once and only if there is work to do, so a cached
    entry costs no model load. Each shard is claimed with a store lease before it is computed, so
    several processes on one entry (same or overlapping ``--shard``) split its shards dynamically: a
    shard another live process holds is skipped, and waited for at the end (taken over if its lease
    expires); whoever sees the last shard published commits the entry, once.
    """
    from tqdm.auto import tqdm

    split = request.split
    stats = EntryStats(request.model.name, split.name)
    key = request.key
    if store.exists(key):
        stats.cached = True
        stats.committed = True
        return stats
    cfg = request.extract
    total = n_shards(len(split), cfg.shard_rows)
    writer = store.writer(key, request.description(), n_shards=total)
    index, count = shard
    done = writer.done_shards()
    remaining = [k for k in range(total) if k % count == index and k not in done]
    t0 = time.perf_counter()
    bar = None
    poll = min(2.0, lease_ttl / 10)
    waited = False
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        pending: Future | None = None
        while remaining:
            progressed = False
            for k in list(remaining):
                if k in writer.done_shards():
                    remaining.remove(k)
                    continue
                lease = writer.shard_lease(k, lease_ttl)
                if lease is None:
                    continue  # another process computes it; come back to it later
                try:
                    if k in writer.done_shards():  # published between the listing and the claim
                        remaining.remove(k)
                        lease.release()
                        continue
                    if bar is None:
                        loaded = load_model()
                        t0 = time.perf_counter()
                        rows_todo = sum(min(cfg.shard_rows, len(split) - j * cfg.shard_rows) for j in remaining)
                        bar = tqdm(total=rows_todo, desc=f"extract {request.model.name}/{split.name}", unit="row", disable=not progress, leave=True)
                        bar.tokens = 0
                    lo, hi = k * cfg.shard_rows, min((k + 1) * cfg.shard_rows, len(split))
                    arrays, table, attrs, tokens, cut = extract_shard(loaded, request, list(split.texts[lo:hi]), lo, split.labels[lo:hi], bar)
                    if pending is not None:
                        stats.bytes_written += pending.result()
                        pending = None
                except BaseException:
                    lease.release()
                    raise
                pending = pool.submit(_write, writer, k, arrays, table, attrs, lo, lease)
                remaining.remove(k)
                progressed = True
                stats.rows += hi - lo
                stats.tokens += tokens
                stats.truncated += cut
                elapsed = time.perf_counter() - t0
                bar.set_postfix_str(f"{bar.tokens / elapsed:,.0f} tok/s")
            if remaining and not progressed:
                if pending is not None:
                    stats.bytes_written += pending.result()
                    pending = None
                if not waited:
                    log.info("%s/%s: waiting for shards %s, which other processes are writing", request.model.name, split.name, remaining)
                    waited = True
                time.sleep(poll)
        if pending is not None:
            stats.bytes_written += pending.result()
    if bar is not None:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    if stats.truncated:
        log.warning("%s/%s: %d text(s) longer than max_length=%d were truncated", request.model.name, split.name, stats.truncated, cfg.max_length)
    if len(writer.done_shards()) == total:
        writer.commit(expected_shards=total)
        stats.committed = True
    elif writer.committed():
        stats.committed = True
    else:
        log.info("%s/%s: %d of %d shards present; the process that writes the last one commits the entry",
                 request.model.name, split.name, len(writer.done_shards()), total)
    return stats


def _write(writer, k: int, arrays: dict, table: pd.DataFrame, attrs: dict, row_start: int, lease=None) -> int:
    """Publish shard ``k`` on the writer thread, then give up its lease."""
    try:
        writer.write_shard(k, arrays, table, row_start=row_start, attrs=attrs)
    finally:
        if lease is not None:
            lease.release()
    return sum(a.nbytes for a in arrays.values())


def load_for_extract(model_cfg: ModelConfig, spec, extract_cfg: ExtractConfig):
    """A loader closure: the model is built only if some shard needs computing."""

    def load() -> LoadedModel:
        from pipeline.device import resolve_device, resolve_dtype
        from pipeline.models import load as load_model

        device = resolve_device(extract_cfg.device)
        dtype = resolve_dtype(extract_cfg.compute_dtype, device)
        t0 = time.perf_counter()
        model, tokenizer, family = load_model(spec, device=device, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
        log.info("loaded %s (%s, %s, %s) in %.1f s", model_cfg.name, spec.display, device, str(dtype).removeprefix("torch."), time.perf_counter() - t0)
        return LoadedModel(model, tokenizer, family, device)

    return load
