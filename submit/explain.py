"""Score-CAM for a pair of crops: which regions of crop A make it look like crop B, and vice versa.

Score-CAM (Wang et al., CVPR-W 2020) weights each activation map of a layer by how much the model's
score changes when the input is masked by that map, instead of by gradients. Here the score is the
cosine similarity of A's embedding to B's:
1. the activation maps of `Embedder.feature_maps` for A (last conv stage / ViT patch tokens), (C, h, w);
2. each map upsampled (bilinear) to the input size and min-max normalised to [0, 1] = a soft mask;
3. A multiplied by each mask (in normalised pixel space, so masked-out pixels become the dataset mean),
   embedded in batches, and compared with B: gain_k = cos(f(A * M_k), f(B)) - cos(f(baseline), f(B)),
   the baseline being the all-masked input (all zeros = the mean image), as the paper's "increase of
   confidence" over a baseline input;
4. weight_k = ReLU(gain_k): only maps whose region alone brings A closer to B than the baseline count
   (the paper's softmax over raw scores is nearly uniform for cosine scores in [-1, 1], so we use the
   rectified gains, which keep the ranking of maps and give zero weight to uninformative ones);
5. heat = ReLU(sum_k weight_k * upsampled activation map_k), divided by its maximum.
Maps that are constant over the image carry no location and are skipped; `max_maps` keeps only the
maps with the largest spatial variance, a common speed-up for layers with 1,000+ channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import Progress

from submit import atomic
from submit.backbones import build_embedder
from submit.device import autocast, pick_device
from submit.errors import SubmitError
from submit.progress import progress_bar
from submit.recipe import BackboneSpec
from submit.trained import load_trained
from submit.transforms import letterbox, open_image, preprocess


def score_cam(model: torch.nn.Module, img_a: torch.Tensor, img_b: torch.Tensor, batch_size: int = 32,
              max_maps: int | None = None, device: str | torch.device | None = None,
              progress: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Similarity Score-CAM both ways for two normalised (3, H, W) crops; returns (heat_a, heat_b, cosine).

    The heat maps are (H, W) float32 arrays in [0, 1] at the model's input resolution.
    """
    if batch_size < 1:
        raise SubmitError(f"batch_size must be >= 1, got {batch_size}")
    dev = pick_device(str(device) if device is not None else None)
    was_training = model.training
    model.eval().to(dev)
    a, b = img_a.to(dev)[None].float(), img_b.to(dev)[None].float()
    try:
        with torch.inference_mode(), _bar(progress) as bar:
            fa, fb = _embed(model, a, dev), _embed(model, b, dev)
            maps_a, maps_b = _select_maps(model, a, max_maps), _select_maps(model, b, max_maps)
            task = bar.add_task("score-cam", total=len(maps_a) + len(maps_b))
            heat_a = _one_way(model, a, fb, maps_a, batch_size, dev, lambda n: bar.advance(task, n))
            heat_b = _one_way(model, b, fa, maps_b, batch_size, dev, lambda n: bar.advance(task, n))
            similarity = float((fa * fb).sum())
    finally:
        model.train(was_training)
    return heat_a, heat_b, similarity


