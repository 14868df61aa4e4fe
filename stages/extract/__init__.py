"""Extract: every layer's pooled hidden states and FFN activations, one forward pass per batch."""

from stages.extract.runner import EntryStats, NonFiniteError, ShardArrays, ShardResult, extract_entry, extract_shard, load_for_extract

__all__ = ["EntryStats", "NonFiniteError", "ShardArrays", "ShardResult", "extract_entry", "extract_shard", "load_for_extract"]
