"""ONNX export: onnxruntime vs the torch embedder to 1e-4 at batches 1, 3 and 17 for a CNN (timm resnet10t, as
the demo) and a ViT (the tiny open_clip ViT); metadata; the documented input contract on real crops; atomic
writes; one-line errors (unsupported operator, bad options, not a run) and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from submit import export, training
from submit.cli import main
from submit.embedding import embed_views
from submit.errors import SubmitError
from submit.manifest import fingerprint, read_manifest
from submit.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

ort = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
FAST = ["data.workers=0", "train.checkpoint_every=0", "train.epochs=1", "train.pairs_per_batch=4",
        "data.split=all"]
RECIPES = {"vit": (REPO / "models" / "tiny-test.yaml", []),
           "cnn": (REPO / "models" / "demo-cnn.yaml", ["tta.batch_size=16"])}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def run_dir(request, data_dir, tmp_path_factory) -> Path:
    """A run of two optimizer steps (weights and BN statistics no longer at their initial values)."""
    path, extra = RECIPES[request.param]
    recipe = training.apply_overrides(load_recipe(path), [*FAST, *extra])
    out = tmp_path_factory.mktemp(f"run_{request.param}") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training.train(recipe, data_dir, out, max_steps=2, progress=False, report_to=("none",))
    finally:
        torch.set_num_threads(before)
    return out


def torch_reference(embedder: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """What the toolkit computes: normalise with the tower's mean/std, embed, L2-normalise."""
    from submit.transforms import normalise

    with torch.no_grad():
        feats = embedder(normalise(x, embedder.mean, embedder.std))
    return torch.nn.functional.normalize(feats.float(), dim=1).numpy()


def test_onnx_matches_torch_for_batches_1_3_17(run_dir, data_dir, tmp_path):
    out = tmp_path / "embedder.onnx"
    result = export.export_onnx(run_dir, out, checkpoint="best")
    embedder, recipe = training.load_trained(run_dir, "best")
    assert result.path == str(out) and out.stat().st_size == result.bytes > 0
    assert not list(tmp_path.glob(".*tmp"))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    h, w = embedder.input_size
    assert inp.name == "images" and inp.type == "tensor(float)" and outp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str) and list(inp.shape[1:]) == [3, h, w]  # symbolic batch axis
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3, 17):
        x = torch.rand(batch, 3, h, w, generator=generator)
        got = session.run(None, {"images": x.numpy()})[0]
        want = torch_reference(embedder, x)
        assert got.dtype == np.float32 and got.shape == (batch, embedder.embed_dim)
        assert np.abs(got - want).max() < 1e-4, (batch, float(np.abs(got - want).max()))
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    meta = export.read_metadata(out)
    assert meta["input_size"] == (h, w) and meta["embedding_dim"] == embedder.embed_dim
    assert meta["mean"] == pytest.approx(embedder.mean) and meta["std"] == pytest.approx(embedder.std)
    assert meta["recipe"] == recipe.name and meta["backbone"] == recipe.backbone.name
    assert meta["manifest"] == fingerprint(read_manifest(data_dir)) == result.manifest
    assert "[0, 1]" in meta["input"] and "L2" in meta["output"]


def test_documented_input_is_letterboxed_rgb_over_255(run_dir, data_dir, tmp_path):
    from submit.transforms import letterbox, open_image, to_tensor

    out = tmp_path / "embedder.onnx"
    export.export_onnx(run_dir, out, checkpoint="last")
    embedder, _ = training.load_trained(run_dir, "last")
    rows = read_manifest(data_dir).query("split == 'test'").head(5)
    paths = rows["path"].tolist()
    want = embed_views(embedder, data_dir, rows, training.IDENTITY_VIEW, device="cpu", workers=0, progress=False,
                       in_training=True)  # what validation embeds
    boxed = [to_tensor(letterbox(open_image(data_dir / p), embedder.input_size)) for p in paths]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"images": torch.stack(boxed).numpy()})[0]
    assert np.abs(got - want).max() < 1e-4


class Eigh(torch.nn.Module):
    """A tower with an operator the ONNX exporter has no conversion for."""

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1)[:, :4]
        return torch.linalg.eigh(f[:, :, None] @ f[:, None, :])[0]


