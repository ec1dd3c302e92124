"""Letterbox, normalisation, crop dataset and pair augmentation on generated images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from submit.errors import SubmitError
from submit.recipe import AugmentSpec
from submit.transforms import (
    CropDataset,
    PairAugment,
    denormalise,
    hflip,
    letterbox,
    normalise,
    open_image,
    to_tensor,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def _crop(h: int = 40, w: int = 20, seed: int = 0) -> Image.Image:
    """A bright random crop (no pure-black pixels, so padding is distinguishable)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(40, 255, size=(h, w, 3), dtype=np.uint8))


def test_letterbox_keeps_aspect_and_pads_black():
    out = np.asarray(letterbox(_crop(40, 20), (64, 64)))  # tall crop -> 64x32 content, 16 px bars
    assert out.shape == (64, 64, 3)
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()
    assert (out[:, 16:48] > 0).any(axis=2).all()
    wide = np.asarray(letterbox(_crop(10, 40), (32, 32), fill=(255, 0, 0)))  # wide -> 8x32, bars top/bottom
    assert (wide[:12] == [255, 0, 0]).all() and (wide[20:] == [255, 0, 0]).all()
    assert (wide[12:20, :, 1] > 0).any()


def test_letterbox_scale_shrinks_or_zooms():
    img = Image.new("RGB", (20, 40), (200, 100, 50))
    small = np.asarray(letterbox(img, (40, 40), scale=0.5))  # content 20x10 centred
    assert (small[:10] == 0).all() and (small[10:30, 15:25] == [200, 100, 50]).all()
    zoom = np.asarray(letterbox(img, (40, 40), scale=2.0))  # content 80x40 on an 80x80 canvas, centre crop
    assert zoom.shape == (40, 40, 3) and (zoom == [200, 100, 50]).all()


def test_to_tensor_and_normalise_numbers():
    img = Image.new("RGB", (3, 2), (255, 102, 0))
    x = to_tensor(img)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0.4, 0.0]))
    y = normalise(x, MEAN, STD)
    assert torch.allclose(y[:, 1, 2], torch.tensor([(1 - 0.5) / 0.2, (0.4 - 0.4) / 0.25, (0 - 0.3) / 0.5]))
    assert torch.allclose(denormalise(y, MEAN, STD), x)


def test_flip_of_flip_is_identity_and_mirrors():
    img = _crop(8, 6)
    assert torch.equal(to_tensor(hflip(hflip(img))), to_tensor(img))
    assert torch.equal(to_tensor(hflip(img)), to_tensor(img).flip(-1))


def test_crop_dataset_items(tmp_path):
    for i, (h, w) in enumerate([(40, 20), (30, 30)]):
        _crop(h, w, seed=i).save(tmp_path / f"{i}.png")
    plain = CropDataset(tmp_path, ["0.png", "1.png"], (32, 16), MEAN, STD)
    flipped = CropDataset(tmp_path, ["0.png", "1.png"], (32, 16), MEAN, STD, hflip=True)
    x, idx = plain[1]
    assert len(plain) == 2 and idx == 1 and x.shape == (3, 32, 16) and x.dtype == torch.float32
    assert torch.allclose(flipped[0][0], plain[0][0].flip(-1))
    # the 30x30 crop in a 32x16 box: 16x16 content, black (normalised) bars above and below
    black = normalise(torch.zeros(3, 1, 1), MEAN, STD).flatten()
    assert torch.allclose(x[:, 0, 0], black) and not torch.allclose(x[:, 16, 8], black)


def test_corrupt_and_missing_images_raise_naming_file(tmp_path):
    (tmp_path / "bad.jpeg").write_bytes(b"\xff\xd8 not really a jpeg")
    _crop().save(tmp_path / "ok.jpeg")
    truncated = (tmp_path / "ok.jpeg").read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(truncated[: len(truncated) // 2])
    ds = CropDataset(tmp_path, ["bad.jpeg", "cut.jpeg", "gone.jpeg"], (16, 16), MEAN, STD)
    with pytest.raises(SubmitError, match=r"bad\.jpeg: cannot decode image"):
        ds[0]
    with pytest.raises(SubmitError, match=r"cut\.jpeg: cannot decode image"):
        ds[1]
    with pytest.raises(SubmitError, match=r"gone\.jpeg: image file not found"):
        open_image(tmp_path / "gone.jpeg")


def test_pair_augment_flips_jointly():
    aug = PairAugment(AugmentSpec(hflip=0.5), (32, 16), MEAN, STD)
    anchor, positive = _crop(40, 20, seed=1), _crop(40, 20, seed=2)
    a_plain = normalise(to_tensor(letterbox(anchor, (32, 16))), MEAN, STD)
    p_plain = normalise(to_tensor(letterbox(positive, (32, 16))), MEAN, STD)
    torch.manual_seed(0)
    flips = []
    for _ in range(20):
        a, p = aug(anchor, positive)
        a_flipped = torch.allclose(a, a_plain.flip(-1))
        assert a_flipped or torch.allclose(a, a_plain)
        assert torch.allclose(p, p_plain.flip(-1) if a_flipped else p_plain)  # the same decision
        flips.append(a_flipped)
    assert any(flips) and not all(flips)


def test_pair_augment_photometric_options_change_pixels():
    spec = AugmentSpec(hflip=0.0, random_erasing=1.0, sharpen=1.0, color_jitter=0.3)
    aug = PairAugment(spec, (32, 32), MEAN, STD)
    img = _crop(32, 32)
    plain = normalise(to_tensor(letterbox(img, (32, 32))), MEAN, STD)
    torch.manual_seed(0)
    a, p = aug(img, img)
    assert a.shape == p.shape == (3, 32, 32)
    assert not torch.allclose(a, plain) and not torch.allclose(a, p)  # per-image randomness
    assert (a == 0).all(dim=0).any()  # an erased box is set to 0 (the mean colour)
