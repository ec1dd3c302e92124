"""Benchmark: our training loop's images/s against a bare forward+backward+AdamW step on pre-loaded tensors.

Ours is `submit.training.train` end to end on a prepared synthetic DATA_DIR: JPEG decoding and letterbox
in DataLoader workers, the pair sampler, joint-flip augmentation, the InfoNCE loss, the LR schedule,
per-step logging (progress bar fields), i.e. the figure a run reports as images/s (validation excluded).
The reference is the same model, batch size, loss and optimizer on a batch already in memory. Rounds
alternate (reference, ours) and the best round of each counts, to damp a shared machine's noise.

    python scripts/bench_training.py [--recipe models/cpu-small.yaml] [--steps 20] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from submit import training
from submit.backbones import build_embedder
from submit.losses import InfoNCELoss, LogitScale
from submit.prepare import prepare
from submit.recipe import Recipe, load_recipe
from submit.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bare_images_per_s(recipe: Recipe, steps: int, warmup: int = 3) -> float:
    """Forward + backward + AdamW step of the recipe's model on one pre-loaded batch of 2P images."""
    torch.manual_seed(0)
    embedder = build_embedder(recipe.backbone)
    model = training.ContrastiveModel(embedder, LogitScale(embedder.logit_scale_init))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    loss_fn = InfoNCELoss(recipe.train.label_smoothing)
    pairs = recipe.train.pairs_per_batch
    images = torch.randn(2 * pairs, 3, *embedder.input_size)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        feats, scale = model(images)
        loss = loss_fn(feats[:pairs], feats[pairs:], scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return 2 * pairs * steps / (time.perf_counter() - start)


def ours_images_per_s(recipe: Recipe, data_dir: Path, steps: int, work: Path, round_no: int) -> float:
    """`train` for `steps` optimizer steps; the images/s it reports for that (partial) epoch."""
    result = training.train(recipe, data_dir, work / f"run{round_no}", max_steps=steps, progress=True)
    return float(result["last"]["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "models" / "cpu-small.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = training.apply_overrides(load_recipe(args.recipe), [
        "data.split=all", f"data.workers={args.workers}", "train.checkpoint_every=0"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_dataset(work / "src", players=120, seqs=2, frames=5, seed=0)
        prepare(work / "src", work / "data", progress=False)
        bare, ours = [], []
        for r in range(args.rounds):
            bare.append(bare_images_per_s(recipe, args.steps))
            ours.append(ours_images_per_s(recipe, work / "data", args.steps, work, r))
            print(f"round {r + 1}: bare {bare[-1]:.1f} img/s, ours {ours[-1]:.1f} img/s", flush=True)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
          f"{args.workers} loader worker(s)")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"model: {recipe.backbone.name} {recipe.backbone.image_size}, {recipe.train.pairs_per_batch} pairs "
          f"({2 * recipe.train.pairs_per_batch} images) per step, {args.steps} steps x {args.rounds} rounds")
    print(f"ours (train loop, data loading from JPEG): {max(ours):.1f} images/s")
    print(f"reference (bare fwd+bwd+AdamW, pre-loaded tensors): {max(bare):.1f} images/s")
    print(f"ratio: {max(ours) / max(bare):.3f} (target >= 0.85)")


if __name__ == "__main__":
    main()
