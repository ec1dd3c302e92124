"""The TTA embedder: view equivalences against plain forwards, unit norms, and the on-disk feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from submit import embedding
from submit.backbones import build_embedder
from submit.errors import SubmitError
from submit.recipe import BackboneSpec, TTASpec
from submit.transforms import CropDataset

torch.set_num_threads(1)
SIZES = [(64, 32), (40, 20), (48, 24), (32, 16), (80, 40), (56, 28)]  # (h, w): even letterbox padding at 32x32


def _rows(paths: list[str]) -> pd.DataFrame:
    n = len(paths)
    return pd.DataFrame({"path": paths, "split": "test", "role": "gallery", "pid": np.arange(n) // 2,
                         "seq": 1, "frame": np.arange(n), "image_id": np.arange(n)})


def _write_images(root: Path, flip: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        if flip:
            arr = arr[:, ::-1]
        rel = f"img/{i}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(arr)).save(root / rel)
        paths.append(rel)
    return _rows(paths)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_embedder(BackboneSpec("open_clip:reident-tiny-vit", image_size=(32, 32))).eval()


@pytest.fixture()
def data(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    return tmp_path, _write_images(tmp_path)


def _plain(model: torch.nn.Module, root: Path, rows: pd.DataFrame, flip: bool = False, scale: float = 1.0) -> np.ndarray:
    ds = CropDataset(root, rows["path"].tolist(), model.input_size, model.mean, model.std, hflip=flip, scale=scale)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.inference_mode():
        return F.normalize(model(x), dim=1).numpy()


def _embed(model, root, rows, tta, **kw) -> np.ndarray:
    return embedding.embed(model, root, rows, tta, device="cpu", workers=0, progress=False, **kw)


def test_single_view_equals_plain_forward(model, data) -> None:
    root, rows = data
    feats = _embed(model, root, rows, TTASpec(hflip=False, scales=(1.0,), batch_size=4))
    assert feats.dtype == np.float32 and feats.shape == (len(rows), model.embed_dim)
    assert np.allclose(feats, _plain(model, root, rows), atol=1e-5)


def test_flip_only_view_equals_forward_of_flipped_tensor(model, data) -> None:
    root, rows = data
    feats = embedding.embed_views(model, root, rows, [(1.0, True)], batch_size=4, device="cpu", workers=0,
                                  progress=False)
    ds = CropDataset(root, rows["path"].tolist(), model.input_size, model.mean, model.std)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).flip(-1)
    with torch.inference_mode():
        ref = F.normalize(model(x), dim=1).numpy()
    assert np.allclose(feats, ref, atol=1e-5)


def test_multi_view_is_renormalised_mean_of_views(model, data) -> None:
    root, rows = data
    tta = TTASpec(hflip=True, scales=(1.0, 0.75), batch_size=4)
    assert embedding.tta_views(tta) == [(1.0, False), (1.0, True), (0.75, False), (0.75, True)]
    feats = _embed(model, root, rows, tta)
    total = sum(_plain(model, root, rows, flip, scale) for scale, flip in embedding.tta_views(tta))
    ref = total / np.linalg.norm(total, axis=1, keepdims=True)
    assert np.allclose(feats, ref, atol=1e-5)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # the flip view really changes the embedding (otherwise the equivalences above prove little)
    assert not np.allclose(_plain(model, root, rows, flip=True), _plain(model, root, rows), atol=1e-3)


def test_loader_hands_over_uint8_pixels_that_normalise_to_the_crop_dataset_tensors(model, data) -> None:
    """Workers send letterboxed uint8 (a quarter of float32's bytes); normalising them on the device gives
    exactly the float tensors CropDataset (the reference preprocessing) makes, for every view."""
    from submit.transforms import normalise_pixels

    root, rows = data
    views = [(1.0, False), (1.0, True), (0.75, False)]
    items = embedding._Views(root, rows["path"].tolist(), tuple(model.input_size), views)
    for i in range(len(rows)):
        stacked, index = items[i]
        assert index == i and stacked.dtype == torch.uint8 and stacked.shape == (3, 3, *model.input_size)
        for v, (scale, flip) in enumerate(views):
            ref = CropDataset(root, rows["path"].tolist(), model.input_size, model.mean, model.std,
                              hflip=flip, scale=scale)[i][0]
            assert torch.equal(normalise_pixels(stacked[v], model.mean, model.std), ref)


def test_channels_last_branch_feeds_the_same_values_in_channels_last(model, data) -> None:
    """The CUDA embedder's channels_last branch, run on CPU: the model receives channels-last float32 input
    (the uint8 pixels are converted first, the float copy keeps the layout) and the features equal the plain
    branch's."""
    root, rows = data
    items = embedding._Views(root, rows["path"].tolist(), tuple(model.input_size), [(1.0, False), (1.0, True)])
    batch = torch.stack([items[i][0] for i in range(len(rows))])
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            plain = embedding._forward_views(model, batch, torch.device("cpu"), "fp32", channels_last=False)
            last = embedding._forward_views(model, batch, torch.device("cpu"), "fp32", channels_last=True)
    finally:
        hook.remove()
    assert [x.dtype for x in seen] == [torch.float32] * 4
    assert not seen[0].is_contiguous(memory_format=torch.channels_last)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in seen[2:])
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])
    assert torch.allclose(plain, last, atol=1e-5)


