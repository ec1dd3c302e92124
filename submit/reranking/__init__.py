"""Post-processing of re-id features (a package; step 1 of its split: the former module, moved whole)."""

from __future__ import annotations

from typing import Any

from submit.reranking import _tile_pass as _impl
from submit.reranking._tile_pass import (__all__, available_memory, cosine_distance, database_augmentation,
                                         estimate_rerank_memory, k_reciprocal, postprocess, query_expansion)


def __getattr__(name: str) -> Any:
    """Private names of the former module, until the split moves them into their own modules."""
    return getattr(_impl, name)
