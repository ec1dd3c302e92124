"""Choose post-processing on held-out TRAIN identities: score post-processing chains on trained runs.

Embeds each run's held-out 'test' split (query + gallery) and its training split once (the recipe's TTA; the
on-disk feature cache makes reruns instant), then scores every chain of the grid below per member and on the
mean fusion of the members, with the members post-processed one by one (`postprocess_on: member`) or the
concatenated features post-processed once (`postprocess_on: fused`). Prints one markdown table, best last.
Never point it at the real test or challenge split: DATA must be a `scripts/real_holdout.py` folder.

    python scripts/holdout_postprocess.py HOLDOUT_DATA RUN [RUN ...] [--checkpoint last]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from submit import reranking
from submit.ensembling import MemberSpec, fuse
from submit.manifest import read_manifest, select
from submit.metrics import evaluate_distances
from submit.predict import member_features, train_features, weighted_concat

RERANK = {"rerank": {"k1": 10, "k2": 3, "lambda": 0.3}}
CHAINS: dict[str, list[dict]] = {
    "cosine": [],
    "re-rank k1=10 (today)": [RERANK],
    "re-rank k1=6": [{"rerank": {"k1": 6, "k2": 3, "lambda": 0.3}}],
    "re-rank k1=15": [{"rerank": {"k1": 15, "k2": 3, "lambda": 0.3}}],
    "re-rank k1=10, lambda 0.1": [{"rerank": {"k1": 10, "k2": 3, "lambda": 0.1}}],
    "re-rank k1=10, lambda 0.5": [{"rerank": {"k1": 10, "k2": 3, "lambda": 0.5}}],
    "whiten(train, all) + re-rank": [{"whiten": {"fit_on": "train"}}, RERANK],
    "whiten(train, 256) + re-rank": [{"whiten": {"dim": 256, "fit_on": "train"}}, RERANK],
    "whiten(train, 128) + re-rank": [{"whiten": {"dim": 128, "fit_on": "train"}}, RERANK],
    "whiten(train, 256)": [{"whiten": {"dim": 256, "fit_on": "train"}}],
    "DBA k=3 + QE k=1 + re-rank": [{"dba": {"k": 3}}, {"qe": {"k": 1}}, RERANK],
    "QE k=1 + re-rank": [{"qe": {"k": 1}}, RERANK],
    "whiten(train, 256) + DBA k=3 + QE k=1 + re-rank": [{"whiten": {"dim": 256, "fit_on": "train"}},
                                                        {"dba": {"k": 3}}, {"qe": {"k": 1}}, RERANK],
}


def features(run: Path, data_dir: Path, checkpoint: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, gallery, train) features of one run, embedded as `predict` embeds a member (its recipe's TTA,
    the on-disk cache)."""
    member = MemberSpec(run=str(run), checkpoint=checkpoint, name=run.name)
    df = read_manifest(data_dir)
    query, gallery = select(df, "test", "query"), select(df, "test", "gallery")
    both = member_features(member, data_dir, pd.concat([query, gallery], ignore_index=True), None, 0, False)
    train = train_features(member, data_dir, None, 0, False)()
    return both[:len(query)], both[len(query):], train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--checkpoint", default="last")
    args = parser.parse_args()
    df = read_manifest(args.data_dir)
    q_ids = select(df, "test", "query")["pid"].to_numpy()
    g_ids = select(df, "test", "gallery")["pid"].to_numpy()
    feats = [features(run, args.data_dir, args.checkpoint) for run in args.runs]
    rows = []
    for name, chain in CHAINS.items():
        per_member = [reranking.postprocess(q, g, chain, t) for q, g, t in feats]
        scores = [100 * evaluate_distances(d, q_ids, g_ids)["mAP"] for d in per_member]
        fused_member = 100 * evaluate_distances(fuse(per_member, [1.0] * len(feats), "mean"), q_ids, g_ids)["mAP"]
        cat = [weighted_concat([f[i] for f in feats], [1.0] * len(feats)) for i in range(3)]
        fused_cat = 100 * evaluate_distances(reranking.postprocess(cat[0], cat[1], chain, cat[2]), q_ids, g_ids)["mAP"]
        rows.append((name, scores, fused_member, fused_cat))
    print(f"held-out {len(q_ids)} queries x {len(g_ids)} gallery; runs: {', '.join(r.name for r in args.runs)}; "
          f"checkpoint {args.checkpoint}; load average {os.getloadavg()[0]:.1f}\n")
    head = " | ".join(r.name for r in args.runs)
    print(f"| chain (mAP %) | {head} | mean of members' | on concatenated |")
    print("| --- |" + " ---: |" * (len(args.runs) + 2))
    for name, scores, fm, fc in sorted(rows, key=lambda r: r[2]):
        print(f"| {name} | " + " | ".join(f"{s:.2f}" for s in scores) + f" | {fm:.2f} | {fc:.2f} |")


if __name__ == "__main__":
    main()
