"""Typed experiment configuration, one dataclass per stage, validated once at the edge.

Every field carries its help text and its constraints in ``metadata`` so that the
checks live in one declarative table (as scikit-learn's ``_parameter_constraints``)
rather than in scattered ``if`` statements. Validation does no I/O beyond reading
the TOML file itself and resolving its relative paths against its folder: data files
and models are checked where they are used.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from pipeline.errors import ConfigError
from pipeline.head_params import CS, DEFAULT_CS, FUSION, FUSION_CONSTRAINTS, LLMEMBED, LLMEMBED_CONSTRAINTS

log = logging.getLogger(__name__)

POOLINGS = ("mean", "first", "last")
FFN_POOLINGS = ("mean", "max")
STORAGE_DTYPES = ("float16", "float32")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
DATA_FORMATS = (".tsv", ".csv", ".jsonl", ".parquet")
MAX_THRESHOLDS = 8


def _field(default: Any = dataclasses.MISSING, help: str = "", **constraints: Any) -> Any:
    """A dataclass field with its help text and constraints kept together."""
    meta = {"help": help, **constraints}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _head_field(defaults: Any, constraints: dict, name: str, help: str) -> Any:
    """A field a head also takes: its default and constraint are the head's own (pipeline/head_params.py)."""
    return _field(getattr(defaults, name), help=help, constraint=constraints[name])


@dataclass(frozen=True)
class DataConfig:
    """Which labelled corpus to run over."""

    name: str = _field(help="Short dataset name used in store entries and reports.", pattern="name")
    path: str = _field("", help="Folder holding one file per split named <split>.{tsv,csv,jsonl,parquet}.")
    splits: tuple[str, ...] = _field(("train", "dev", "test"), help="Splits to use; the first must be the training split.", nonempty=True)
    files: dict[str, str] = _field({}, help="Explicit split -> file paths; overrides `path` for the splits it names.")
    text_column: str = _field("text", help="Column holding the text.")
    label_column: str = _field("label", help="Column holding the integer class label.")
    limit: int = _field(0, help="Keep only the first N rows of each split (0 = all); for quick runs.", min=0)
    dev_fraction: float = _field(
        0.0,
        help="Carve a 'dev' split of this fraction from the training split (stratified, experiment seed), for corpora without one; recorded in the store key.",
        min=0.0,
        max=0.5,
    )


@dataclass(frozen=True)
class ModelConfig:
    """One frozen model to extract from."""

    name: str = _field(help="Short name used in store entries and reports (e.g. 'bert').", pattern="name")
    source: str = _field(help="An embedded model name (see README), a Hugging Face id in the local cache, or a local folder.")
    revision: str = _field("", help="Hugging Face revision (commit, tag or branch) for hub ids; empty = the cached default.")
    thresholds: tuple[float, ...] = _field(
        (),
        help="FFN firing thresholds for this model (overrides extract.thresholds); empty = extract.thresholds, else the family default.",
        finite=True,
        max_items=MAX_THRESHOLDS,
        unique=True,
    )
    sink: str = _field(
        "auto",
        help="Attention-sink token prepended to every text: 'auto' = the model's BOS for decoder models (Llama) whose tokenizer adds none, 'none' = never, or a token string to prepend. It is a special token: out of mean/last pooling and firing counts.",
        nonempty_str=True,
    )
    trust_remote_code: bool = _field(False, help="Allow custom model code from the checkpoint. Off unless you trust the source.")


