"""Embedder throughput: `embedding.embed` (from disk, TTA, workers) against a bare model forward, same run.

Reference: the SAME crops, decoded, letterboxed and normalised beforehand (not timed) and kept in memory,
then `model(x)` under torch.inference_mode() in batches of the same size, once per view. That is the
best any embedder could do with this model; ours additionally reads and decodes JPEGs (in DataLoader
workers), letterboxes, normalises, L2-normalises and averages the views, and copies the result out.
Both are reported per view (images x views / second); ratio = ours / reference (target >= 0.9). On a
loaded machine the two timings drift apart with the load, so the script also prints the share of OUR
wall time spent inside the model's forward, measured within the same call (load-independent overhead).

    python scripts/bench_embedding.py                               # synthetic crops, ViT-B/16 + resnet18
    python scripts/bench_embedding.py --data DATA_DIR --split test  # a prepared data dir (real crops)
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from submit.backbones import build_embedder
from submit.embedding import embed, tta_views
from submit.manifest import read_manifest
from submit.recipe import BackboneSpec, TTASpec
from submit.transforms import CropDataset
from submit.device import cpu_model

MODELS = {"vit-b-16": BackboneSpec("open_clip:ViT-B-16"),
          "vit-l-14": BackboneSpec("open_clip:ViT-L-14"),  # random weights (304 M parameters): for GPUs
          "resnet18-128x64": BackboneSpec("timm:resnet18", image_size=(128, 64))}



def synthetic_rows(n: int, root: Path) -> pd.DataFrame:
    """`n` synthetic player crops (JPEG, 80-120 px tall) written under `root`; manifest-like rows."""
    from submit.synthetic import make_dataset

    make_dataset(root, players=max(5, n // 10 + 1), seqs=2, frames=5, seed=0)
    paths = sorted(p.relative_to(root).as_posix() for p in (root / "data_reid").rglob("*.jpeg"))[:n]
    return pd.DataFrame({"path": paths, "split": "test", "role": "gallery", "pid": 0, "seq": 0, "frame": 0,
                         "image_id": range(len(paths))})


def bench_rows(data: Path | None, split: str, images: int, tmp: Path) -> tuple[Path, pd.DataFrame]:
    """(root, rows) to benchmark: the first `images` rows of `split` in a prepared DATA_DIR, else synthetic
    crops written under `tmp`."""
    if data is None:
        return tmp, synthetic_rows(images, tmp)
    return data, read_manifest(data).query("split == @split").head(images).reset_index(drop=True)


def reference(model: torch.nn.Module, root: Path, rows: pd.DataFrame, tta: TTASpec, device: str = "cpu",
              precision: str = "auto") -> float:
    """Seconds for bare forwards of preloaded view tensors (the same views and batch size as ours)."""
    from submit.device import autocast

    dev = torch.device(device)
    views = []
    for scale, flip in tta_views(tta):
        ds = CropDataset(root, rows["path"].tolist(), model.input_size, model.mean, model.std, hflip=flip, scale=scale)
        layout = torch.channels_last if dev.type == "cuda" else torch.contiguous_format  # as `embed` feeds it
        views.append(torch.stack([ds[i][0] for i in range(len(ds))]).to(dev).contiguous(memory_format=layout))
    with torch.inference_mode(), autocast(dev, precision):
        model(views[0][: tta.batch_size])  # warm-up
        _sync(dev)
        start = time.perf_counter()
        for x in views:
            for b in range(0, len(x), tta.batch_size):
                model(x[b:b + tta.batch_size])
        _sync(dev)
        return time.perf_counter() - start


def _sync(dev: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings measure it."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Timed(torch.nn.Module):
    """The embedder with a stopwatch around its forward: the share of `embed` time spent in the model."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.seconds = inner, 0.0
        self.input_size, self.mean, self.std, self.embed_dim = inner.input_size, inner.mean, inner.std, inner.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.inner(x)
        _sync(x.device)
        self.seconds += time.perf_counter() - start
        return out


def ours(model: torch.nn.Module, root: Path, rows: pd.DataFrame, tta: TTASpec, workers: int, device: str = "cpu",
         precision: str = "auto") -> tuple[float, float]:
    """Seconds for `embed` from disk (no cache, worker start-up included) and the seconds of it inside forward."""
    timed = Timed(model)
    start = time.perf_counter()
    feats = embed(timed, root, rows, tta, device=device, workers=workers, progress=False, precision=precision)
    elapsed = time.perf_counter() - start
    assert feats.shape[0] == len(rows) and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-4)
    return elapsed, timed.seconds


def bench(name: str, root: Path, rows: pd.DataFrame, batch: int, workers: int, repeats: int, device: str = "cpu",
          precision: str = "auto") -> None:
    torch.manual_seed(0)
    model = build_embedder(MODELS[name]).eval().to(device)
    for hflip in (False, True):
        tta = TTASpec(hflip=hflip, scales=(1.0,), batch_size=batch)
        n = len(rows) * len(tta_views(tta))
        ref_times, our_runs = [], []
        for _ in range(repeats):  # interleaved, so both sides see the same machine load
            ref_times.append(reference(model, root, rows, tta, device, precision))
            our_runs.append(ours(model, root, rows, tta, workers, device, precision))
        ref_s = min(ref_times)
        our_s, in_forward = min(our_runs)
        print(f"{name:16s} views={len(tta_views(tta))} batch={batch} images={len(rows)}: ours {n / our_s:7.1f} img/s"
              f"  reference {n / ref_s:7.1f} img/s  ratio {ref_s / our_s:.3f}  (ours: {100 * in_forward / our_s:.1f}% "
              f"of its time inside the model forward)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a prepared DATA_DIR (default: synthetic crops in a temp dir)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings for each side")
    parser.add_argument("--models", nargs="+", default=["vit-b-16", "resnet18-128x64"], choices=list(MODELS))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (both sides run there)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="autocast of both sides (submit.device.amp_dtype)")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {datetime.date.today().isoformat()}, device {args.device} "
          f"({torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'CPU'}), "
          f"precision {args.precision}")
    print(f"ours = embed() from disk with {args.workers} DataLoader worker(s); reference = bare forward on "
          f"preloaded decoded tensors; best of {args.repeats}, interleaved")
    with tempfile.TemporaryDirectory() as tmp:
        root, rows = bench_rows(args.data, args.split, args.images, Path(tmp))
        for name in args.models:
            bench(name, root, rows, args.batch, args.workers, args.repeats, args.device, args.precision)


if __name__ == "__main__":
    main()
