"""Feature blocks named ``model:layer:pooling``: how configs and heads name their inputs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Block:
    """A feature block ``model:layer:pooling``; negative layers count from the top."""

    model: str
    layer: int
    pooling: str

    @classmethod
    def parse(cls, text: str) -> "Block":
        m = re.fullmatch(r"([A-Za-z0-9._-]+):(-?\d+):(mean|first|last)", text)
        if not m:
            raise ConfigError(f"train.fusion.inputs: {text!r} is not model:layer:pooling (e.g. 'llama:-1:mean')")
        return cls(m[1], int(m[2]), m[3])

    def resolved(self, n_layers: int) -> "Block":
        layer = self.layer if self.layer >= 0 else n_layers + 1 + self.layer
        if not 0 <= layer <= n_layers:
            raise ConfigError(f"train.fusion.inputs: layer {self.layer} of {self.model} is out of range 0..{n_layers} (or -1..-{n_layers + 1})")
        return Block(self.model, layer, self.pooling)

    def __str__(self) -> str:
        return f"{self.model}:{self.layer}:{self.pooling}"


def candidate_layers(n_hidden: int, include_embeddings: bool = False) -> range:
    """Hidden-state indices layer selection may pick: block outputs 1..L, plus 0 (the embedding output) if asked.

    Xie et al. select among transformer block outputs; the embedding output is a lookup table, not a layer.
    """
    return range(0 if include_embeddings else 1, n_hidden) if n_hidden > 1 else range(n_hidden)
