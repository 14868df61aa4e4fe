"""Feature entries: what one is (the description whose fingerprint is its store key), and how to find and open them.

Everything that changes the stored bytes is in it (model identity, tokenizer via the
model files, max length, poolings, dtypes, hook points, firing rule and thresholds, the
attention-sink setting, the data fingerprint, the shard layout and the format version); device,
batch size, token budget and worker count are not, so a teammate computing the same thing elsewhere gets a cache hit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipeline.config import ExperimentConfig, ExtractConfig, ModelConfig
from pipeline.data import Split, load_splits
from pipeline.device import compute_dtype_name
from pipeline.errors import ConfigError, PipelineError, rerun_hint
from pipeline.models import ModelSpec, resolve
from pipeline.models.families import FAMILIES, RULE_ABS, SINK_AUTO, SINK_NONE, Family, default_thresholds, ffn_kind, firing_rule
from pipeline.models.registry import EMBEDDED
from store import CorruptEntryError, fingerprint

FORMAT_VERSION = 2  # 2: fire counts per threshold, firing rule, attention sink, token-norm ratios


def spec_family(spec: ModelSpec) -> Family:
    """The family from the model's config.json, read as JSON (no transformers import)."""
    if spec.kind == "tiny":
        name = spec.identity["family"]
    elif spec.kind == "embedded":
        name = EMBEDDED[spec.source].family
    else:
        from pipeline.models.families import family_of

        class _Cfg:
            model_type = json.loads((Path(spec.path) / "config.json").read_text()).get("model_type")

        return family_of(_Cfg)
    return next(f for f in FAMILIES if f.name == name)


@dataclass(frozen=True)
class FeatureRequest:
    """One store entry to extract: a model over a split under one extract config."""

    split: Split
    model: ModelConfig
    spec: ModelSpec
    extract: ExtractConfig

    @cached_property
    def family(self) -> Family:
        return spec_family(self.spec)

    @cached_property
    def ffn_kind(self) -> str:
        """'relu', 'gelu' or 'gated' (from config.json; tiny models use their family's default)."""
        return ffn_kind(self.family, _config_json(self.spec))

    @property
    def fire_rule(self) -> str:
        return firing_rule(self.ffn_kind)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The model's own list, else extract.thresholds, else the default of its FFN kind."""
        chosen = self.model.thresholds or self.extract.thresholds or default_thresholds(self.ffn_kind)
        return tuple(float(t) for t in chosen)

    @property
    def sink(self) -> str:
        """The sink setting that takes effect: 'auto' does nothing for encoders."""
        s = self.model.sink
        return SINK_NONE if s == SINK_AUTO and not self.family.decoder else s

    @property
    def ffn_arrays(self) -> tuple[str, ...]:
        """FFN poolings stored: the configured ones, plus 'absmax' for the magnitude rule
        (the per-sentence statistic its sentence-level firing needs, as 'max' is for a > t)."""
        extra = ("absmax",) if self.fire_rule == RULE_ABS else ()
        return tuple(self.extract.ffn_poolings) + extra

    def key_material(self) -> dict:
        cfg = self.extract
        return {
            "kind": "features",
            "format_version": FORMAT_VERSION,
            "data": {"fingerprint": self.split.fingerprint, "n_rows": len(self.split)},
            "model": self.spec.identity,
            "family": self.family.name,
            "hooks": {"hidden": "output_hidden_states", "ffn": f"{self.family.blocks}.*.{self.family.ffn_out}:input"},
            "max_length": cfg.max_length,
            "poolings": sorted(cfg.poolings),
            "ffn_poolings": sorted(self.ffn_arrays),
            "special_tokens_in_mean": cfg.special_tokens_in_mean,
            "storage_dtype": cfg.storage_dtype,
            "compute_dtype": compute_dtype_name(cfg.compute_dtype, cfg.device),
            "firing": {"rule": self.fire_rule, "thresholds": list(self.thresholds)},
            "sink": self.sink,
            **({"first": "after_sink"} if self.sink != SINK_NONE else {}),
            "shard_rows": cfg.shard_rows,
            "padding": "right",
            **({"pooler": "pooler_output"} if self.pooler else {}),
            **({"carved": self.split.carved} if self.split.carved else {}),
        }

    @cached_property
    def pooler(self) -> bool:
        """Whether the pooler output is stored: only where the checkpoint has trained pooler weights."""
        return has_trained_pooler(self.spec, self.family)

    @cached_property
    def key(self) -> str:
        return fingerprint(self.key_material())

    def description(self) -> dict:
        """Key material plus human context (names, paths) that does not change the bytes."""
        return {
            **self.key_material(),
            "dataset": {
                "name": self.split.dataset,
                "split": self.split.name,
                "fingerprint": self.split.fingerprint,
                "path": self.split.path,
                **({"label_names": list(self.split.label_names)} if self.split.label_names is not None else {}),
            },
            "model": {**self.spec.identity, "name": self.model.name, "source": self.spec.source, "random_init": self.spec.random_init},
            "name": f"{self.split.dataset}/{self.split.name}/{self.model.name}",
            **dict(zip(("n_layers", "hidden_size", "ffn_size"), model_dims(self.spec))),
        }

    def estimated_bytes(self) -> int:
        layers, hidden, ffn = model_dims(self.spec)
        per_row = (layers + 1) * hidden * len(self.extract.poolings) + layers * ffn * len(self.ffn_arrays) + hidden * self.pooler
        itemsize = 2 if self.extract.storage_dtype == "float16" else 4
        return len(self.split) * per_row * itemsize


