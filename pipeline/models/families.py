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
    decoder: bool = False  # causal attention: the first token becomes an attention sink

    def block_list(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return _get(model, self.blocks)

    def ffn_projection(self, block: torch.nn.Module) -> torch.nn.Module:
        return _get(block, self.ffn_out)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "AutoModel", "layers", "mlp.down_proj", "silu(gate) * up", decoder=True),
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
    return int(getattr(config, "num_hidden_layers", None) or config.num_layers)


def hidden_size(config) -> int:
    return int(getattr(config, "hidden_size", None) or config.d_model)


def ffn_size(config) -> int:
    return int(getattr(config, "intermediate_size", None) or config.d_ff)


# Firing rules, by FFN kind. ReLU outputs are exactly zero or positive, so "> 0" is exact
# non-zero (the Lazy Neuron definition). GELU is a smoothed ReLU: "> 0" is "pre-activation > 0",
# and a small positive threshold asks for a clear activation. A gated FFN's act(gate) * up is
# negative about half the time whatever the input, so its sign carries no information: the rule
# is on magnitude, with thresholds at the scale of its values (SmolLM2-135M: median |a| about
# 0.02-0.2 from the first to the last layer, so 0.1 fires on roughly 20-70%, 0.5 on 1-30%).
RULE_GT = "gt"  # fires when a > t
RULE_ABS = "abs_gt"  # fires when |a| > t
RULE_TEXT = {RULE_GT: "a > t", RULE_ABS: "|a| > t"}
FFN_KINDS = {"relu": (RULE_GT, (0.0,)), "gelu": (RULE_GT, (0.0, 0.1)), "gated": (RULE_ABS, (0.1, 0.5))}


def ffn_kind(family: Family, config: dict) -> str:
    """'relu', 'gelu' or 'gated', from the family and its config.json (an empty dict: the defaults)."""
    if family.name == "llama":
        return "gated"
    if family.name == "t5":
        proj = str(config.get("feed_forward_proj", "relu"))
        return "gated" if proj.startswith("gated") else ("relu" if proj == "relu" else "gelu")
    return "relu" if str(config.get("hidden_act", "gelu")) == "relu" else "gelu"


def firing_rule(kind: str) -> str:
    return FFN_KINDS[kind][0]


def default_thresholds(kind: str) -> tuple[float, ...]:
    return FFN_KINDS[kind][1]


SINK_AUTO, SINK_NONE = "auto", "none"


def sink_token_id(tokenizer, family: Family, setting: str, model_config=None) -> int | None:
    """The token to prepend as attention sink, or None.

    A causal model dumps attention on its first token, whose hidden state then grows to a
    norm 100x that of other tokens (SmolLM2, whose tokenizer adds no BOS, does this to the
    first word) and dominates a mean over tokens. With 'auto' a decoder whose tokenizer
    adds no BOS gets the model's BOS in front, so no real token is the sink.
    """
    if setting == SINK_NONE or (setting == SINK_AUTO and not family.decoder):
        return None
    if setting == SINK_AUTO:
        sink = tokenizer.bos_token_id
        if sink is None and model_config is not None:
            sink = getattr(model_config, "bos_token_id", None)
        if sink is None:
            return None
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        return None if probe and probe[0] == sink else int(sink)
    sink = tokenizer.convert_tokens_to_ids(setting)
    if sink is None or (sink == tokenizer.unk_token_id and setting != tokenizer.unk_token):
        raise ModelError(
            f"models.sink: {setting!r} is not a token of this model's vocabulary; use 'auto', 'none' or one of its tokens "
            f"(e.g. {tokenizer.bos_token or tokenizer.eos_token!r})"
        )
    return int(sink)
