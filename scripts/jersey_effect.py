"""Effect of the shirt-number ranking step (`jersey.number_agreement`) on synthetic players, as mAP before/after.

Synthetic players carry visible shirt numbers with ground truth in numbers.csv. Base distances come from
an embedder (`--run RUN_DIR` for a trained one; default an untrained tiny open_clip ViT, a weak baseline
like an early checkpoint). Shirt numbers come from:
  - the zero-shot reader with the tiny RANDOM CLIP (`--reader-model`, meaningless without real weights,
    which cannot be downloaded here): shows the step leaves a non-confident reader alone;
  - an oracle (the truth) with x% of crops corrupted to a random wrong number, read confidently
    ("confident wrong"), or with the corrupted crops given probability 0.3 ("flagged": a calibrated
    reader that knows when it is unsure, so the threshold filters them out).
The reference figure is the mAP without the step, measured in the same run; the ratio is after / before.

    python scripts/jersey_effect.py [--players 150] [--bonus 0.1] [--penalty 0.1] [--threshold 0.5]
    python scripts/jersey_effect.py --data DATA_DIR --run RUN_DIR   # a trained baseline on prepared synthetic data
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from submit import jersey
from submit.embedding import embed_views
from submit.metrics import evaluate_distances
from submit.prepare import prepare
from submit.synthetic import make_dataset
from submit.device import cpu_model



def base_distances(data_dir: Path, q: pd.DataFrame, g: pd.DataFrame, run: str | None, model: str) -> np.ndarray:
    """Cosine distances (1 - cos) from a trained run or an untrained backbone (seeded)."""
    from submit.explain import load_model

    torch.manual_seed(0)
    net = load_model(run_dir=run, model=None if run else model)
    feats = [embed_views(net, data_dir, rows, [(1.0, False)], workers=0, progress=False) for rows in (q, g)]
    return (1.0 - feats[0] @ feats[1].T).astype(np.float32)


def oracle(truth: np.ndarray, noise: float, flagged: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Truth with a `noise` share corrupted to a random different number; prob 1.0, or 0.3 when flagged."""
    numbers, probs = truth.copy(), np.ones(len(truth))
    bad = rng.random(len(truth)) < noise
    numbers[bad] = (truth[bad] + rng.integers(1, 100, size=int(bad.sum()))) % 100
    if flagged:
        probs[bad] = 0.3
    return numbers, probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--players", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="A prepared synthetic DATA_DIR to reuse (else one is generated).")
    ap.add_argument("--run", default=None, help="Trained run dir for the base distances.")
    ap.add_argument("--model", default="open_clip:reident-tiny-vit", help="Untrained backbone when no --run.")
    ap.add_argument("--reader-model", default="reident-tiny-vit", help="open_clip model of the zero-shot reader.")
    ap.add_argument("--reader-pretrained", default=None)
    ap.add_argument("--bonus", type=float, default=0.1)
    ap.add_argument("--penalty", type=float, default=0.1)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5, help="Noise draws averaged per noisy-oracle row.")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            data_dir = Path(args.data)
        else:
            src = make_dataset(Path(tmp) / "src", players=args.players, seqs=2, frames=5, seed=args.seed)
            data_dir = prepare(src, Path(tmp) / "data", progress=False).data_dir
        q = jersey.select_rows(data_dir, "test", "query")
        g = jersey.select_rows(data_dir, "test", "gallery")
        dist = base_distances(data_dir, q, g, args.run, args.model)
        truth = jersey.match_truth([*q["path"], *g["path"]], jersey.read_truth(data_dir / "numbers.csv"))
        nq = len(q)

        def score(d: np.ndarray) -> dict:
            return evaluate_distances(d, q["pid"].to_numpy(), g["pid"].to_numpy())

        def step(numbers: np.ndarray, probs: np.ndarray) -> np.ndarray:
            return jersey.number_agreement(dist, numbers[:nq], probs[:nq], numbers[nq:], probs[nq:],
                                           args.bonus, args.penalty, args.threshold)

        before = score(dist)
        rows = []
        params = {"model": args.reader_model, "pretrained": args.reader_pretrained, "bonus": args.bonus,
                  "penalty": args.penalty, "threshold": args.threshold}
        zs = jersey.apply_jersey(dist, q, g, data_dir, params, progress=False)
        rows.append(("zero-shot tiny random CLIP", score(zs)))
        rng = np.random.default_rng(args.seed)
        for flagged in (False, True):
            for noise in (0.0, 0.1, 0.3, 0.5):
                if flagged and noise == 0.0:
                    continue
                kind = "flagged" if flagged else "confident wrong"
                draws = [score(step(*oracle(truth, noise, flagged, rng))) for _ in range(args.repeats if noise else 1)]
                mean = {k: float(np.mean([d[k] for d in draws])) for k in ("mAP", "rank1")}
                rows.append((f"oracle, {noise:.0%} corrupted ({kind})", mean))

    shared = len(set(truth[:nq])) < nq
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; date: {datetime.date.today().isoformat()}")
    print(f"data: synthetic ({args.data or f'{args.players} players, seed {args.seed}'}), test split {nq} queries x {len(g)} gallery "
          f"({'some' if shared else 'no'} shirt numbers shared between test players)")
    print(f"base distances: {'run ' + args.run if args.run else 'untrained ' + args.model}; "
          f"step: bonus {args.bonus}, penalty {args.penalty}, threshold {args.threshold}; "
          f"noisy rows: mean of {args.repeats} draws")
    print(f"{'numbers from':44s} {'mAP':>7s} {'rank-1':>7s} {'ratio mAP':>10s}")
    print(f"{'reference: no jersey step':44s} {before['mAP']:7.4f} {before['rank1']:7.4f} {1.0:10.3f}")
    for name, m in rows:
        print(f"{name:44s} {m['mAP']:7.4f} {m['rank1']:7.4f} {m['mAP'] / before['mAP']:10.3f}")


if __name__ == "__main__":
    main()
