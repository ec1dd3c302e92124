"""Post-processing of re-id features: k-reciprocal re-ranking, alpha query expansion, DBA, PCA whitening.

Public API (all re-exported here; the modules behind it are private):
- `k_reciprocal` (`_kreciprocal`: the algorithm and its neighbour sets, exact without any (N, N) matrix; its tile
  pass and worker threads in `_tile_pass` / `_threads`, distances in `_distances`);
- `query_expansion`, `database_augmentation`, `cosine_distance` (`_expansion`), `pca_whitening` (`_whitening`);
- `STEPS`, the registry of post-processing steps, and the one chain that runs them: `run_chain` (stage by
  stage) and `postprocess` (a list of `{name: params}`, the final distances) (`_chain`);
- `estimate_rerank_memory`, `available_memory` (`_memory`: the estimate behind the early refusal);
- `number_agreement` (`_numbers`): the shirt-number step on final distances (the numbers are read by `jersey`).

Importing this package does not import torch (faiss is imported when QE or DBA first runs).
"""

from __future__ import annotations

from submit.reranking._chain import STEPS, Stage, Step, check_chain, postprocess, run_chain, step_named
from submit.reranking._expansion import cosine_distance, database_augmentation, query_expansion
from submit.reranking._kreciprocal import k_reciprocal
from submit.reranking._memory import available_memory, estimate_rerank_memory
from submit.reranking._numbers import NO_NUMBER, number_agreement
from submit.reranking._whitening import pca_whitening

__all__ = [
    "k_reciprocal",
    "query_expansion",
    "database_augmentation",
    "pca_whitening",
    "postprocess",
    "run_chain",
    "cosine_distance",
    "estimate_rerank_memory",
    "available_memory",
    "STEPS",
    "Step",
    "Stage",
    "step_named",
    "check_chain",
    "number_agreement",
    "NO_NUMBER",
]
