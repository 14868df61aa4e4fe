"""Where each supported architecture keeps its blocks and its FFN output projection.

Adding a family is one entry in ``FAMILIES``: the HF ``model_type`` values it covers, the
class that loads its base (headless) model, the path to its list of blocks, and the path
inside a block to the FFN output projection whose *input* is the FFN activation
(post-activation for BERT/RoBERTa/T5, act(gate) * up for Llama).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import ModelError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    loader: str
    blocks: str
    ffn_out: str
    activation: str

    def block_list(self, model: "torch.nn.Module") -> "torch.nn.ModuleList":
        return _get(model, self.blocks)

    def ffn_projection(self, block: "torch.nn.Module") -> "torch.nn.Module":
        return _get(block, self.ffn_out)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "AutoModel", "layers", "mlp.down_proj", "silu(gate) * up"),
    Family("bert", ("bert",), "AutoModel", "encoder.layer", "output.dense", "gelu"),
    Family("roberta", ("roberta",), "AutoModel", "encoder.layer", "output.dense", "gelu"),
    Family("mpnet", ("mpnet",), "AutoModel", "encoder.layer", "output.dense", "gelu"),
    Family("t5", ("t5",), "T5EncoderModel", "encoder.block", "layer.1.DenseReluDense.wo", "relu (or gated-gelu for v1.1)"),
)


def _get(obj: object, dotted: str):
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def family_of(config) -> Family:
    """Recognise the family from the model config (never from the model's name)."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ModelError(f"unsupported architecture model_type={model_type!r}; supported: {supported}")


def n_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers"))


def hidden_size(config) -> int:
    return int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))


def ffn_size(config) -> int:
    return int(getattr(config, "intermediate_size", None) or getattr(config, "d_ff"))