def _embed(model: torch.nn.Module, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """L2-normalised fp32 embeddings of a normalised batch."""
    with autocast(dev):
        f = model(x)
    return F.normalize(f.float(), dim=1)


def _select_maps(model: torch.nn.Module, x: torch.Tensor, max_maps: int | None) -> torch.Tensor:
    """The (K, h, w) activation maps of `x` worth masking with: non-constant, top `max_maps` by variance."""
    maps = model.feature_maps(x)[0].float()
    flat = maps.flatten(1)
    spread = flat.amax(1) - flat.amin(1)
    keep = torch.nonzero(spread > 1e-6 * (spread.max() + 1e-12)).flatten()
    if max_maps is not None and 0 < max_maps < len(keep):
        var = flat[keep].var(1)
        keep = keep[torch.topk(var, max_maps).indices]
    return maps[keep]


def _one_way(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor,
             batch_size: int, dev: torch.device, advance: Callable[[int], object]) -> np.ndarray:
    """Heat map of `x` (1, 3, H, W) explaining its similarity to the unit embedding `target` (1, D)."""
    size = tuple(x.shape[-2:])
    baseline = float((_embed(model, torch.zeros_like(x), dev) * target).sum())
    heat = torch.zeros(size, device=dev)
    for chunk in maps.split(batch_size):
        up = F.interpolate(chunk[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        low = up.flatten(1).amin(1)[:, None, None]
        high = up.flatten(1).amax(1)[:, None, None]
        masks = (up - low) / (high - low).clamp_min(1e-12)
        sims = (_embed(model, x * masks[:, None], dev) @ target.T)[:, 0]
        weights = torch.relu(sims - baseline)
        heat += (weights[:, None, None] * up).sum(0)
        advance(len(chunk))
    heat = torch.relu(heat)
    top = heat.max()
    if top > 0:
        heat = heat / top
    return heat.cpu().numpy().astype(np.float32)


def _bar(enabled: bool) -> Progress:
    """A rich progress bar over masked forward passes."""
    return progress_bar(enabled, "masks")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, or raise a one-line SubmitError naming it."""
    return open_image(path)


def to_tensor(img: Image.Image, size_hw: Sequence[int], mean: Sequence[float],
              std: Sequence[float]) -> tuple[torch.Tensor, np.ndarray]:
    """Letterbox `img` to `size_hw`; return the normalised (3, H, W) model input and the uint8 RGB array shown."""
    size = (int(size_hw[0]), int(size_hw[1]))
    return preprocess(img, size, mean, std), np.asarray(letterbox(img, size), dtype=np.uint8)


def load_model(run_dir: str | Path | None = None, checkpoint: str = "best", model: str | None = None,
               pretrained: str | None = None) -> torch.nn.Module:
    """A trained embedder from a run dir, or an untrained one from a backbone name (`open_clip:...`, `timm:...`)."""
    if (run_dir is None) == (model is None):
        raise SubmitError("give exactly one of --run RUN_DIR or --model NAME")
    if run_dir is not None:
        return load_trained(run_dir, checkpoint=checkpoint)[0]
    assert model is not None  # exactly one of run_dir and model, checked above
    return build_embedder(BackboneSpec(name=model, pretrained=pretrained))


def explain_pair(query: str | Path, gallery: str | Path, out: str | Path, run_dir: str | Path | None = None,
                 checkpoint: str = "best", model: str | None = None, pretrained: str | None = None,
                 batch_size: int = 32, max_maps: int | None = None, device: str | None = None,
                 progress: bool = True) -> Path:
    """Score-CAM both ways for a query/gallery crop pair; writes a side-by-side PNG atomically and returns its path."""
    atomic.check_file_target(Path(out))  # a folder in the way is refused before the model loads
    img_q, img_g = load_image(query), load_image(gallery)
    net = load_model(run_dir, checkpoint, model, pretrained)
    size, mean, std = tuple(net.input_size), tuple(net.mean), tuple(net.std)
    xq, shown_q = to_tensor(img_q, size, mean, std)
    xg, shown_g = to_tensor(img_g, size, mean, std)
    heat_q, heat_g, sim = score_cam(net, xq, xg, batch_size=batch_size, max_maps=max_maps, device=device,
                                    progress=progress)
    panels = [(Path(query).name, shown_q, heat_q), (Path(gallery).name, shown_g, heat_g)]
    return render_pair(panels, sim, out)


def render_pair(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], similarity: float,
                out: str | Path) -> Path:
    """Draw (title, RGB image, heat map) panels side by side with overlays; write the PNG atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    if not out.parent.is_dir():
        raise SubmitError(f"{out}: output folder {out.parent} does not exist")
    h, w = panels[0][1].shape[:2]
    fig = Figure(figsize=(2.2 * len(panels) * max(w / h, 0.5) + 0.6, 3.4), dpi=120)
    FigureCanvasAgg(fig)
    for i, (title, rgb, heat) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(rgb)
        ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"cosine similarity {similarity:.3f}", fontsize=10)
    with atomic.atomic_file(out, "wb", parents=False) as fh:
        fig.savefig(fh, format="png", bbox_inches="tight")
    return out