def test_unsupported_operator_is_one_line_naming_it():
    with pytest.raises(SubmitError) as err:
        export._to_onnx(export.NormalizedEmbedder(Eigh()), (8, 8), 17, "timm:weird")
    message = str(err.value)
    assert "\n" not in message and "aten::linalg_eigh" in message and "timm:weird" in message
    assert "opset 17" in message


def test_unsupported_message_without_an_operator_is_the_first_line():
    message = export.unsupported_message(RuntimeError("boom\nmore"), "x", 17)
    assert message.endswith(": boom") and "\n" not in message


def test_bad_options_and_folders_are_one_line_errors(tmp_path):
    cases = [({"run_dir": tmp_path / "missing"}, "not a folder"),
             ({"run_dir": tmp_path}, "checkpoint not found"),
             ({"run_dir": tmp_path, "checkpoint": "newest"}, "expected best, last or a .pt file"),
             ({"run_dir": tmp_path, "opset": 99}, "--opset 99"),
             ({"run_dir": tmp_path, "out": tmp_path}, "is a folder"),
             ({"run_dir": tmp_path, "out": tmp_path / "no" / "x.onnx"}, "does not exist")]
    for kwargs, words in cases:
        args = {"out": tmp_path / "x.onnx", **kwargs}
        with pytest.raises(SubmitError) as err:
            export.export_onnx(args.pop("run_dir"), args.pop("out"), **args)
        assert words in str(err.value) and "\n" not in str(err.value), words
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(SubmitError, match="not a readable ONNX file"):
        export.read_metadata(tmp_path / "x.onnx")


def test_cli_export(run_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "e.onnx"
    result = runner.invoke(main, ["export", str(run_dir), "--out", str(out), "--checkpoint", "last",
                                  "--opset", "18"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "[0, 1]" in result.output and out.is_file()
    bad = runner.invoke(main, ["export", str(tmp_path / "nope"), "--out", str(out)])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and len(bad.output.strip().splitlines()) == 1


def test_missing_onnx_package_is_one_line(run_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(SubmitError) as err:
        export.export_onnx(run_dir, tmp_path / "x.onnx")
    assert "pip install onnx" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_member_embeds_like_its_run_in_predict(run_dir, data_dir, tmp_path):
    from submit import predict
    from submit.ensembling import load_spec

    export.export_onnx(run_dir, tmp_path / "e.onnx", checkpoint="last")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(f"members:\n  - {{run: '{run_dir}', checkpoint: last, tta: {{hflip: true}}}}\n"
                         "  - {onnx: e.onnx, tta: {hflip: true}}\nfusion: mean\n")
    spec = load_spec(spec_file)
    assert spec.members[1].onnx == str(tmp_path / "e.onnx") and spec.members[1].name == "e"
    rows = read_manifest(data_dir).query("split == 'test'")
    run_feats, onnx_feats = (predict.member_features(m, data_dir, rows, "cpu", 0, False) for m in spec.members)
    assert onnx_feats.shape == run_feats.shape and np.abs(onnx_feats - run_feats).max() < 1e-4
    result = predict.predict(spec_file, data_dir, "test", tmp_path / "test.csv", device="cpu", workers=0,
                             progress=False)
    scores = result["scores"]
    assert abs(scores["e"]["mAP"] - scores[spec.members[0].name]["mAP"]) < 1e-6
    assert not any("manifest" in note for note in result["notes"])  # the file's manifest matches the run's


def test_onnx_member_errors_are_one_line(tmp_path):
    from submit.ensembling import load_spec

    (tmp_path / "e.onnx").write_bytes(b"x")
    for member, words in (("{onnx: missing.onnx}", "missing.onnx not found"),
                          ("{onnx: e.onnx, run: somewhere}", "an ONNX member takes no run"),
                          ("{onnx: e.onnx, checkpoint: last}", "takes no checkpoint")):
        (tmp_path / "spec.yaml").write_text(f"members:\n  - {member}\n")
        with pytest.raises(SubmitError) as err:
            load_spec(tmp_path / "spec.yaml")
        assert words in str(err.value) and "members[0].onnx" in str(err.value) and "\n" not in str(err.value)
