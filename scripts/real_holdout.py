"""Make a tuning data dir from a prepared one: some TRAIN identities become a held-out 'test' split.

Hyper-parameters of the real-image recipes are chosen on this split, never on the real test split (50
queries, the reported figure) nor the challenge split (no ground truth). Like the real test split, the
query and its matches come from different sequences (race locations): for each held-out identity with
two or more sequences, the query is the first frame of its last sequence and the gallery holds its
images from the other sequences; every other train identity keeps training. Images are symlinked.

The construction lives in `submit.holdout` (`holdout_split`, `write_holdout`); OUT_DIR also gets
`holdout.json`, the record of where the split came from and which identities it holds out. Rerunning with
the same arguments reuses OUT_DIR; other arguments for an existing OUT_DIR are refused.

    python scripts/real_holdout.py PREPARED_DATA_DIR OUT_DIR [--ids 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

from submit.errors import SubmitError
from submit.holdout import write_holdout
from submit.manifest import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--ids", type=int, default=60, help="held-out train identities (query count)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        out = write_holdout(args.data_dir, args.out_dir, args.ids, args.seed)
        df = read_manifest(out)
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    test = df[df["split"] == "test"]
    print(f"{out}: train {int((df['split'] == 'train').sum())} images, held-out {args.ids} ids: "
          f"{int((test['role'] == 'query').sum())} queries x {int((test['role'] == 'gallery').sum())} gallery")


if __name__ == "__main__":
    main()
