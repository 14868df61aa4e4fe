"""Security of the read path: nothing executable is loaded from a store, remote code is opt-in, manifest
paths stay inside their entry, and published files are read-only."""

from __future__ import annotations

import ast
import json
import stat

import pytest
from reliability_helpers import ROOT

READ_PATH_PACKAGES = ("store", "stages", "pipeline")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _sources():
    for pkg in READ_PATH_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_no_pickle_on_the_read_path():
    """No unpickling module is imported and no pickle-capable loader is called (comments do not count)."""
    found = []
    for path, tree in _sources():
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{rel}:{node.lineno} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(f"{rel}:{node.lineno} from {node.module} import")
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                kwargs = {k.arg: k.value for k in node.keywords}
                if name in ("torch.load", "pd.read_pickle", "pandas.read_pickle", "np.loads", "numpy.loads"):
                    found.append(f"{rel}:{node.lineno} {name}()")
                if name in ("np.load", "numpy.load"):
                    ap = kwargs.get("allow_pickle")
                    if not (isinstance(ap, ast.Constant) and ap.value is False):
                        found.append(f"{rel}:{node.lineno} {name}() without allow_pickle=False")
                ap = kwargs.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    found.append(f"{rel}:{node.lineno} allow_pickle=True")
    assert not found, found


def test_trust_remote_code_is_never_hardcoded_true():
    """No from_pretrained passes a literal True; the runtime loader passes the config's value explicitly
    (transformers' own default is False, which the set-up conversion of the shipped GGUF relies on)."""
    calls, bad = 0, []
    for path, tree in _sources():
        runtime = path.name == "registry.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func).endswith("from_pretrained"):
                calls += 1
                v = {k.arg: k.value for k in node.keywords}.get("trust_remote_code")
                if (isinstance(v, ast.Constant) and v.value is True) or (runtime and v is None):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls and not bad, bad


@pytest.mark.parametrize("opt_in", [False, True])
def test_trust_remote_code_follows_the_config(opt_in, tmp_path, monkeypatch):
    import transformers

    from pipeline.config import ExtractConfig, ModelConfig
    from pipeline.models import ModelSpec
    from stages.extract.runner import load_for_extract

    assert ModelConfig(name="m", source="x").trust_remote_code is False
    seen = []

    class Stop(Exception):
        pass

    def record(*a, **kw):
        seen.append(kw.get("trust_remote_code", "missing"))
        raise Stop

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    spec = ModelSpec("local", "local", str(tmp_path), {"kind": "files", "sha256": "0" * 64})
    cfg = ModelConfig(name="m", source=str(tmp_path), trust_remote_code=opt_in)
    with pytest.raises(Stop):
        load_for_extract(cfg, spec, ExtractConfig(device="cpu"))()
    assert seen == [opt_in]


@pytest.mark.parametrize("name", ["../other/shard_00000.h5", "/etc/passwd", "..", "a/b", "a\\b", "x\x00y", "...h5", ""])
@pytest.mark.parametrize("field", ["file", "table", "name"])
def test_manifest_paths_cannot_escape(name, field, reference):
    from store import CorruptEntryError
    from store import manifest as mf

    path = reference.store / "entries" / reference.key / "manifest.json"
    m = json.loads(path.read_text())
    if field == "name":
        m["files"].append({"name": name, "sha256": "0" * 64, "bytes": 1})
    else:
        m["shards"][0][field] = name
    with pytest.raises(CorruptEntryError) as ei:
        mf.loads(json.dumps(m).encode(), reference.key, str(path))
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("key", ["../../etc", "ABCDEF0123456789", "0" * 7, "0" * 16 + "/.."])
def test_store_keys_cannot_escape(key, reference):
    from store import Store

    with pytest.raises(ValueError, match="invalid store key"):
        Store(reference.store).open(key)


def test_a_short_hex_key_is_a_prefix_and_names_no_path(reference):
    """15 hex characters are a key prefix now (like git): looked up among the entries, never used as a path."""
    from store import Store, StoreError

    with pytest.raises(StoreError, match="no entry 000000000000000 in"):
        Store(reference.store).open("0" * 15)


def test_entry_files_are_only_those_in_the_manifest(reference, tmp_path):
    from reliability_helpers import copy_store

    from store import Store

    store = copy_store(reference.store, tmp_path / "store")
    (store / "entries" / reference.key / "extra.bin").write_bytes(b"not listed")
    entry = Store(store).open(reference.key, verify=True)
    with pytest.raises(KeyError):
        entry.read_file("extra.bin")
    with pytest.raises(KeyError):
        entry.read_file("../" + reference.key + "/manifest.json")


def test_published_files_are_read_only(reference):
    files = [p for p in (reference.store / "entries").rglob("*") if p.is_file()]
    assert files
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert all(m == 0o444 for m in modes.values()), {n: oct(m) for n, m in modes.items() if m != 0o444}
