"""The CLI edge: help for every command, one-line `error:` messages for user mistakes, tracebacks only with --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pipeline_helpers import PROJECT_ROOT


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("FEATURESTORE", None)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


HELP_COMMANDS = [
    [],
    ["extract"],
    ["score"],
    ["train"],
    ["run"],
    ["predict"],
    ["store"],
    ["store", "ls"],
    ["store", "verify"],
    ["store", "gc"],
    ["store", "rm"],
    ["store", "push"],
    ["store", "pull"],
]


@pytest.mark.parametrize("cmd", HELP_COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help(cmd):
    proc = run_cli(*cmd, "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m pipeline")
    assert proc.stderr == ""


def test_help_lists_every_command():
    out = run_cli("--help").stdout
    for c in ("extract", "score", "train", "run", "predict", "store"):
        assert c in out
    store_out = run_cli("store", "--help").stdout
    for c in ("ls", "verify", "gc"):
        assert c in store_out


def test_no_command_is_a_usage_error():
    proc = run_cli()
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


def test_bad_shard_is_a_usage_error():
    proc = run_cli("extract", "--shard", "3/2")
    assert proc.returncode == 2
    assert "I/N" in proc.stderr


def test_config_typo_key(make_config, tmp_path):
    cfg = make_config(**{"extract.max_lenght": 12})
    proc = run_cli("extract", "--config", str(cfg), "--store", str(tmp_path / "store"))
    line = assert_one_line_error(proc, "unknown key extract.max_lenght", "max_length", str(cfg))
    assert "allowed" in line


def test_config_typo_key_in_models_score(make_config, tmp_path):
    cfg = make_config(**{"models.0.sourse": "x"})
    proc = run_cli("score", "--config", str(cfg), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "unknown key models[0].sourse", "source")


def test_missing_config_file(tmp_path):
    proc = run_cli("train", "--config", str(tmp_path / "nope.toml"), "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "config file not found", "nope.toml")


def test_missing_data_file(make_config, tmp_path):
    cfg = make_config(**{"data.path": str(tmp_path / "no-data-here")})
    proc = run_cli("extract", "--config", str(cfg), "--store", str(tmp_path / "store"))
    assert_one_line_error(proc, "no file for split 'train'", "no-data-here")


def test_missing_explicit_data_file(make_config, tmp_path):
    cfg = make_config(**{"data.files": {"dev": str(tmp_path / "gone.tsv")}})
    proc = run_cli("extract", "--config", str(cfg), "--store", str(tmp_path / "store"))
    assert_one_line_error(proc, "data file not found", "gone.tsv")


def test_unknown_model(make_config, tmp_path):
    cfg = make_config(**{"models.0.source": "no-such-org/no-such-model"})
    proc = run_cli("extract", "--config", str(cfg), "--store", str(tmp_path / "store"))
    assert_one_line_error(proc, "'no-such-org/no-such-model'", "huggingface-cli download no-such-org/no-such-model")


def test_unknown_model_with_debug_shows_traceback(make_config, tmp_path):
    cfg = make_config(**{"models.0.source": "no-such-org/no-such-model"})
    proc = run_cli("extract", "--debug", "--config", str(cfg), "--store", str(tmp_path / "store"))
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ModelError" in proc.stderr
    assert "no-such-org/no-such-model" in proc.stderr


def test_config_error_with_debug_shows_traceback(make_config, tmp_path):
    cfg = make_config(**{"extract.storage_dtype": "float64"})
    proc = run_cli("score", "--debug", "--config", str(cfg), "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError" in proc.stderr and "float64" in proc.stderr


def test_unknown_model_name_in_models_flag(make_config, tmp_path):
    cfg = make_config()
    proc = run_cli("extract", "--config", str(cfg), "--store", str(tmp_path / "store"), "--models", "bert,gpt")
    assert_one_line_error(proc, "--models", "'gpt'")


def test_predict_without_texts():
    proc = run_cli("predict", "--head", "fusion", "--store", "/nonexistent-store-for-test")
    assert_one_line_error(proc, "predict: give texts")


def test_store_ls_json_on_empty_store(tmp_path):
    proc = run_cli("store", "ls", "--json", "--store", str(tmp_path / "empty-store"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # valid JSON, and nothing in it
    assert isinstance(data, (list, dict)) and not data


def test_store_ls_and_verify_on_empty_store(tmp_path):
    store = str(tmp_path / "empty-store")
    assert run_cli("store", "ls", "--store", store).returncode == 0
    assert run_cli("store", "verify", "--store", store).returncode == 0
    assert run_cli("store", "gc", "--dry-run", "--store", store).returncode == 0


def test_store_ls_refuses_an_unknown_kind_instead_of_listing_nothing(tmp_path):
    proc = run_cli("store", "ls", "--kind", "head", "--store", str(tmp_path / "s"))
    assert proc.returncode == 2 and "invalid choice: 'head'" in proc.stderr, proc.stderr
    assert all(kind in proc.stderr.rpartition("choose from")[2] for kind in ("features", "scores", "heads")), proc.stderr


def _store_with_entries(path, n=2):
    from store import Store, fingerprint

    store = Store(path)
    keys = []
    for i in range(n):
        desc = {"kind": "features", "dataset": {"name": "sst2", "split": "train"}, "model": {"name": f"m{i}"}}
        w = store.writer(fingerprint(desc), desc, n_shards=0)
        w.write_file("table.json", b"{}")
        keys.append(w.commit().key)
    return keys


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("layerstore 0.1.0"), proc


def test_console_script_is_the_cli():
    """pyproject's `layerstore` script is `pipeline.cli:main`, which `python -m pipeline` runs too."""
    import tomllib

    from pipeline import cli

    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["layerstore"].partition(":")
    assert (module, attr) == ("pipeline.cli", "main") and getattr(cli, attr) is cli.main
    assert "from pipeline.cli import main" in (PROJECT_ROOT / "pipeline" / "__main__.py").read_text()


