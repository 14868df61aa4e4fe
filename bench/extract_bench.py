"""extract_overhead, bucketing_speedup, scaling_extract and store_overhead.

extract_overhead: tokens/s of the real extract (``extract_entry``: tokenisation, length-grouped
batches, every hook and pooling, firing counts, float16 conversion, the writer thread and the
commit into a fresh temporary store) over tokens/s of a bare ``model(**batch)`` on the same
padded batches, same dtype, ``torch.inference_mode``. Repetitions alternate bare, full, bare,
full; the published ratio is the median of the per-pair ratios.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import ROOT, Plan, Timer, median, paired_ratio, result, scaling_result

log = logging.getLogger("bench")
FIXED_BATCH, FIXED_LENGTH = 32, 128  # the LLMEmbed reference code: batch 32, padded to max length 128


@dataclass
class Bundle:
    loaded: object
    model_cfg: object
    spec: object
    extract_cfg: object


_LOADED: dict[str, Bundle] = {}


def load(source: str) -> Bundle:
    """The model as extract loads it (device auto, compute dtype auto), cached for the run."""
    if source not in _LOADED:
        from pipeline.config import ExtractConfig, ModelConfig
        from pipeline.models import resolve
        from stages.extract.runner import load_for_extract

        name = source.removeprefix("tiny-random-").split("-")[0]
        mc, ec, spec = ModelConfig(name=name, source=source), ExtractConfig(), resolve(source)
        _LOADED[source] = Bundle(load_for_extract(mc, spec, ec)(), mc, spec, ec)
    return _LOADED[source]


def family(source: str) -> str:
    return load(source).loaded.family.name


def train_split(rows: int):
    """The first ``rows`` rows of SST-2 train (all of it for rows <= 0)."""
    from pipeline.config import DataConfig
    from pipeline.data import Split, load_split

    full = load_split(DataConfig(name="sst2", path=str(ROOT / "data" / "sst2")), "train")
    if rows <= 0 or rows >= len(full):
        return full
    return Split(full.dataset, full.name, full.texts[:rows], full.labels[:rows], full.path)


def request(b: Bundle, split):
    from stages.entries import FeatureRequest

    return FeatureRequest(split, b.model_cfg, b.spec, b.extract_cfg)


def planned_batches(b: Bundle, texts: list[str]):
    """Exactly the padded batches extract builds: (inputs, special mask, real tokens) each, with the
    attention-sink token extract prepends (decoders whose tokenizer adds no BOS, e.g. SmolLM2)."""
    from pipeline.models.families import SINK_AUTO, sink_token_id
    from stages.extract.batching import plan_batches
    from stages.extract.runner import _pad, tokenize

    cfg, L = b.extract_cfg, b.loaded
    sink = sink_token_id(L.tokenizer, L.family, getattr(b.model_cfg, "sink", SINK_AUTO), getattr(L.model, "config", None))
    ids, special, _ = tokenize(L.tokenizer, texts, cfg.max_length, sink)
    lengths = np.array([len(x) for x in ids])
    out = []
    for idx in plan_batches(lengths, cfg.token_budget, cfg.max_batch_size):
        inputs, special_t = _pad(L.tokenizer, [ids[i] for i in idx], [special[i] for i in idx], L.family.name, L.device)
        out.append((inputs, special_t, int(lengths[idx].sum())))
    return out


def fixed_batches(b: Bundle, texts: list[str]):
    """The reference: consecutive batches of 32 in file order, every one padded to 128 tokens."""
    import torch

    L = b.loaded
    out = []
    for lo in range(0, len(texts), FIXED_BATCH):
        enc = L.tokenizer(
            texts[lo : lo + FIXED_BATCH],
            padding="max_length",
            truncation=True,
            max_length=FIXED_LENGTH,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        inputs = {"input_ids": enc["input_ids"].to(L.device), "attention_mask": enc["attention_mask"].to(L.device)}
        if L.family.name == "bert":
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        out.append((inputs, enc["special_tokens_mask"].to(L.device), int(enc["attention_mask"].sum())))
    return out


def bare_forward(b: Bundle, batches) -> None:
    import torch

    with torch.inference_mode():
        for inputs, _, _ in batches:
            b.loaded.model(**inputs)


def read_once_forward(b: Bundle, batches) -> None:
    """The bare forward plus a hook that reads every FFN activation once (a max over tokens), on the
    threads extract's reductions use: the least any FFN statistic can cost, however fused its kernel."""

    from stages.extract.capture import _pooling_threads

    def hook(module, args):
        with _pooling_threads(args[0].device):
            args[0].amax(dim=1)

    L = b.loaded
    handles = [L.family.ffn_projection(block).register_forward_pre_hook(hook) for block in L.family.block_list(L.model)]
    try:
        bare_forward(b, batches)
    finally:
        for h in handles:
            h.remove()


