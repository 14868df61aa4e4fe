"""`store ...` commands of the CLI: the store alone, so they start without importing models or stages."""

from __future__ import annotations

import argparse

from pipeline.version import code_version
from store import Store, commands


def open_store(url: str):
    """The store at a path or fsspec URL; entries written through it record this code version.

    s3:// URLs need s3fs (`pip install .[s3]`); credentials and the endpoint come from the usual
    AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server).
    """
    return Store(url, code_version=code_version())


def store_command(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    if args.store_command == "ls":
        print(commands.ls(store, as_json=args.json, dataset=args.dataset, split=args.split, model=args.model, kind=args.kind))
        return 0
    if args.store_command == "rm":
        print(commands.rm(store, args.keys, force=args.force))
        return 0
    if args.store_command == "verify":
        text, code = commands.verify(store, args.keys or None)
        print(text)
        return code
    if args.store_command == "gc":
        print(commands.gc(store, grace_seconds=args.grace_hours * 3600, dry_run=args.dry_run))
        return 0
    if args.store_command in ("push", "pull"):
        other = open_store(args.other)
        src, dst = (store, other) if args.store_command == "push" else (other, store)
        print(commands.copy(src, dst, args.keys or None))
        return 0
    raise AssertionError(args.store_command)
