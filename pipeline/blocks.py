"""Feature blocks named ``model:layer:pooling`` (or ``model:pooler``): how configs and heads name their inputs."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import parse_block
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Block:
    """A feature block ``model:layer:pooling``; negative layers count from the top."""

    model: str
    layer: int
    pooling: str

    @classmethod
    def parse(cls, text: str) -> Block:
        """``model:layer:pooling``, or ``model:pooler`` for the stored pooler output (its one "layer" is 0)."""
        model, layer, pooling = parse_block(text, "train.fusion.inputs")
        return cls(model, 0 if pooling == "pooler" else layer, pooling)

    def resolved(self, n_layers: int) -> Block:
        if self.pooling == "pooler":
            return self
        layer = self.layer if self.layer >= 0 else n_layers + 1 + self.layer
        if not 0 <= layer <= n_layers:
            raise ConfigError(
                f"train.fusion.inputs: layer {self.layer} of {self.model} is out of range 0..{n_layers} (or -1..-{n_layers + 1})"
            )
        return Block(self.model, layer, self.pooling)

    def __str__(self) -> str:
        return f"{self.model}:pooler" if self.pooling == "pooler" else f"{self.model}:{self.layer}:{self.pooling}"


def candidate_layers(n_hidden: int, include_embeddings: bool = False) -> range:
    """Hidden-state indices layer selection may pick: block outputs 1..L, plus 0 (the embedding output) if asked.

    Xie et al. select among transformer block outputs; the embedding output is a lookup table, not a layer.
    """
    return range(0 if include_embeddings else 1, n_hidden) if n_hidden > 1 else range(n_hidden)


def among_candidates(df, include_embeddings: bool = False, *, layer: str = "layer", model: str | None = None):
    """The rows of a per-layer table whose layer selection may pick (``candidate_layers``).

    One model's table by default; with ``model``, a table of several models, each judged by its own
    deepest layer. ``layer`` names the column of hidden-state indices (integers or their strings).
    """
    if df.empty:
        return df
    layers = df[layer].astype(int)
    deepest = layers.groupby(df[model]).transform("max") if model else [int(layers.max())] * len(df)
    return df[[lay in candidate_layers(int(top) + 1, include_embeddings) for lay, top in zip(layers, deepest)]]