def features_forward(b: Bundle, batches) -> None:
    """Every hook and pooling extract runs, on given batches (no tokenisation, no writing)."""
    import torch

    from pipeline.models.families import RULE_ABS, default_thresholds, ffn_kind, firing_rule
    from stages.extract.capture import FfnCapture, forward_features

    cfg, L = b.extract_cfg, b.loaded
    kind = ffn_kind(L.family, L.model.config.to_dict())
    magnitude = firing_rule(kind) == RULE_ABS
    thresholds = b.model_cfg.thresholds or cfg.thresholds or default_thresholds(kind)
    poolings = tuple(cfg.ffn_poolings) + (("absmax",) if magnitude else ())
    with torch.inference_mode(), FfnCapture(L.model, L.family, poolings, thresholds, magnitude=magnitude) as cap:
        for inputs, special, _ in batches:
            feats = forward_features(L.model, cap, inputs, special, poolings=cfg.poolings, include_special=cfg.special_tokens_in_mean)
            for t in feats.arrays.values():
                t.cpu()


def full_extract(b: Bundle, split, tmp: Path):
    """``extract_entry`` into a fresh store; returns (stats, store path)."""
    from stages.extract.runner import extract_entry
    from store import Store

    path = Path(tempfile.mkdtemp(dir=tmp, prefix="extract-"))
    stats = extract_entry(request(b, split), Store(str(path)), lambda: b.loaded, progress=False)
    assert stats.committed, "bench extract did not commit"
    return stats, path


def extract_overhead(plan: Plan, tmp: Path) -> tuple[dict, Path | None]:
    out: dict = {}
    keep: Path | None = None
    for source in plan.extract_models:
        b = load(source)
        split = train_split(dict(plan.extract_rows_for).get(source, plan.extract_rows))
        batches = planned_batches(b, list(split.texts))
        tokens = sum(n for _, _, n in batches)
        bare_forward(b, batches)  # warm-up (allocator, kernels)
        _, warm = full_extract(b, split, tmp)
        shutil.rmtree(warm)
        bare, full, bare_cpu, full_cpu, hooked, once = [], [], [], [], [], []
        for _ in range(plan.reps):
            with Timer() as t:
                bare_forward(b, batches)
            bare.append(t.wall), bare_cpu.append(t.cpu)
            with Timer() as t:
                read_once_forward(b, batches)
            once.append(t.wall)
            with Timer() as t:
                features_forward(b, batches)
            hooked.append(t.wall)
            with Timer() as t:
                stats, path = full_extract(b, split, tmp)
            full.append(t.wall), full_cpu.append(t.cpu)
            assert stats.tokens == tokens, (stats.tokens, tokens)
            if keep is None and source == plan.extract_models[0]:
                keep = path
            else:
                shutil.rmtree(path)
        ratio = paired_ratio(bare, full)
        fam = b.loaded.family.name
        out[f"extract_overhead/{fam}"] = result(
            tokens / median(full),
            tokens / median(bare),
            "tokens/s (extract / bare forward)",
            {
                "model": source,
                "rows": len(split),
                "tokens": tokens,
                "batches": len(batches),
                "dtype": str(next(b.loaded.model.parameters()).dtype).removeprefix("torch."),
                "device": str(b.loaded.device),
                "bare_seconds": [round(x, 3) for x in bare],
                "extract_seconds": [round(x, 3) for x in full],
                "cpu_time_ratio": round(paired_ratio(bare_cpu, full_cpu), 4),
                # the forward with every hook and pooling but no tokenising, host copy or writing:
                # how much of the gap is the on-device reductions themselves
                "features_seconds": [round(x, 3) for x in hooked],
                "features_only_ratio": round(paired_ratio(bare, hooked), 4),
                # hooks that only read each FFN activation once: the ceiling of a single fused pass
                "read_once_seconds": [round(x, 3) for x in once],
                "read_once_ratio": round(paired_ratio(bare, once), 4),
                "goal": ">= 0.95",
            },
            ratio=ratio,
        )
    per = {k.split("/", 1)[1]: v["ratio"] for k, v in out.items()}
    worst = min(per, key=per.get)
    out["extract_overhead"] = {
        **out[f"extract_overhead/{worst}"],
        "details": {"per_model_ratio": per, "worst": worst, "goal": ">= 0.95 per model"},
    }
    return out, keep


