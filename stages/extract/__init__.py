"""Extract: every layer's pooled hidden states and FFN activations, one forward pass per batch."""

from stages.extract.key import FORMAT_VERSION, FeatureRequest
from stages.extract.runner import EntryStats, NonFiniteError, ShardArrays, ShardResult, extract_entry, load_for_extract

__all__ = ["FORMAT_VERSION", "EntryStats", "FeatureRequest", "NonFiniteError", "ShardArrays", "ShardResult", "extract_entry",
           "load_for_extract"]
