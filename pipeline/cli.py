"""``python -m pipeline extract|score|train|run|predict|store ...``

Problems the user can fix print as one line (``error: ...``) and exit 1; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_CONFIG = "configs/default.toml"
KEYS_HELP = "entry keys, or unique prefixes of 8+ hex characters (as `store ls` shows them)"
ENTRY_KINDS = ("features", "scores", "heads")  # what the stages write (their descriptions' "kind")
log = logging.getLogger("pipeline")


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not (0 <= int(m[1]) < int(m[2])):
        raise argparse.ArgumentTypeError(f"--shard expects I/N with 0 <= I < N, got {text!r}")
    return int(m[1]), int(m[2])


def _extract_scheduler(text: str) -> str:
    if not re.fullmatch(r"local|(tcp|tls)://.+", text):
        raise argparse.ArgumentTypeError(f"--scheduler expects local or tcp://host:port, got {text!r}")
    return text


def _common(p: argparse.ArgumentParser, *, config: bool = True, out: bool = False) -> None:
    if config:
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment TOML (default: {DEFAULT_CONFIG})")
    p.add_argument(
        "--store",
        default=os.environ.get("FEATURESTORE", "featurestore"),
        help="store path or fsspec URL, e.g. /shared/fs or s3://bucket/prefix (default: $FEATURESTORE or ./featurestore)",
    )
    if out:
        p.add_argument("--out", default="reports", help="folder for tables, plots and report.md (default: reports)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")


def build_parser() -> argparse.ArgumentParser:
    prog = "layerstore" if os.path.basename(sys.argv[0] or "") == "layerstore" else "python -m pipeline"
    parser = argparse.ArgumentParser(prog=prog, description="Offline feature store for transformer internals.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "extract",
        help="run the models once over the corpus and cache per-layer features in the store",
        description="Pooled hidden states and FFN activations of every layer, one forward pass per batch; cached entries are skipped.",
    )
    _common(p)
    p.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="I/N",
        help="do only store shards with index %% N == I (run N processes for N GPUs/machines)",
    )
    p.add_argument("--models", default="", help="comma-separated model names from the config (default: all)")
    p.add_argument(
        "--scheduler",
        default=None,
        type=_extract_scheduler,
        metavar="local|tcp://HOST:PORT",
        help="compute the shards on the workers of this dask.distributed scheduler (overrides extract.scheduler; "
        "the store must be an absolute shared path or s3:// URL)",
    )

    p = sub.add_parser("score", help="variability and sparsity statistics, out of core with Dask")
    _common(p, out=True)
    p.add_argument(
        "--scheduler",
        default=None,
        help="threads, synchronous, or tcp://host:port of a dask.distributed scheduler (overrides score.scheduler)",
    )

    p = sub.add_parser("train", help="fit probes, variability-selected, top-layer and fused heads on cached features")
    _common(p, out=True)

    p = sub.add_parser("run", help="extract, score and train in order")
    _common(p, out=True)
    p.add_argument("--scheduler", default=None, help="Dask scheduler for score; a tcp://host:port one runs extract on that cluster too")

    p = sub.add_parser(
        "predict",
        help="label new text with a trained head (runs the needed models up to the layers it uses)",
        description="Everything predict needs (models, extract settings, class names) is read from the heads entry, "
        "so it runs from the store alone.",
    )
    _common(p)
    p.set_defaults(config=None)
    p.add_argument(
        "--head",
        required=True,
        help="a heads entry key or unique prefix, optionally KEY:NAME (needs only the store; `store ls --kind heads`), "
        f"or a head name from train.parquet (fusion, selected:bert:mean, probe:bert:3:mean) in --config's heads (default {DEFAULT_CONFIG})",
    )
    p.add_argument("--file", default=None, help="read texts from this file, one per line ('-' = standard input)")
    p.add_argument(
        "--format",
        choices=("tsv", "jsonl"),
        default="tsv",
        help="tsv: a header, then label, one probability column per class, text (tabs/newlines escaped); jsonl: one object per text",
    )
    p.add_argument("texts", nargs="*", help="texts to label")

    p = sub.add_parser("store", help="inspect and maintain a store: ls, verify, rm, gc, push, pull")
    ssub = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    q = ssub.add_parser("ls", help="list entries with human names, sizes and age, and a total")
    _common(q, config=False)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    for name, what in (
        ("dataset", "dataset name, e.g. sst2"),
        ("split", "split, e.g. train"),
        ("model", "model name from the config, e.g. bert"),
    ):
        q.add_argument(f"--{name}", default=None, help=f"only entries of this {what}")
    q.add_argument("--kind", default=None, choices=ENTRY_KINDS, help="only entries of this kind")
    q = ssub.add_parser("verify", help="rehash every file and check row counts; exit 1 naming each bad one")
    _common(q, config=False)
    q.add_argument("keys", nargs="*", help=KEYS_HELP + " (default: all)")
    q = ssub.add_parser("rm", help="remove entries (refuses one a writer holds a live lease on)")
    _common(q, config=False)
    q.add_argument("keys", nargs="+", help=KEYS_HELP)
    q.add_argument("--force", action="store_true", help="remove even an entry with a live lease (its writer then fails)")
    q = ssub.add_parser("gc", help="remove temporaries and unfinished entries older than the grace period (never committed ones)")
    _common(q, config=False)
    q.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    q.add_argument("--grace-hours", type=float, default=24.0, help="age below which unfinished work is kept (default: 24)")
    for name, helptext in (
        ("push", "copy entries from --store to --to, verified by hash"),
        ("pull", "copy entries from --from into --store, verified by hash"),
    ):
        q = ssub.add_parser(name, help=helptext)
        _common(q, config=False)
        q.add_argument("--to" if name == "push" else "--from", dest="other", required=True, help="the other store (path or URL)")
        q.add_argument("keys", nargs="*", help=KEYS_HELP + " (default: all committed)")
    return parser


def _version() -> str:
    from pipeline.version import code_version

    return code_version()


LIBRARY_LOGGERS = ("distributed", "urllib3", "h5py", "fsspec", "transformers", "matplotlib", "torch", "dask", "sklearn", "PIL")


def _setup_logging(args: argparse.Namespace) -> None:
    """INFO by default; -q: our warnings and errors only, and third-party libraries silenced (their log
    records below ERROR and their Python warnings); --debug: everything, with logger names."""
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s")
    if args.debug:
        return
    for noisy in LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR if args.quiet else logging.WARNING)
    if args.quiet:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # Dask workers and other child processes too
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _run(args: argparse.Namespace) -> int:
    if args.command == "store":
        from pipeline import store_cli

        return store_cli.store_command(args)
    from pipeline import orchestrate
    from pipeline.config import load_config

    if args.command == "predict":
        texts = list(args.texts)
        if args.file:
            texts += read_lines(args.file)
        if not texts:
            raise PipelineError("predict: give texts as arguments or --file (- for standard input)")
        head_is_key = re.fullmatch(r"[0-9a-f]{8,64}(:.+)?", args.head) is not None
        cfg = None if head_is_key and args.config is None else load_config(args.config or DEFAULT_CONFIG)
        return orchestrate.predict(cfg, args.store, args.head, texts, fmt=args.format)
    cfg = load_config(args.config)
    if args.command == "extract":
        models = [m for m in args.models.split(",") if m]
        return orchestrate.extract(cfg, args.store, shard=args.shard, models=models, progress=not args.quiet, scheduler=args.scheduler)
    if args.command == "score":
        return orchestrate.score(cfg, args.store, Path(args.out), scheduler=args.scheduler, progress=not args.quiet)
    if args.command == "train":
        return orchestrate.train(cfg, args.store, Path(args.out), progress=not args.quiet)
    if args.command == "run":
        on_cluster = args.scheduler if args.scheduler and args.scheduler.startswith(("tcp://", "tls://")) else None
        for step in (
            lambda: orchestrate.extract(cfg, args.store, progress=not args.quiet, scheduler=on_cluster),
            lambda: orchestrate.score(cfg, args.store, Path(args.out), scheduler=args.scheduler, progress=not args.quiet),
            lambda: orchestrate.train(cfg, args.store, Path(args.out), progress=not args.quiet),
        ):
            rc = step()
            if rc:
                return rc
        return 0
    raise AssertionError(args.command)


def read_lines(path: str) -> list[str]:
    """Texts one per line from a file or '-' (stdin); a blank line is refused like an empty text in
    extract, and bytes that are not UTF-8 are reported with their line and byte offset."""
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    where = "standard input" if path == "-" else path
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PipelineError(f"{where}: not valid UTF-8 at line {line}, byte offset {e.start}") from None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            raise PipelineError(f"{where}: line {i + 1} is empty; predict refuses empty texts as extract does")
    return lines


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        if args.debug:
            return _run(args)
        return _guarded(args)
    except BrokenPipeError:
        # `store ls | head`: the reader has what it wanted; point stdout at /dev/null so the
        # interpreter's final flush does not complain, and exit quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _interrupted_message(args: argparse.Namespace) -> str:
    if args.command in ("extract", "run"):
        return (
            "interrupted: the shards written so far are kept; run the same command again to resume "
            "(it continues at the first missing shard)"
        )
    return "interrupted: nothing was committed by the unfinished step; run the same command again"


def _guarded(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        print(_interrupted_message(args), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI edge turns known errors into one line
        if not _is_user_error(e):
            print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
            return 1
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1


def _is_user_error(e: Exception) -> bool:
    if isinstance(e, (PipelineError, OSError)):
        return True
    try:
        from store import StoreError
    except ImportError:
        return False
    return isinstance(e, StoreError)