@dataclass(frozen=True)
class ExtractConfig:
    """How features are computed and stored; fields in the key change the stored bytes."""

    max_length: int = _field(128, help="Tokens per text after truncation (longer texts are truncated and counted).", min=2, max=1_000_000)
    poolings: tuple[str, ...] = _field(POOLINGS, help="Hidden-state poolings to store.", choices=POOLINGS, nonempty=True)
    ffn_poolings: tuple[str, ...] = _field(FFN_POOLINGS, help="FFN activation poolings to store.", choices=FFN_POOLINGS, nonempty=True)
    thresholds: tuple[float, ...] = _field(
        (),
        help="FFN firing thresholds, all counted in one pass (a short list; the first is the primary one). Empty = the family default: ReLU [0.0] (exact: non-zero), GELU [0.0, 0.1], gated SwiGLU/GeGLU [0.1, 0.5] under the magnitude rule |a| > t.",
        finite=True,
        max_items=MAX_THRESHOLDS,
        unique=True,
    )
    special_tokens_in_mean: bool = _field(False, help="Count special tokens ([CLS], <s>, </s>, BOS) in mean pooling and firing counts.")
    storage_dtype: str = _field("float16", help="dtype of stored float arrays.", choices=STORAGE_DTYPES)
    compute_dtype: str = _field("auto", help="Model dtype: auto = bfloat16 on CUDA, float32 on CPU.", choices=COMPUTE_DTYPES)
    device: str = _field("auto", help="auto, cpu, cuda or cuda:N.", pattern="device")
    token_budget: int = _field(8192, help="Max padded tokens per batch (batches are grouped by length).", min=16)
    max_batch_size: int = _field(128, help="Max texts per batch.", min=1)
    shard_rows: int = _field(2048, help="Rows per store shard (the unit of resume and of --shard I/N).", min=1)
    allow_nonfinite: bool = _field(False, help="Commit entries even if NaN/inf activations were found (they are always reported).")
    scheduler: str = _field(
        "local",
        help="local (this process), or tcp://host:port of a dask.distributed scheduler whose workers compute the shards; not in the key.",
        pattern="extract_scheduler",
    )


@dataclass(frozen=True)
class ScoreConfig:
    """Variability and sparsity statistics over stored features."""

    split: str = _field("train", help="Split the statistics are computed on.")
    keywords: str = _field("configs/keywords/stem.txt", help="Keyword list (one per line) for the per-neuron keyword score.")
    scheduler: str = _field(
        "threads", help="Dask scheduler: threads, synchronous, or a dask.distributed address tcp://host:port.", pattern="scheduler"
    )
    rows_per_chunk: int = _field(1024, help="Rows per Dask chunk; memory stays bounded by one chunk plus accumulators.", min=1)
    top_neurons: int = _field(
        10, help="Neurons listed per model and layer by keyword significance in keyword_neurons.parquet and the report.", min=0
    )
    min_fires: int = _field(5, help="Sentences a neuron must fire on to be ranked by keyword score.", min=1)


@dataclass(frozen=True)
class FusionConfig:
    """LLMEmbed-style fused head (Liu et al., ACL 2024) and its ablations."""

    inputs: tuple[str, ...] = _field(
        (),
        help="Feature blocks as model:layer:pooling (negative layers count from the top; 'model:pooler' is a trained pooler output). Empty = derived from the real-weight models: a llama's last 4 layers (mean), every other model's top layer (mean).",
    )
    average: tuple[str, ...] = _field(
        (), help="Blocks (among inputs) whose average is concatenated before the MLP; with derived inputs, the llama layers."
    )
    nu_layers: int = _field(4, help="fusion_nu: fuse each model's this many lowest-nu layers (score stage, train split).", min=1)
    width: int = _head_field(FUSION, FUSION_CONSTRAINTS, "width", help="Common projection width.")
    sigma: float = _head_field(
        FUSION,
        FUSION_CONSTRAINTS,
        "sigma",
        help="Scale of the co-occurrence term 2*sigmoid(sigma*P) - 1; about 1/width keeps it from saturating.",
    )
    hidden: int = _head_field(FUSION, FUSION_CONSTRAINTS, "hidden", help="MLP hidden width.")
    dropout: float = _head_field(FUSION, FUSION_CONSTRAINTS, "dropout", help="Dropout after projection and in the MLP.")
    epochs: int = _head_field(FUSION, FUSION_CONSTRAINTS, "epochs", help="Max epochs; early stopping on dev accuracy.")
    patience: int = _head_field(FUSION, FUSION_CONSTRAINTS, "patience", help="Epochs without dev improvement before stopping.")
    lr: float = _head_field(FUSION, FUSION_CONSTRAINTS, "lr", help="Adam learning rate.")
    batch_size: int = _head_field(FUSION, FUSION_CONSTRAINTS, "batch_size", help="Mini-batch size.")


