"""The embedder's input path alone: uint8 pixels from the workers, normalised on the device (ours), against
float32 tensors normalised inside the workers (what the embedder did before), same run, interleaved.

Both sides read and decode the same crops with the same number of DataLoader workers, letterbox them to the
model's input size, make the same views, and end with the same normalised float32 batch on `--device`
(pinned memory and a non_blocking copy on CUDA, as `embedding.embed_views` does). No model runs: this is the
ceiling the loader puts on the embedder. Reported: images x views per second, best of `--repeats`, and the
bytes each item carries from a worker.

    python scripts/bench_loader.py                                 # synthetic crops (JPEG, 80-120 px tall)
    python scripts/bench_loader.py --data DATA_DIR --split test    # a prepared data dir (real crops)
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN as MEAN
from open_clip.constants import OPENAI_DATASET_STD as STD
from torch.utils.data import DataLoader, Dataset

from bench_embedding import bench_rows  # this folder's sibling script
from submit.device import cpu_model
from submit.embedding import _Views
from submit.transforms import normalise_pixels, open_image, preprocess

class FloatViews(Dataset):
    """The previous hand-over (the embedder's item before uint8): each scale preprocessed to normalised
    float32 inside the worker, the flip view mirrored from it, the views stacked."""

    def __init__(self, inner: _Views) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = open_image(self.inner.root / self.inner.paths[i])
        by_scale: dict[float, torch.Tensor] = {}
        out = []
        for scale, flip in self.inner.views:
            if scale not in by_scale:
                by_scale[scale] = preprocess(img, self.inner.size_hw, MEAN, STD, False, scale)
            out.append(by_scale[scale].flip(-1) if flip else by_scale[scale])
        return torch.stack(out), i


def one_pass(dataset: Dataset, dev: torch.device, batch: int, workers: int, on_device: bool) -> float:
    """Seconds to load every item and leave each view's normalised float32 batch on `dev`."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, pin_memory=dev.type == "cuda")
    start = time.perf_counter()
    for x, _ in loader:
        x = x.to(dev, non_blocking=True)  # the whole pinned batch, as embedding._forward_views copies it
        for v in range(x.shape[1]):
            view = x[:, v]
            if on_device:
                view = normalise_pixels(view, MEAN, STD)
            view.sum().item()  # wait for the copy (and the normalisation) to finish
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a prepared DATA_DIR (default: synthetic crops in a temp dir)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--views", type=int, default=2, choices=(1, 2), help="1: identity; 2: + the flip view")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')}, device {dev}, "
          f"load average {os.getloadavg()[0]:.2f}")
    views = [(1.0, False), (1.0, True)][: args.views]
    with tempfile.TemporaryDirectory() as tmp:
        root, rows = bench_rows(args.data, args.split, args.images, Path(tmp))
        ours = _Views(root, rows["path"].tolist(), tuple(args.size), views)
        before = FloatViews(ours)
        n = len(rows) * len(views)
        times: dict[str, list[float]] = {"uint8": [], "float32": []}
        one_pass(before, dev, args.batch, args.workers, on_device=False)  # warm-up: file cache, allocator
        one_pass(ours, dev, args.batch, args.workers, on_device=True)
        for _ in range(args.repeats):  # interleaved, so both sides see the same machine load
            times["float32"].append(one_pass(before, dev, args.batch, args.workers, on_device=False))
            times["uint8"].append(one_pass(ours, dev, args.batch, args.workers, on_device=True))
        item_bytes = {k: d[0][0].numel() * d[0][0].element_size() for k, d in (("uint8", ours), ("float32", before))}
        print(f"{len(rows)} crops x {len(views)} view(s) at {args.size[0]}x{args.size[1]}, batch {args.batch}, "
              f"{args.workers} worker(s), best of {args.repeats}; load average at the end {os.getloadavg()[0]:.2f}")
        for key in ("float32", "uint8"):
            print(f"  {key:8s} hand-over ({item_bytes[key] / 1024:.0f} KiB/item): {n / min(times[key]):7.1f} img/s  "
                  f"(runs: {', '.join(f'{t:.2f}' for t in times[key])} s)")
        print(f"  ratio uint8 / float32: {min(times['float32']) / min(times['uint8']):.3f}")


if __name__ == "__main__":
    main()
