"""Glue between the CLI and the stages: build requests from a config, run, summarise."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.config import ExperimentConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.store_cli import open_store
from stages.entries import feature_requests
from stages.extract import extract_entry, load_for_extract
from stages.extract.cluster import check_store_reachable, extract_on_cluster, is_distributed
from store.commands import human_bytes
from store.errors import plural

log = logging.getLogger("pipeline")


def extract(
    cfg: ExperimentConfig,
    store_url: str,
    *,
    shard: tuple[int, int] = (0, 1),
    models: list[str] | None = None,
    progress: bool = True,
    scheduler: str | None = None,
) -> int:
    scheduler = scheduler or cfg.extract.scheduler
    check_store_reachable(store_url, scheduler)
    if is_distributed(scheduler) and shard != (0, 1):
        raise ConfigError(
            f"--shard {shard[0]}/{shard[1]} splits work between processes by hand; with --scheduler {scheduler} the cluster does that, drop one of them"
        )
    store = open_store(store_url)
    requests = feature_requests(cfg, models)
    missing = [r for r in requests if not store.exists(r.key)]
    if not missing:
        log.info("extract: %s cached in %s", "the 1 entry is" if len(requests) == 1 else f"all {len(requests)} entries are", store_url)
        return 0
    need = sum(r.estimated_bytes() for r in missing)
    log.info("extract: %d of %s to compute, about %s on disk", len(missing), plural(len(requests), "entry"), human_bytes(need))
    _check_free_space(store_url, need)
    for r in requests:
        if r.spec.random_init:
            log.info("note: %s is %s", r.model.name, r.spec.display)
            break
    if is_distributed(scheduler):
        log.info("%s", format_summary(extract_on_cluster(requests, store, scheduler, progress=progress)))
        return 0
    stats = []
    by_model: dict[str, list] = {}
    for r in requests:
        by_model.setdefault(r.model.name, []).append(r)
    for reqs in by_model.values():
        loader = _memo(load_for_extract(reqs[0].model, reqs[0].spec, cfg.extract))
        for r in reqs:
            stats.append(extract_entry(r, store, loader, shard=shard, progress=progress))
    log.info("%s", format_summary(stats))
    return 0


def _check_free_space(store_url: str, need: int) -> None:
    """Refuse to start an extract that cannot fit on a local disk (remote stores are not checked)."""
    if "://" in store_url and not store_url.startswith("file://"):
        return
    path = Path(store_url.removeprefix("file://")).resolve()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < need * 1.1:
        raise PipelineError(f"not enough free space for extract in {store_url}: about {human_bytes(need)} needed, {human_bytes(free)} free")


def _memo(fn):
    """Load a model at most once, and only when a shard actually needs it."""
    cache = []

    def wrapper():
        if not cache:
            cache.append(fn())
        return cache[0]

    return wrapper


def format_summary(stats) -> str:
    head = f"{'model':<12} {'split':<8} {'rows':>7} {'tokens':>9} {'seconds':>8} {'tokens/s':>9} {'written':>10}  status"
    lines = [head, "-" * len(head)]
    for s in stats:
        status = "cached" if s.cached else ("committed" if s.committed else "partial (other shards pending)")
        tps = "-" if s.cached or not s.seconds else f"{s.tokens_per_s:,.0f}"
        lines.append(
            f"{s.model:<12} {s.split:<8} {s.rows:>7} {s.tokens:>9} {s.seconds:>8.1f} {tps:>9} {human_bytes(s.bytes_written):>10}  {status}"
            + (f", {s.truncated} truncated" if s.truncated else "")
        )
    return "\n".join(lines)


# Each stage is imported by the command that runs it: a cached `extract` rerun then starts without
# scipy, scikit-learn and the train stage (about 2 s of imports on 2 cores).


def score(cfg: ExperimentConfig, store_url: str, out: Path, *, scheduler: str | None = None, progress: bool = True) -> int:
    from stages.score.runner import run_score

    run_score(cfg, open_store(store_url), out, scheduler=scheduler or cfg.score.scheduler, progress=progress)
    return 0


def train(cfg: ExperimentConfig, store_url: str, out: Path, *, progress: bool = True) -> int:
    from stages.train.runner import run_train

    run_train(cfg, open_store(store_url), out, progress=progress)
    return 0


def predict(cfg: ExperimentConfig | None, store_url: str, head: str, texts: list[str], fmt: str = "tsv") -> int:
    """Print one row per text: TSV with a header (tabs and newlines in texts escaped, so a row stays one
    line) or JSON lines."""
    import json

    from stages.predict import predict_table

    classes, rows = predict_table(cfg, open_store(store_url), head, texts)
    if fmt == "jsonl":
        for text, label, probs in rows:
            print(
                json.dumps(
                    {"label": label, "probabilities": {str(c): round(float(p), 6) for c, p in zip(classes, probs)}, "text": text},
                    ensure_ascii=False,
                )
            )
        return 0
    print("\t".join(["label", *(f"p_{_escape(str(c))}" for c in classes), "text"]))
    for text, label, probs in rows:
        print("\t".join([_escape(str(label)), *(f"{p:.4f}" for p in probs), _escape(text)]))
    return 0


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