@dataclass(frozen=True)
class LLMEmbedConfig:
    """The reference LLMEmbed head (ChunLiu-cs/LLMEmbed-ACL2024), with logits into the loss and early stopping on dev."""

    layers: int = _field(5, help="Last llama layers, mean-pooled, compressed and averaged (the reference uses 5).", min=1)
    width: int = _head_field(
        LLMEMBED,
        LLMEMBED_CONSTRAINTS,
        "width",
        help="Common width; 0 = the widest non-llama block (the reference: 1024, bert/roberta-large's own width).",
    )
    sigma: float = _head_field(
        LLMEMBED,
        LLMEMBED_CONSTRAINTS,
        "sigma",
        help="SIGMA in 2*sigmoid(SIGMA*P) - 1 (a command-line argument of the reference, no published default).",
    )
    hidden: tuple[int, ...] = _head_field(LLMEMBED, LLMEMBED_CONSTRAINTS, "hidden", help="MLP hidden widths (the reference: 1024, 256).")
    dropout: float = _head_field(
        LLMEMBED, LLMEMBED_CONSTRAINTS, "dropout", help="Dropout after each compression and MLP layer (the reference: 0.5)."
    )
    epochs: int = _head_field(
        LLMEMBED, LLMEMBED_CONSTRAINTS, "epochs", help="Max epochs; early stopping on dev accuracy (the reference has no dev split)."
    )
    patience: int = _head_field(LLMEMBED, LLMEMBED_CONSTRAINTS, "patience", help="Epochs without dev improvement before stopping.")
    lr: float = _head_field(LLMEMBED, LLMEMBED_CONSTRAINTS, "lr", help="Adam learning rate (the reference: 1e-4).")
    batch_size: int = _head_field(LLMEMBED, LLMEMBED_CONSTRAINTS, "batch_size", help="Mini-batch size (the reference: 1024).")