def store_overhead(path: Path) -> dict:
    """Bytes on disk of an extract entry over the raw bytes of its arrays, minus 1."""
    import h5py

    h5 = sorted(path.rglob("*.h5"))
    raw = 0
    for f in h5:
        with h5py.File(f, "r") as fh:
            fh.visititems(lambda _, o: None)
            raw += sum(fh[n].size * fh[n].dtype.itemsize for n in _datasets(fh))
    files = [p for p in path.rglob("*") if p.is_file() and "/entries/" in str(p)]
    h5_bytes = sum(f.stat().st_size for f in h5)
    all_bytes = sum(f.stat().st_size for f in files)
    table_bytes = sum(f.stat().st_size for f in files if f.suffix == ".parquet")
    other = all_bytes - h5_bytes - table_bytes
    return result(
        all_bytes / raw - 1 if raw else float("nan"),
        0.05,
        "fraction over raw array bytes",
        {
            "raw_array_bytes": raw,
            "h5_bytes": h5_bytes,
            "h5_overhead": round(h5_bytes / raw - 1, 5),
            "row_table_parquet_bytes": table_bytes,
            "manifest_and_other_bytes": other,
            "shards": len(h5),
            "note": "value counts every file of the entry (HDF5 shards, row tables with the texts, manifest); "
            "h5_overhead is the HDF5 container alone",
            "goal": "<= 0.05",
        },
        ratio=(all_bytes / raw - 1) / 0.05 if raw else float("nan"),
    )


def _datasets(f) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def bucketing_speedup(plan: Plan) -> dict:
    b = load(plan.bucket_model)
    split = train_split(plan.bucket_rows)
    texts = list(split.texts)
    planned, fixed = planned_batches(b, texts), fixed_batches(b, texts)
    tokens = sum(n for _, _, n in planned)
    assert tokens == sum(n for _, _, n in fixed), "the two batchings must cover the same real tokens"
    reps = max(1, min(plan.reps, 2))
    bucket, pad = [], []
    features_forward(b, planned[:1])
    for _ in range(reps):
        with Timer() as t:
            features_forward(b, fixed)
        pad.append(t.wall)
        with Timer() as t:
            features_forward(b, planned)
        bucket.append(t.wall)
    padded_planned = sum(int(i["input_ids"].numel()) for i, _, _ in planned)
    return {
        "bucketing_speedup": result(
            tokens / median(bucket),
            tokens / median(pad),
            "real tokens/s (length-grouped / fixed 32 x 128)",
            {
                "model": plan.bucket_model,
                "rows": len(texts),
                "real_tokens": tokens,
                "padded_tokens_grouped": padded_planned,
                "padded_tokens_fixed": sum(int(i["input_ids"].numel()) for i, _, _ in fixed),
                "grouped_seconds": [round(x, 3) for x in bucket],
                "fixed_seconds": [round(x, 3) for x in pad],
                "what": "same hooks and poolings (forward_features) on both; only the batching differs",
                "goal": ">= 3.5",
            },
            ratio=paired_ratio(pad, bucket),
        )
    }


def scaling_extract(plan: Plan, tmp: Path) -> dict:
    b = load(plan.scale_model)
    sizes = (1, 2, 4)
    splits = {k: train_split(plan.scale_rows * k) for k in sizes}
    times: dict[int, list[float]] = {k: [] for k in sizes}
    tokens = {}
    shutil.rmtree(full_extract(b, splits[1], tmp)[1])  # warm-up
    for _ in range(max(1, min(plan.reps, 2))):
        for k in sizes:
            with Timer() as t:
                stats, path = full_extract(b, splits[k], tmp)
            times[k].append(t.wall)
            tokens[k] = stats.tokens
            shutil.rmtree(path)
    t1, t4 = median(times[1]), median(times[4])
    return {
        "scaling_extract": scaling_result(
            times,
            {
                "model": plan.scale_model,
                "rows_1x": plan.scale_rows,
                "tokens": {f"{k}x": v for k, v in tokens.items()},
                "token_normalised_ratio": round((t4 / tokens[4]) / (t1 / tokens[1]), 4),
                "note": "rows are the first N of SST-2 train, so token counts are not exactly proportional; see token_normalised_ratio",
            },
        )
    }
