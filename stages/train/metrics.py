"""Rows of the train table: one per head and reported split, the same columns for every kind of head."""

from __future__ import annotations

TRAIN_COLUMNS = ["dataset", "head", "models", "layers", "pooling", "split", "accuracy", "macro_f1", "n_params", "fit_seconds"]


def metric_rows(
    dataset: str, head: str, models: str, layers: str, pooling: str, metrics: dict, n_params: int, seconds: float
) -> list[dict]:
    """The dev and test rows of one fitted head; ``metrics`` holds ``{dev,test}_{accuracy,macro_f1}``."""
    return [
        {
            "dataset": dataset,
            "head": head,
            "models": models,
            "layers": layers,
            "pooling": pooling,
            "split": split,
            "accuracy": metrics[f"{split}_accuracy"],
            "macro_f1": metrics[f"{split}_macro_f1"],
            "n_params": n_params,
            "fit_seconds": seconds,
        }
        for split in ("dev", "test")
    ]