def test_store_ls_into_a_closed_pipe_exits_quietly(tmp_path):
    _store_with_entries(tmp_path / "s", 3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "store", "ls", "--store", str(tmp_path / "s")],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # like `| head` that has already exited
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_store_key_prefix_errors_are_one_line(tmp_path):
    a, b = _store_with_entries(tmp_path / "s")
    store = str(tmp_path / "s")
    assert_one_line_error(run_cli("store", "verify", a[:5], "--store", store), "invalid store key", "8+")
    assert_one_line_error(run_cli("store", "verify", "0" * 8 if not a.startswith("0" * 8) else "f" * 8, "--store", store), "no entry")
    ok = run_cli("store", "verify", a[:8], "--store", store)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 1 entry verified"), ok
    listed = run_cli("store", "ls", "--model", "m1", "--store", store)
    assert b[:12] in listed.stdout and a[:12] not in listed.stdout and "total: 1 entry" in listed.stdout
    removed = run_cli("store", "rm", b[:8], "--store", store)
    assert removed.returncode == 0 and "removed 1 entry" in removed.stdout
    assert_one_line_error(run_cli("store", "rm", b[:8], "--store", store), "no entry")


def test_quiet_silences_library_warnings(monkeypatch):
    import argparse
    import logging
    import warnings

    from pipeline.cli import _setup_logging

    for var in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)  # restored (removed) after the test
    with warnings.catch_warnings():
        _setup_logging(argparse.Namespace(debug=False, quiet=True))
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("a library's UserWarning", UserWarning, stacklevel=1)
        assert caught == []
        assert not logging.getLogger("transformers").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("distributed.worker").isEnabledFor(logging.WARNING)
    for name in ("transformers", "distributed", "torch", "sklearn"):
        logging.getLogger(name).setLevel(logging.NOTSET)
