"""Image preprocessing shared by training and embedding: letterbox, normalise, crop dataset, pair augmentation.

The CLIP-ReIdent recipe resizes each crop keeping its aspect ratio and pads it centred on a black canvas
of the model's input size ("letterbox"), then normalises with the model's mean/std. Training pairs get
the SAME horizontal flip (the anchor and the positive are flipped together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from submit.errors import SubmitError
from submit.prepare import to_8bit
from submit.recipe import AugmentSpec

Fill = int | tuple[int, int, int]
Triple = Sequence[float]


def letterbox(img: Image.Image, size_hw: tuple[int, int], fill: Fill = 0, scale: float = 1.0) -> Image.Image:
    """Resize `img` keeping its aspect ratio to fit (H, W) and centre it on a `fill`-coloured canvas.

    `scale` < 1 shrinks the content further inside the same canvas (more border); `scale` > 1 letterboxes
    onto a canvas `scale` times larger and crops the centre (H, W), i.e. zooms in. Used for multi-scale TTA."""
    height, width = int(size_hw[0]), int(size_hw[1])
    img = img.convert("RGB")
    box_h, box_w = max(1, round(height * scale)), max(1, round(width * scale))
    ratio = min(box_h / img.height, box_w / img.width)
    new_w, new_h = max(1, round(img.width * ratio)), max(1, round(img.height * ratio))
    resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (width, height), _rgb(fill))
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))  # negative offsets crop centrally
    return canvas


def hflip(img: Image.Image) -> Image.Image:
    """Mirror left-right."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) uint8 tensor (a channels-last view of the pixel buffer)."""
    data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [0, 1], on their device."""
    return pixels.float().div_(255.0)


def normalise_pixels(pixels: torch.Tensor, mean: Triple, std: Triple) -> torch.Tensor:
    """uint8 (3, H, W) or (B, 3, H, W) pixels -> the model input, on their device: `normalise(to_float(...))`
    with the same arithmetic, done in place after the one float copy (a large batch allocates once, not 3x)."""
    x = to_float(pixels)
    x.sub_(torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1))
    return x.div_(torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 tensor in [0, 1]."""
    return to_float(to_uint8(img))


def normalise(x: torch.Tensor, mean: Triple, std: Triple) -> torch.Tensor:
    """(x - mean) / std per channel, for a (3, H, W) or (B, 3, H, W) tensor."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


def denormalise(x: torch.Tensor, mean: Triple, std: Triple) -> torch.Tensor:
    """Inverse of `normalise` (for showing model inputs, e.g. Score-CAM overlays)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * s + m


def preprocess(
    img: Image.Image, size_hw: tuple[int, int], mean: Triple, std: Triple, flip: bool = False, scale: float = 1.0
) -> torch.Tensor:
    """Letterbox (at `scale`), optionally mirror, and normalise one image: the model input (3, H, W)."""
    boxed = letterbox(img, size_hw, scale=scale)
    if flip:
        boxed = hflip(boxed)
    return normalise_pixels(to_uint8(boxed), mean, std)


def open_image(path: str | Path) -> Image.Image:
    """Decode an image fully as RGB; unreadable or truncated files raise SubmitError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_8bit(img).convert("RGB")  # 16-bit grey keeps its contrast (not clipped to white)
    except FileNotFoundError:
        raise SubmitError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SubmitError(f"{path}: cannot decode image ({reason})") from None


class CropDataset(Dataset):
    """Player crops under `root` -> (normalised (3, H, W) float32 tensor, index), letterboxed to `size_hw`.

    `hflip` mirrors every image and `scale` shrinks (<1) or zooms (>1) the content, for test-time views."""

    def __init__(
        self,
        root: str | Path,
        paths: Sequence[str | Path],
        size_hw: tuple[int, int],
        mean: Triple,
        std: Triple,
        hflip: bool = False,
        scale: float = 1.0,
    ) -> None:
        self.root = Path(root)
        self.paths = [str(p) for p in paths]
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self.mean, self.std = tuple(mean), tuple(std)
        self.hflip, self.scale = hflip, scale

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = open_image(self.root / self.paths[index])
        return preprocess(img, self.size_hw, self.mean, self.std, self.hflip, self.scale), index


class PairAugment:
    """Training transform for an (anchor, positive) pair of PIL crops -> two normalised tensors.

    Both images are letterboxed and flipped TOGETHER with probability `spec.hflip` (the recipe's joint
    flip). Then, per image: colour jitter of strength `spec.color_jitter` (brightness/contrast/saturation,
    no hue so team colours survive), sharpening (factor 2) with probability `spec.sharpen`, and random
    erasing with probability `spec.random_erasing` (the erased box is set to 0 = the mean colour)."""

    def __init__(self, spec: AugmentSpec, size_hw: tuple[int, int], mean: Triple, std: Triple) -> None:
        self.spec = spec
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self.mean, self.std = tuple(mean), tuple(std)
        j = spec.color_jitter
        self.jitter = v2.ColorJitter(brightness=j, contrast=j, saturation=j) if j > 0 else None
        self.sharpen = v2.RandomAdjustSharpness(2.0, p=spec.sharpen) if spec.sharpen > 0 else None
        self.erase = v2.RandomErasing(p=spec.random_erasing, value=0) if spec.random_erasing > 0 else None

    def __call__(self, anchor: Image.Image, positive: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        flip = bool(torch.rand(()) < self.spec.hflip)
        return self._one(anchor, flip), self._one(positive, flip)

    def _one(self, img: Image.Image, flip: bool) -> torch.Tensor:
        x = to_tensor(letterbox(img, self.size_hw))
        if flip:
            x = x.flip(-1)
        if self.jitter is not None:
            x = self.jitter(x).clamp_(0, 1)
        if self.sharpen is not None:
            x = self.sharpen(x).clamp_(0, 1)
        x = normalise(x, self.mean, self.std)
        if self.erase is not None:
            x = self.erase(x)
        return x


def _rgb(fill: Fill) -> tuple[int, int, int]:
    return (fill, fill, fill) if isinstance(fill, int) else tuple(fill)  # type: ignore[return-value]

