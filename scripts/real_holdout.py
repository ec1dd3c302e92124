"""Make a tuning data dir from a prepared one: some TRAIN identities become a held-out 'test' split.

Hyper-parameters of the real-image recipes are chosen on this split, never on the real test split (50
queries, the reported figure) nor the challenge split (no ground truth). Like the real test split, the
query and its matches come from different sequences (race locations): for each held-out identity with
two or more sequences, the query is the first frame of its last sequence and the gallery holds its
images from the other sequences; every other train identity keeps training. Images are symlinked.

    python scripts/real_holdout.py PREPARED_DATA_DIR OUT_DIR [--ids 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from submit.manifest import read_manifest, write_manifest


def holdout(df: pd.DataFrame, n_ids: int, seed: int) -> pd.DataFrame:
    """Train rows only; `n_ids` multi-sequence train identities moved to a cross-sequence test split."""
    train = df[df["split"] == "train"].copy()
    seqs = train.groupby("pid")["seq"].nunique()
    candidates = np.sort(seqs[seqs >= 2].index.to_numpy())
    held = set(np.random.default_rng(seed).choice(candidates, size=n_ids, replace=False).tolist())
    rows = [train[~train["pid"].isin(held)]]
    for pid in sorted(held):
        own = train[train["pid"] == pid].sort_values(["seq", "frame"])
        last = own["seq"].max()
        query = own[own["seq"] == last].head(1).assign(role="query")
        gallery = own[own["seq"] != last].assign(role="gallery")
        rows += [query.assign(split="test", image_id=pid), gallery.assign(split="test", image_id=pid)]
    return pd.concat(rows, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--ids", type=int, default=60, help="held-out train identities (query count)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = holdout(read_manifest(args.data_dir), args.ids, args.seed)
    link = out / "images"
    if not link.exists():
        os.symlink(Path(args.data_dir).resolve() / "images", link)
    write_manifest(df, out)
    test = df[df["split"] == "test"]
    print(f"{out}: train {int((df['split'] == 'train').sum())} images, held-out {args.ids} ids: "
          f"{int((test['role'] == 'query').sum())} queries x {int((test['role'] == 'gallery').sum())} gallery")


if __name__ == "__main__":
    main()
