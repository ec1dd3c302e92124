"""Score-CAM for pairs: a hand-built model whose similarity depends only on one region, plus the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from submit.errors import SubmitError
from submit.explain import load_image, render_pair, score_cam

torch.set_num_threads(2)


class QuadrantModel(nn.Module):
    """Embedding = pooled pixels of the top-left quadrant; feature maps = one local response per cell of an 8x8 grid."""

    input_size = (32, 32)
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    embed_dim = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return F.adaptive_avg_pool2d(x[..., : h // 2, : w // 2], 2).flatten(1)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        cells = F.adaptive_avg_pool2d(x.abs(), 8).mean(1).flatten(1)  # (B, 64)
        onehot = torch.eye(64, device=x.device).view(64, 8, 8)
        return cells[:, :, None, None] * onehot[None]  # (B, 64, 8, 8): map k lights up cell k only


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(3, 32, 32, generator=g) + 0.5
    b = a + 0.05 * torch.randn(3, 32, 32, generator=g)
    b[:, 16:, :] = torch.rand(3, 16, 32, generator=g)  # the rest of B differs freely
    return a, b


def test_heat_map_peaks_in_the_region_the_similarity_depends_on() -> None:
    a, b = _pair()
    heat_a, heat_b, sim = score_cam(QuadrantModel(), a, b, batch_size=5, progress=False)
    assert heat_a.shape == heat_b.shape == (32, 32)
    for heat in (heat_a, heat_b):
        assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
        row, col = np.unravel_index(np.argmax(heat), heat.shape)
        assert row < 16 and col < 16
        inside = heat[:16, :16].mean()
        outside = (heat.sum() - heat[:16, :16].sum()) / (heat.size - 256)
        assert inside > 4 * outside
    model = QuadrantModel()
    expected = F.cosine_similarity(model(a[None]), model(b[None])).item()
    assert sim == pytest.approx(expected, abs=1e-5)


def test_batch_size_and_map_limit_do_not_change_the_answer_much() -> None:
    a, b = _pair(1)
    full = score_cam(QuadrantModel(), a, b, batch_size=16, progress=False)
    small = score_cam(QuadrantModel(), a, b, batch_size=3, progress=False)
    np.testing.assert_allclose(full[0], small[0], atol=1e-5)
    limited = score_cam(QuadrantModel(), a, b, max_maps=6, progress=False)
    row, col = np.unravel_index(np.argmax(limited[0]), limited[0].shape)
    assert row < 16 and col < 16


def test_uninformative_model_gives_an_empty_map() -> None:
    """A model whose maps are constant has nothing to localise: the heat map stays all zero, not NaN."""

    class Flat(QuadrantModel):
        def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ones(x.shape[0], 4, 4, 4)

    a, b = _pair(2)
    heat_a, heat_b, _ = score_cam(Flat(), a, b, progress=False)
    assert not np.isnan(heat_a).any() and heat_a.max() == 0.0 and heat_b.max() == 0.0


def test_bad_batch_size_is_a_one_line_error() -> None:
    a, b = _pair()
    with pytest.raises(SubmitError, match="batch_size"):
        score_cam(QuadrantModel(), a, b, batch_size=0, progress=False)


def test_unreadable_image_names_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(SubmitError, match="broken.jpg: cannot decode image"):
        load_image(bad)
    with pytest.raises(SubmitError, match="missing.jpg: image file not found"):
        load_image(tmp_path / "missing.jpg")


def test_render_pair_writes_a_png_atomically(tmp_path) -> None:
    rgb = np.zeros((32, 16, 3), dtype=np.uint8)
    heat = np.linspace(0, 1, 32 * 16, dtype=np.float32).reshape(32, 16)
    out = render_pair([("q.jpg", rgb, heat), ("g.jpg", rgb, heat)], 0.5, tmp_path / "pair.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pair.png"]
    with pytest.raises(SubmitError, match="does not exist"):
        render_pair([("q.jpg", rgb, heat)], 0.5, tmp_path / "nope" / "pair.png")


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Two synthetic crops of one player (and a file that is not an image)."""
    from submit.synthetic import _players, render

    root = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    player = _players(1, rng)[0]
    paths = []
    for name in ("q.jpeg", "g.jpeg"):
        render(player, rng).save(root / name)
        paths.append(str(root / name))
    (root / "bad.jpeg").write_bytes(b"\xff\xd8 truncated")
    return root, paths


def _run_dir(root) -> str:
    """A training run dir holding an untrained tiny timm CNN as its best checkpoint."""
    from submit import config, training
    from submit.backbones import build_embedder
    from submit.recipe import BackboneSpec, Recipe

    recipe = Recipe(name="tiny", backbone=BackboneSpec(name="timm:resnet10t", image_size=(64, 32)))
    run = root / "run"
    run.mkdir(exist_ok=True)
    state = build_embedder(recipe.backbone).state_dict()
    training.save_atomic({"format": training.FORMAT, "kind": "best", "recipe": config.to_mapping(recipe),
                          "model": state}, run / "best.pt")
    return str(run)


def test_cli_explain_with_an_untrained_backbone_and_with_a_run(crops) -> None:
    from click.testing import CliRunner

    from submit.cli import main

    root, (q, g) = crops
    out = root / "pair.png"
    res = CliRunner().invoke(main, ["explain", q, g, "--model", "open_clip:reident-tiny-vit", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    out2 = root / "pair_run.png"
    res = CliRunner().invoke(main, ["explain", q, g, "--run", _run_dir(root), "--max-maps", "64",
                                    "--out", str(out2)])
    assert res.exit_code == 0, res.output
    assert out2.read_bytes()[:4] == b"\x89PNG"


def test_cli_explain_errors_are_one_line(crops) -> None:
    from click.testing import CliRunner

    from submit.cli import main

    root, (q, _) = crops
    bad = str(root / "bad.jpeg")
    res = CliRunner().invoke(main, ["explain", q, bad, "--model", "open_clip:reident-tiny-vit",
                                    "--out", str(root / "x.png")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: cannot decode image")
    res = CliRunner().invoke(main, ["explain", q, q, "--out", str(root / "x.png")])
    assert res.exit_code == 2 and "exactly one of --run RUN_DIR or --model NAME" in res.output
    assert not (root / "x.png").exists()