def test_preflipped_images_give_the_same_flip_tta_embedding(model, tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    rows = _write_images(a)
    _write_images(b, flip=True)
    tta = TTASpec(hflip=True, scales=(1.0,), batch_size=4)
    assert np.allclose(_embed(model, a, rows, tta), _embed(model, b, rows, tta), atol=1e-4)


def test_worker_processes_give_the_same_features(model, data) -> None:
    root, rows = data
    tta = TTASpec(hflip=True, batch_size=4)
    one = embedding.embed(model, root, rows, tta, device="cpu", workers=1, progress=False)
    assert np.allclose(one, _embed(model, root, rows, tta), atol=1e-6)


class _Counting(torch.nn.Module):
    """Wraps an embedder and counts forward calls (to prove a cache hit skipped the model)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0
        self.input_size, self.mean, self.std, self.embed_dim = inner.input_size, inner.mean, inner.std, inner.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_cache_hit_skips_the_model_and_changes_invalidate(model, data) -> None:
    root, rows = data
    ckpt = root / "best.pt"
    ckpt.write_bytes(b"weights v1")
    counting = _Counting(model)
    tta = TTASpec(hflip=True, batch_size=4)
    ident = embedding.checkpoint_identity(ckpt, BackboneSpec("x"))
    first = _embed(counting, root, rows, tta, identity=ident)
    calls = counting.calls
    assert calls == 2 * 2  # 6 images in batches of 4, two views each
    assert len(list((root / ".cache" / "features").glob("*.npy"))) == 1
    again = _embed(counting, root, rows, tta, identity=ident)
    assert counting.calls == calls and np.array_equal(first, again)

    changed = rows.copy()
    changed.loc[0, "pid"] = 99  # a different manifest -> a different key
    _embed(counting, root, changed, tta, identity=ident)
    assert counting.calls == 2 * calls

    ckpt.write_bytes(b"weights v2")  # a rewritten checkpoint -> a different identity
    ident2 = embedding.checkpoint_identity(ckpt, BackboneSpec("x"))
    assert ident2 != ident
    _embed(counting, root, rows, tta, identity=ident2)
    assert counting.calls == 3 * calls

    _embed(counting, root, rows, TTASpec(hflip=False, batch_size=4), identity=ident2)  # another TTA
    assert counting.calls == 3 * calls + 2
    assert len(list((root / ".cache" / "features").glob("*.npy"))) == 4
    assert not list((root / ".cache" / "features").glob("*.tmp"))


def test_no_identity_means_no_cache(model, data) -> None:
    root, rows = data
    _embed(model, root, rows, TTASpec(hflip=False, batch_size=8))
    assert not (root / ".cache").exists()


def test_corrupt_cache_file_is_recomputed(model, data) -> None:
    root, rows = data
    ckpt = root / "w.pt"
    ckpt.write_bytes(b"w")
    tta = TTASpec(hflip=False, batch_size=8)
    ident = embedding.checkpoint_identity(ckpt)
    good = _embed(model, root, rows, tta, identity=ident)
    path = embedding.cache_path(root, embedding.cache_key(ident, tta, rows, model))
    path.write_bytes(b"not an npy file")
    assert np.array_equal(_embed(model, root, rows, tta, identity=ident), good)
    assert np.array_equal(np.load(path), good)


def test_lazy_loader_is_not_called_on_a_cache_hit(model, data) -> None:
    root, rows = data
    ckpt = root / "best.pt"
    ckpt.write_bytes(b"w")
    ident = embedding.checkpoint_identity(ckpt, BackboneSpec("open_clip:reident-tiny-vit", image_size=(32, 32)))
    tta = TTASpec(hflip=False, batch_size=8)
    loads = []
    first = _embed(lambda: loads.append(1) or model, root, rows, tta, identity=ident)
    assert loads == [1]

    def refuse() -> torch.nn.Module:
        raise AssertionError("the model was loaded despite a cached result")

    assert np.array_equal(_embed(refuse, root, rows, tta, identity=ident), first)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_a_one_line_error_even_from_a_worker(model, data, workers) -> None:
    root, rows = data
    (root / rows.loc[3, "path"]).write_bytes(b"not an image")
    with pytest.raises(SubmitError) as info:
        embedding.embed(model, root, rows, TTASpec(batch_size=2), device="cpu", workers=workers, progress=False)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(root / rows.loc[3, "path"]))
    assert "cannot decode image" in str(info.value)


def test_empty_or_non_positive_scales_are_refused(model, data) -> None:
    root, rows = data
    for scales in ((), (1.0, 0.0)):
        with pytest.raises(SubmitError, match=r"tta.scales: expected one or more positive scales"):
            _embed(model, root, rows, TTASpec(scales=scales))


def test_cache_key_separates_autocast_dtypes(data) -> None:
    _, rows = data
    tta = TTASpec()
    plain = embedding.cache_key("id", tta, rows)
    assert plain == embedding.cache_key("id", TTASpec(batch_size=7), rows)  # batch size does not change features
    assert len({plain, embedding.cache_key("id", tta, rows, amp=torch.bfloat16),
                embedding.cache_key("id", tta, rows, amp=torch.float16)}) == 3
