"""Benchmark: our training loop's images/s against a bare forward+backward+AdamW step on pre-loaded tensors.

Ours is `submit.training.train` on a prepared synthetic DATA_DIR: JPEG decoding, letterbox and the
recipe's augmentation (in DataLoader workers, or inline with `data.workers: 0`), the pair sampler, the
InfoNCE loss, the LR schedule, the per-step progress/logging; timed from the end of step `warmup` to the end of the last step (a hook in
the loop records the clock), so both sides skip the same first steps (worker start-up, oneDNN warm-up).
The start-up-inclusive figure the run itself reports is printed too. The reference is the same model,
batch, loss and optimizer on one batch already in memory. Rounds alternate (reference, ours) and the
best round of each counts, to damp a shared machine's noise.

    python scripts/bench_training.py [--recipe models/cpu-small.yaml] [--steps 20] [--rounds 2]
                                     [--threads N] [--workers N] [--device cuda] [--precision bf16]
                                     [--random-weights] [--players N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch

from submit import training
from submit.backbones import build_embedder
from submit.device import cpu_model
from submit.distributed import cpu_threads
from submit.losses import InfoNCELoss, LogitScale
from submit.prepare import prepare
from submit.recipe import Recipe, apply_overrides, load_recipe
from submit.synthetic import make_dataset
from submit.train_step import ContrastiveModel

REPO = Path(__file__).resolve().parents[1]


def bare_images_per_s(recipe: Recipe, steps: int, warmup: int, device: str = "cpu") -> float:
    """Forward + backward + AdamW step of the recipe's model on one pre-loaded batch of 2P images (on `device`,
    under the recipe's autocast, with a gradient scaler for fp16)."""
    from submit.device import autocast, needs_scaler

    dev = torch.device(device)
    torch.manual_seed(0)
    embedder = build_embedder(recipe.backbone)
    if recipe.train.grad_checkpointing:
        embedder.set_grad_checkpointing(True)
    model = ContrastiveModel(embedder, LogitScale(embedder.logit_scale_init)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    scaler = torch.amp.GradScaler(dev.type, enabled=needs_scaler(dev, recipe.train.precision))
    loss_fn = InfoNCELoss(recipe.train.label_smoothing)
    pairs = recipe.train.pairs_per_batch
    images = torch.randn(2 * pairs, 3, *embedder.input_size, device=dev)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(dev)
            start = time.perf_counter()
        with autocast(dev, recipe.train.precision):
            feats, scale = model(images)
        loss = loss_fn(feats[:pairs], feats[pairs:], scale)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    _sync(dev)
    return 2 * pairs * steps / (time.perf_counter() - start)


def _sync(dev: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings measure it."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ours_images_per_s(recipe: Recipe, data_dir: Path, steps: int, warmup: int, work: Path, round_no: int,
                      device: str | None = None) -> tuple[float, float]:
    """`train` for warmup + steps optimizer steps: (steady images/s after warm-up, images/s the run reports)."""
    clock: dict[int, float] = {}
    original = training._Trainer.on_step
    def on_step(self, step: int) -> None:
        _sync(self.device)  # a step's CUDA work is finished before its clock
        clock[step] = time.perf_counter()

    training._Trainer.on_step = on_step  # type: ignore[method-assign]
    try:
        result = training.train(recipe, data_dir, work / f"run{round_no}", max_steps=warmup + steps, progress=True,
                                device=device)
    finally:
        training._Trainer.on_step = original  # type: ignore[method-assign]
    images = 2 * recipe.train.pairs_per_batch * steps
    return images / (clock[warmup + steps] - clock[warmup]), float(result["last"]["images_per_s"])


def recipe_workers(path: str) -> int:
    """The recipe's DataLoader workers (the benchmark runs the recipe as it is, unless told otherwise)."""
    return load_recipe(path).data.workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "models" / "cpu-small.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="compute threads for both sides [default: what train picks, cores - loader workers]")
    parser.add_argument("--workers", type=int, default=None, help="loader workers [default: the recipe's]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (both sides run there)")
    parser.add_argument("--precision", default=None, choices=("auto", "bf16", "fp16", "fp32"),
                        help="override train.precision [default: the recipe's]")
    parser.add_argument("--random-weights", action="store_true",
                        help="backbone.pretrained=null: no weight file needed (same speed)")
    parser.add_argument("--players", type=int, default=200, help="synthetic identities (x10 training crops)")
    args = parser.parse_args()
    workers = recipe_workers(args.recipe) if args.workers is None else args.workers
    threads = args.threads or cpu_threads(torch.device("cpu"), workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # train() then keeps this thread count
    torch.set_num_threads(threads)
    extra = ([f"train.precision={args.precision}"] if args.precision else []) + (
        ["backbone.pretrained=null"] if args.random_weights else [])
    recipe = apply_overrides(load_recipe(args.recipe), [
        "data.split=all", f"data.workers={workers}", "train.checkpoint_every=0", *extra])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_dataset(work / "src", players=args.players, seqs=2, frames=5, seed=0)  # 6 crops per identity
        prepare(work / "src", work / "data", progress=False)
        bare, ours, reported = [], [], []
        for r in range(args.rounds):
            bare.append(bare_images_per_s(recipe, args.steps, args.warmup, args.device))
            steady, whole = ours_images_per_s(recipe, work / "data", args.steps, args.warmup, work, r, args.device)
            ours.append(steady)
            reported.append(whole)
            print(f"round {r + 1}: bare {bare[-1]:.1f} img/s, ours {steady:.1f} img/s "
                  f"(run-reported incl. start-up {whole:.1f})", flush=True)
    gpu = f", {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else ""
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {threads} compute "
          f"thread(s), {workers} loader worker(s), device {args.device}, precision {recipe.train.precision}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"model: {recipe.backbone.name} {recipe.backbone.image_size}, {recipe.train.pairs_per_batch} pairs "
          f"({2 * recipe.train.pairs_per_batch} images) per step, {args.warmup} warm-up + {args.steps} timed steps "
          f"x {args.rounds} rounds")
    print(f"ours (train loop, data loading from JPEG): {max(ours):.1f} images/s "
          f"(as the run reports it, incl. start-up: {max(reported):.1f})")
    print(f"reference (bare fwd+bwd+AdamW, pre-loaded tensors): {max(bare):.1f} images/s")
    print(f"ratio: {max(ours) / max(bare):.3f} (target >= 0.85)")


if __name__ == "__main__":
    main()