@dataclass(frozen=True)
class TrainConfig:
    """Heads fitted on cached features only."""

    poolings: tuple[str, ...] = _field(POOLINGS, help="Hidden poolings to probe per layer.", choices=POOLINGS, nonempty=True)
    Cs: tuple[float, ...] = _field(
        DEFAULT_CS, help="Inverse regularisation strengths tried for logistic probes (chosen on dev).", nonempty=True, constraint=CS
    )
    include_embeddings: bool = _field(
        False,
        help="Let layer selection pick hidden-state index 0 (the embedding output); off = select among block outputs 1..L only, as Xie et al.",
    )
    dev_split: str = _field("dev", help="Split used for model choice and early stopping.")
    test_split: str = _field("test", help="Split reported as test.")
    fusion: FusionConfig = field(default_factory=FusionConfig, metadata={"help": "Fused multi-model head."})
    llmembed: LLMEmbedConfig = field(default_factory=LLMEmbedConfig, metadata={"help": "The reference LLMEmbed head."})


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: a corpus, the models to run over it, and the stage settings."""

    name: str = _field(help="Experiment name, used for report titles.", pattern="name")
    data: DataConfig = field(metadata={"help": "The labelled corpus."})
    models: tuple[ModelConfig, ...] = field(metadata={"help": "Models to extract from (a [[models]] table each).", "nonempty": True})
    seed: int = _field(0, help="Seed for every random choice (head init, shuffling).", min=0)
    extract: ExtractConfig = field(default_factory=ExtractConfig, metadata={"help": "Extract stage."})
    score: ScoreConfig = field(default_factory=ScoreConfig, metadata={"help": "Score stage."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Train stage."})
    source: str = field(default="", metadata={"help": "File the config was read from (set by the loader).", "internal": True})

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"models: no model named {name!r}; configured: {', '.join(m.name for m in self.models)}")

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"models: duplicate model name(s) {dupes}; each [[models]] needs a unique name")
        splits = self.data.splits + (("dev",) if self.data.dev_fraction else ())
        if self.data.dev_fraction and "dev" in self.data.splits:
            raise ConfigError(
                f"data.dev_fraction: {self.data.dev_fraction} carves a 'dev' split, but data.splits already has one; remove one of them"
            )
        for s in (self.score.split, self.train.dev_split, self.train.test_split):
            if s not in splits:
                raise ConfigError(f"split {s!r} is used by score/train but data.splits is {list(splits)}")
        for where, texts in (("train.fusion.inputs", self.train.fusion.inputs), ("train.fusion.average", self.train.fusion.average)):
            for text in texts:
                check_block(text, where, self.models)
        if self.train.fusion.average and not self.train.fusion.inputs:
            raise ConfigError(
                "train.fusion.average: set only together with train.fusion.inputs (empty inputs are derived, with their own average)"
            )
        blocks = set(self.train.fusion.inputs)
        missing = [b for b in self.train.fusion.average if b not in blocks]
        if missing:
            raise ConfigError(f"train.fusion.average: {missing} not among train.fusion.inputs")

    @property
    def split_names(self) -> tuple[str, ...]:
        """The configured splits plus the carved 'dev' split when ``data.dev_fraction`` is set."""
        return self.data.splits + (("dev",) if self.data.dev_fraction else ())


BLOCK_POOLINGS = POOLINGS + ("pooler",)


def parse_block(text: str, where: str) -> tuple[str, int, str]:
    """``model:layer:pooling`` (or ``model:pooler``) -> (model, layer, pooling); pooler blocks get layer -1."""
    import re

    m = re.fullmatch(r"([A-Za-z0-9._-]+):(?:(-?\d+):)?([a-z]+)", text)
    if not m or (m[2] is None) != (m[3] == "pooler"):
        raise ConfigError(f"{where}: {text!r} is not model:layer:pooling (e.g. 'llama:-1:mean') or model:pooler")
    if m[3] not in BLOCK_POOLINGS:
        raise ConfigError(f"{where}: {text!r}: unknown pooling {m[3]!r}; choose from {list(BLOCK_POOLINGS)}")
    return m[1], int(m[2]) if m[2] is not None else -1, m[3]


def check_block(text: str, where: str, models: tuple[ModelConfig, ...]) -> None:
    """A named block must name a configured model, a known pooling and a layer within the model's depth.

    The depth comes from the model's config.json (no weights are read); a model whose config is not
    available yet (an unprepared embedded model, a hub id) is checked when train opens its features.
    """
    from pipeline.models.registry import source_depth

    name, layer, _ = parse_block(text, where)
    by_name = {m.name: m for m in models}
    if name not in by_name:
        raise ConfigError(
            f"{where}: model {name!r} of {text!r} is not in [[models]]; configured: {sorted(by_name)}; add it and run `make extract`"
        )
    depth = source_depth(by_name[name].source)
    if depth is not None and not -(depth + 1) <= layer <= depth:
        raise ConfigError(
            f"{where}: layer {layer} of {text!r} is out of range 0..{depth} (or -1..-{depth + 1}) for {name} ({depth} layers)"
        )


_PATTERNS = {
    "name": (r"^[A-Za-z0-9][A-Za-z0-9._-]*$", "letters, digits, '.', '_' and '-'"),
    "device": (r"^(auto|cpu|mps|cuda(:[0-9]+)?)$", "auto, cpu, mps, cuda or cuda:N"),
    "scheduler": (r"^(threads|synchronous|processes|tcp://.+|tls://.+)$", "threads, synchronous, processes or tcp://host:port"),
    "extract_scheduler": (r"^(local|tcp://.+|tls://.+)$", "local or tcp://host:port (tls://host:port)"),
}


def _check_constraints(where: str, value: Any, meta: dict) -> None:
    import re

    items = value if isinstance(value, tuple) else (value,)
    if meta.get("nonempty") and isinstance(value, tuple) and not value:
        raise ConfigError(f"{where}: must not be empty")
    if meta.get("nonempty_str") and isinstance(value, str) and not value.strip():
        raise ConfigError(f"{where}: must not be empty")
    if "constraint" in meta and not meta["constraint"].check(value):
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{where}: {shown!r} is invalid; expected {meta['constraint'].allowed}")
    if "max_items" in meta and isinstance(value, tuple) and len(value) > meta["max_items"]:
        raise ConfigError(f"{where}: {len(value)} values given; at most {meta['max_items']} allowed")
    if meta.get("unique") and isinstance(value, tuple) and len(set(value)) != len(value):
        raise ConfigError(f"{where}: {list(value)} has duplicates; each value may appear once")
    for v in items:
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{where}: {v!r} is not allowed; choose from {list(meta['choices'])}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if meta.get("finite") and not math.isfinite(v):
                raise ConfigError(f"{where}: {v!r} must be finite")
            if ("min" in meta or "max" in meta) and math.isnan(v):  # nan passes every comparison
                raise ConfigError(f"{where}: {v!r} is not a number; allowed: {meta.get('min', '-inf')} to {meta.get('max', 'inf')}")
            if "min" in meta and v < meta["min"]:
                raise ConfigError(f"{where}: {v!r} is below the minimum {meta['min']}")
            if "max" in meta and v > meta["max"]:
                raise ConfigError(f"{where}: {v!r} is above the maximum {meta['max']}")
        if "pattern" in meta and isinstance(v, str):
            pattern, allowed = _PATTERNS[meta["pattern"]]
            if not re.match(pattern, v):
                raise ConfigError(f"{where}: {v!r} is not valid; allowed: {allowed}")


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Convert a TOML value to the annotated type, or say which field is wrong and why."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(f"{where}[{i}]", v, inner) for i, v in enumerate(value))
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {_coerce(where, k, kt): _coerce(f"{where}.{k}", v, vt) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unions are not supported in configs ({where})")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build ``cls`` from a TOML table; unknown keys are errors, not ignored."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed in [{where or 'top level'}]: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {key}: {f.metadata.get('help', '')}")
            continue
        value = _coerce(key, data[name], hints[name])
        _check_constraints(key, value, f.metadata)
        kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read and validate a TOML experiment config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: malformed TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    try:
        cfg = from_dict(ExperimentConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return dataclasses.replace(_resolve_paths(cfg, data, p), source=str(p))


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _resolve_path(value: str, config: Path, where: str) -> str:
    """A relative path from a config file, against the config's folder, so a run from any directory works.

    Configs written against the current directory still work where that path exists and the
    config-relative one does not (with a note saying how to write it)."""
    if not value or "://" in value or Path(value).is_absolute():
        return value
    beside = config.parent / value
    if not beside.exists() and Path(value).exists():
        log.warning(
            "%s: %s = %r is resolved against the current directory; write it relative to the config file "
            "(%s) so the config runs from any directory",
            config,
            where,
            value,
            os.path.relpath(Path(value).resolve(), config.parent.resolve()),
        )
        return str(Path(value).resolve())
    return str(beside.resolve())


def _resolve_paths(cfg: ExperimentConfig, data: dict, config: Path) -> ExperimentConfig:
    """Resolve the paths the file sets (data.path, data.files, score.keywords); defaults are the project's own."""
    raw_data, raw_score = data.get("data", {}), data.get("score", {})
    d = cfg.data
    if "path" in raw_data:
        d = dataclasses.replace(d, path=_resolve_path(d.path, config, "data.path"))
    if "files" in raw_data:
        d = dataclasses.replace(d, files={k: _resolve_path(v, config, f"data.files.{k}") for k, v in d.files.items()})
    sc = cfg.score
    if "keywords" in raw_score:
        sc = dataclasses.replace(sc, keywords=_resolve_path(sc.keywords, config, "score.keywords"))
    elif not Path(sc.keywords).is_absolute():
        sc = dataclasses.replace(sc, keywords=str(PROJECT_ROOT / sc.keywords))
    return dataclasses.replace(cfg, data=d, score=sc)


def from_record(data: dict) -> ExperimentConfig:
    """An ExperimentConfig from a `to_dict` record (a heads entry's lineage): the settings it was run with."""
    internal = {f.name for f in dataclasses.fields(ExperimentConfig) if f.metadata.get("internal")}
    return from_dict(ExperimentConfig, {k: v for k, v in data.items() if k not in internal})


def to_dict(cfg: Any) -> dict:
    """Plain JSON-able dict of a config (tuples become lists) for records next to outputs."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def field_help(cls: type) -> list[tuple[str, str, Any]]:
    """(name, help, default) rows, for --help epilogs and the README table."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        rows.append((f.name, f.metadata.get("help", ""), default))
    return rows