def _config_json(spec: ModelSpec) -> dict:
    if spec.kind == "tiny":
        return {}
    return json.loads((Path(spec.path) / "config.json").read_text())


POOLER_FAMILIES = ("bert", "roberta", "mpnet")
POOLER_WEIGHT = "pooler.dense.weight"


def has_trained_pooler(spec: ModelSpec, family: Family) -> bool:
    """True if the model has a pooler and its checkpoint holds trained weights for it.

    Random-weight models never qualify (their pooler is as random as the rest), and neither does a
    checkpoint without pooler weights (transformers would initialise them at random). Only the
    safetensors headers are read; a checkpoint in another format is treated as having none.
    """
    if spec.random_init or family.name not in POOLER_FAMILIES or not spec.path:
        return False
    for f in sorted(Path(spec.path).glob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            names = json.loads(fh.read(n))
        if any(k == POOLER_WEIGHT or k.endswith("." + POOLER_WEIGHT) for k in names):
            return True
    return False


def model_dims(spec: ModelSpec) -> tuple[int, int, int]:
    """(n_layers, hidden_size, ffn_size) from config.json, for disk estimates and `store ls`."""
    if spec.kind == "tiny":
        from pipeline.models.random_init import TINY

        return TINY.layers, TINY.hidden, TINY.ffn
    cfg = json.loads((Path(spec.path) / "config.json").read_text())

    def first(*names: str) -> int:
        return int(next(cfg[n] for n in names if n in cfg))

    return first("num_hidden_layers", "num_layers"), first("hidden_size", "d_model"), first("intermediate_size", "d_ff")


def feature_requests(
    cfg: ExperimentConfig, models: list[str] | None = None, splits: dict[str, Split] | None = None
) -> list[FeatureRequest]:
    """One FeatureRequest per (model, split); resolving models reads no weights."""
    chosen = list(cfg.models)
    if models:
        unknown = sorted(set(models) - {m.name for m in cfg.models})
        if unknown:
            raise ConfigError(f"--models: {unknown} not in the config; configured: {[m.name for m in cfg.models]}")
        chosen = [m for m in cfg.models if m.name in models]
    splits = splits if splits is not None else load_splits(cfg.data, cfg.seed)
    out = []
    for m in chosen:
        spec = resolve(m.source, m.revision)
        out.extend(FeatureRequest(s, m, spec, cfg.extract) for s in splits.values())
    return out


def open_features(store, request: FeatureRequest, *, verify: bool | str = True, config: str = ""):
    """The committed entry for a request, verified; a missing or corrupt one is a clear error.

    ``verify=True`` rehashes every file first; ``verify="sizes"`` checks the manifest and every
    file's size only, for a reader that hashes the shards from the bytes it reads (score) and
    reports a mismatch through ``corrupt_features_error``. ``config`` (the config file's path) is
    named in the error, so the user knows which ``make extract`` run provides the entry.
    """
    if verify is True:
        return open_verified(store, [request], config=config)[0]
    _require_committed(store, request, config)
    try:
        entry = store.open(request.key)
        if verify == "sizes":
            entry.check_sizes()
        return entry
    except CorruptEntryError as e:
        raise corrupt_features_error(store, request, e, config) from None


def open_verified(store, requests: list[FeatureRequest], *, config: str = "") -> list:
    """The committed entries of several requests, every file of all of them rehashed in one
    ``Store.verify`` (a file per core at a time); the first missing or corrupt one is a clear error."""
    for r in requests:
        _require_committed(store, r, config)
    problems = store.verify(list(dict.fromkeys(r.key for r in requests)))
    if problems:
        err = problems[0].error()
        if not isinstance(err, CorruptEntryError):
            raise err
        raise corrupt_features_error(store, next(r for r in requests if r.key == problems[0].key), err, config) from None
    return [store.open(r.key) for r in requests]


def _require_committed(store, request: FeatureRequest, config: str) -> None:
    if not store.exists(request.key):
        name = f"{request.split.dataset}/{request.split.name}/{request.model.name}"
        raise PipelineError(
            f"no features for {name} in {store.url} (key {request.key[:12]}); run `{rerun_hint('extract', config, store.url)}` first"
        )


def corrupt_features_error(store, request: FeatureRequest, error: Exception, config: str = "") -> PipelineError:
    """The one-line error for a corrupt features entry: which file, and how to rebuild it."""
    name = f"{request.split.dataset}/{request.split.name}/{request.model.name}"
    return PipelineError(
        f"features for {name} are corrupt: {error}; remove it (`store rm {request.key[:12]}`) and run `{rerun_hint('extract', config, store.url)}` to rebuild it"
    )
