"""predict end to end on synthetic data: tiny trained runs -> ensemble -> a ranking file the validator accepts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from submit import predict as predict_mod
from submit import trained, training
from submit.cli import main
from submit.ensembling import load_spec
from submit.errors import SubmitError
from submit.manifest import fingerprint, read_manifest, select
from submit.metrics import evaluate_distances
from submit.prepare import prepare
from submit.ranking_file import read_ranking
from submit.recipe import load_recipe
from submit.reranking import cosine_distance
from submit.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A prepared synthetic DATA_DIR and two tiny runs (seeds 0 and 1, a few steps each)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("predict")
    make_dataset(root / "src", players=20, seqs=2, frames=3, seed=3)
    prepare(root / "src", root / "data", progress=False)
    for seed in (0, 1):
        recipe = training.apply_overrides(load_recipe(TINY), ["data.workers=0", "train.checkpoint_every=0",
                                                              "train.epochs=1", f"seed={seed}", "tta.hflip=true"])
        training.train(recipe, root / "data", root / "runs" / f"tiny-{seed}", max_steps=2, progress=False)
    return {"root": root, "data": root / "data", "runs": root / "runs"}


def _spec(folder: Path, body: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def _predict(world: dict, spec: Path, split: str, out: Path) -> dict:
    return predict_mod.predict(spec, world["data"], split, out, device="cpu", runs_dir=world["runs"], workers=0,
                               progress=False)


def _check_file(world: dict, out: Path, split: str) -> np.ndarray:
    df = read_manifest(world["data"])
    q, g = select(df, split, "query"), select(df, split, "gallery")
    dist, q_ids, g_ids = read_ranking(out, expect_queries=q["image_id"], expect_gallery=g["image_id"])
    assert dist.shape == (len(q), len(g)) and np.isfinite(dist).all()
    return dist


def test_test_split_writes_a_valid_file_and_scores_every_stage(world, tmp_path) -> None:
    spec = _spec(tmp_path, """
        members:
          - run: ${RUNS}/tiny-0
          - {run: '${RUNS}/tiny-1', checkpoint: last, weight: 2}
          - {run: '${RUNS}/tiny-1', tta: {hflip: false}}
        fusion: mean+reliability
        reliability_k: 5
        postprocess:
          - {op: query_expansion, params: {k: 2}}
          - {op: k_reciprocal, params: {k1: 6, k2: 3, lambda_value: 0.3}}
        """)
    out = tmp_path / "test.csv"
    result = _predict(world, spec, "test", out)
    dist = _check_file(world, out, "test")
    labels = list(result["scores"])
    assert result["members"] == ["tiny-0", "tiny-1@last", "tiny-1"]
    assert labels[:3] == ["tiny-0", "tiny-0 + QE", "tiny-0 + QE + re-rank"]
    assert result["postprocess"] == "post-processing on each member: QE(k=2) -> re-rank(k1=6, k2=3, lambda_value=0.3)"
    assert labels[-2:] == ["fused (mean+reliability), raw", "fused (mean+reliability)"]
    assert len(labels) == 3 * 3 + 2
    for score in result["scores"].values():
        assert set(score) == {"mAP", "rank1", "rank5", "rank10", "mINP"}
        assert all(0.0 <= v <= 1.0 for v in score.values())
    df = read_manifest(world["data"])
    direct = evaluate_distances(dist, select(df, "test", "query")["pid"], select(df, "test", "gallery")["pid"])
    assert result["scores"][labels[-1]]["mAP"] == pytest.approx(direct["mAP"])


def test_challenge_split_writes_file_numbers_and_no_scores(world, tmp_path) -> None:
    spec = _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0'}, {run: '${RUNS}/tiny-1'}]\nfusion: rank\n")
    out = tmp_path / "challenge.csv"
    result = _predict(world, spec, "challenge", out)
    _check_file(world, out, "challenge")
    assert result["scores"] == {} and result["split"] == "challenge" and result["notes"] == []
    header = out.read_text().splitlines()[0].split(",")
    assert header[:3] == ["0", "0", "1"]  # challenge gallery ids are the file numbers 00000, 00001, ...


def test_features_are_cached_so_a_second_predict_loads_no_weights(world, tmp_path, monkeypatch) -> None:
    spec = _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0', tta: {scales: [1.0, 0.9]}}]\n")
    first = _predict(world, spec, "test", tmp_path / "a.csv")

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded although the features were cached")

    monkeypatch.setattr(trained, "load_trained", refuse)
    second = _predict(world, spec, "test", tmp_path / "b.csv")
    assert first["scores"] == second["scores"]
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_postprocess_on_fused_runs_the_chain_on_concatenated_features(world, tmp_path) -> None:
    spec = _spec(tmp_path, """
        members: [{run: '${RUNS}/tiny-0'}, {run: '${RUNS}/tiny-1', weight: 3}]
        postprocess: [{op: k_reciprocal, params: {k1: 6, k2: 3}}]
        postprocess_on: fused
        """)
    result = _predict(world, spec, "test", tmp_path / "f.csv")
    labels = list(result["scores"])
    assert labels == ["tiny-0", "tiny-1", "fused (mean)", "fused (mean) + re-rank"]
    assert result["postprocess"] == "post-processing on the fused features: re-rank(k1=6, k2=3)"
    _check_file(world, tmp_path / "f.csv", "test")


def test_members_trained_on_the_test_split_get_a_note(world, tmp_path) -> None:
    run = tmp_path / "leaky"
    run.mkdir()
    recipe = (world["runs"] / "tiny-0" / "recipe.yaml").read_text().replace("split: train", "split: all")
    assert "split: all" in recipe
    (run / "recipe.yaml").write_text(recipe)
    (run / "best.pt").write_bytes((world["runs"] / "tiny-0" / "best.pt").read_bytes())
    spec = _spec(tmp_path, "members: [{run: leaky}, {run: '${RUNS}/tiny-0'}]\n")
    result = _predict(world, spec, "test", tmp_path / "l.csv")
    leak = "member leaky trained on test-split crops (data.split: all); its test scores are optimistic"
    assert result["notes"] == [leak, BEST_ON_TEST.format("tiny-0")]
    # the same weights under another run dir hit the same cached features (identity = content hash)
    assert result["scores"]["leaky"] == result["scores"]["tiny-0"]


BEST_ON_TEST = ("member {} uses best.pt, chosen by test-split mAP during training (data.split: train), so its "
                "test scores are optimistic; use checkpoint: last for a fair score")


def _tiny_run(data: Path, run: Path) -> Path:
    """One optimizer step of the tiny recipe on `data` (enough to record the manifest it trained on)."""
    recipe = training.apply_overrides(load_recipe(TINY), ["data.workers=0", "train.checkpoint_every=0",
                                                          "train.epochs=1", "tta.hflip=true"])
    training.train(recipe, data, run, max_steps=1, progress=False)
    return run


def _no_embedding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("members were embedded before their manifests were checked")
    monkeypatch.setattr(predict_mod.embedding, "embed", refuse)


def test_members_trained_on_different_manifests_are_refused_before_embedding(world, tmp_path, monkeypatch) -> None:
    make_dataset(tmp_path / "src", players=16, seqs=2, frames=3, seed=5)
    prepare(tmp_path / "src", tmp_path / "data", progress=False)
    _tiny_run(tmp_path / "data", tmp_path / "elsewhere")
    theirs, ours = fingerprint(read_manifest(tmp_path / "data")), fingerprint(read_manifest(world["data"]))
    assert theirs != ours
    # agreeing members trained on other data than --data: allowed (another year's data), with a note
    result = _predict(world, _spec(tmp_path, "members: [{run: elsewhere}]\n", "one.yaml"), "test", tmp_path / "o.csv")
    assert result["notes"] == [f"run members were trained on manifest {theirs[:12]}, not on "
                               f"{world['data'] / 'manifest.csv'} ({ours[:12]}): other data, fine when intended"]
    _no_embedding(monkeypatch)
    spec = _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0'}, {run: '${RUNS}/tiny-1'}, {run: elsewhere}]\n")
    for call in (lambda: _predict(world, spec, "challenge", tmp_path / "x.csv"),
                 lambda: predict_mod.fit_weights(spec, world["data"], tmp_path / "w.yaml", runs_dir=world["runs"],
                                                 workers=0, progress=False)):
        with pytest.raises(SubmitError) as err:
            call()
        assert str(err.value) == (f"members tiny-0 and elsewhere were trained on different manifests ({ours[:12]} vs "
                                  f"{theirs[:12]}); ensemble runs trained on the same prepared data")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "w.yaml").exists()


def test_the_same_data_prepared_into_another_folder_is_the_same_manifest(world, tmp_path) -> None:
    prepare(world["root"] / "src", tmp_path / "copy", progress=False)  # the same source, prepared again elsewhere
    _tiny_run(tmp_path / "copy", tmp_path / "copy-run")
    spec = _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0'}, {run: copy-run, checkpoint: last}]\n")
    ours, copied = fingerprint(read_manifest(world["data"])), fingerprint(read_manifest(tmp_path / "copy"))
    assert ours == copied
    assert predict_mod.trained_manifests(load_spec(spec, world["runs"])) == {"tiny-0": ours, "copy-run@last": copied}
    result = predict_mod.predict(spec, tmp_path / "copy", "test", tmp_path / "c.csv", device="cpu",
                                 runs_dir=world["runs"], workers=0, progress=False)
    assert result["notes"] == [BEST_ON_TEST.format("tiny-0")]  # no refusal, no "other data" note


def test_unrecorded_manifests_and_best_chosen_on_test_get_notes(world, tmp_path) -> None:
    old = tmp_path / "old-run"  # a run saved before manifests were recorded
    old.mkdir()
    (old / "recipe.yaml").write_text((world["runs"] / "tiny-0" / "recipe.yaml").read_text())
    ckpt = torch.load(world["runs"] / "tiny-0" / "best.pt", weights_only=True)
    del ckpt["manifest"]
    torch.save(ckpt, old / "best.pt")
    weights = tmp_path / "tiny.pt"
    torch.save(_visual_state(world), weights)
    (tmp_path / "zero.yaml").write_text(f"name: zero\nbackbone: {{name: 'open_clip:reident-tiny-vit', pretrained: "
                                        f"'{weights}', image_size: [32, 32]}}\n")
    spec = _spec(tmp_path, """
        members:
          - {run: old-run}
          - {recipe: zero.yaml}
          - {run: '${RUNS}/tiny-1', checkpoint: last}
          - {run: '${RUNS}/tiny-0'}
        """)
    unknown = ("member(s) old-run record no training manifest (trained before fingerprints "
               "were kept), so they are not checked against the others")  # the zero-shot member never trained
    test = _predict(world, spec, "test", tmp_path / "t.csv")
    assert test["notes"] == [unknown, BEST_ON_TEST.format("old-run"), BEST_ON_TEST.format("tiny-0")]
    challenge = _predict(world, spec, "challenge", tmp_path / "c.csv")
    assert challenge["notes"] == [unknown]  # best.pt is no leak on the challenge split


def test_concatenated_features_give_the_weighted_mean_cosine_distance() -> None:
    rng = np.random.default_rng(0)

    def unit(n: int, d: int) -> np.ndarray:
        x = rng.normal(size=(n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    a, b = (unit(3, 4), unit(5, 4)), (unit(3, 6), unit(5, 6))
    q, g = predict_mod.concat_features([a, b], [1.0, 3.0])
    mean = (cosine_distance(*a) + 3 * cosine_distance(*b)) / 4
    assert np.allclose(cosine_distance(q, g), mean, atol=1e-6)
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)


def test_recipe_member_uses_its_pretrained_weights_file(world, tmp_path) -> None:
    weights = tmp_path / "tiny.pt"
    torch.save(_visual_state(world), weights)
    recipe = tmp_path / "zero.yaml"
    recipe.write_text(f"name: zero\nbackbone: {{name: 'open_clip:reident-tiny-vit', pretrained: '{weights}', "
                      f"image_size: [32, 32]}}\ntta: {{hflip: false}}\n")
    spec = _spec(tmp_path, "members: [{recipe: zero.yaml}, {run: '${RUNS}/tiny-0', tta: {hflip: false}}]\n")
    result = _predict(world, spec, "test", tmp_path / "z.csv")
    # the recipe member holds tiny-0's fine-tuned image tower, so both members score the same
    assert result["scores"]["zero"] == pytest.approx(result["scores"]["tiny-0"])


def _visual_state(world: dict) -> dict:
    """tiny-0's fine-tuned image-tower weights as an image-tower-only state dict."""
    state = torch.load(world["runs"] / "tiny-0" / "best.pt", weights_only=True)["model"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def test_cli_prints_the_table_and_errors_are_one_line(world, tmp_path) -> None:
    spec = _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0'}]\n")
    out = tmp_path / "cli.csv"
    args = ["predict", "--ensemble", str(spec), "--data", str(world["data"]), "--split", "test", "--out", str(out),
            "--runs-dir", str(world["runs"]), "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output and "tiny-0" in result.output and f"wrote {out}" in result.output.replace("\n", "")
    bad = CliRunner().invoke(main, [*args[:2], str(tmp_path / "nope.yaml"), *args[3:]])
    assert bad.exit_code == 2 and "error: " in bad.output and "nope.yaml: ensemble spec not found" in bad.output
    no_runs = CliRunner().invoke(main, args[:-6] + ["--workers", "0"])
    assert no_runs.exit_code == 2 and "pass the runs folder (--runs-dir)" in no_runs.output


def test_bare_names_resolve_in_the_repo_ensembles_folder() -> None:
    assert predict_mod.resolve_spec_path("demo") == REPO / "ensembles" / "demo.yaml"
    assert predict_mod.resolve_spec_path("best.yaml") == REPO / "ensembles" / "best.yaml"
    with pytest.raises(SubmitError, match=r"nosuch: ensemble spec not found \(a path, or one of: .*best"):
        predict_mod.resolve_spec_path("nosuch")


@pytest.mark.parametrize("name, runs", [("demo", ["demo-cnn-seed0", "demo-cnn-seed1"]),
                                        ("best", ["vit-l-14-openai", "vit-l-14-336-openai", "eva02-l-14"])])
def test_shipped_specs_validate(tmp_path, name, runs) -> None:
    for run in runs:
        (tmp_path / run).mkdir()
        (tmp_path / run / "recipe.yaml").write_text("name: x\nbackbone: {name: 'timm:resnet10t'}\n")
        (tmp_path / run / "best.pt").write_bytes(b"")
    spec = load_spec(REPO / "ensembles" / f"{name}.yaml", runs_dir=tmp_path)
    assert [m.name for m in spec.members] == runs


def test_missing_split_and_bad_split_are_one_line_errors(world, tmp_path) -> None:
    spec = _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0'}]\n")
    with pytest.raises(SubmitError, match="--split 'train'"):
        _predict(world, spec, "train", tmp_path / "x.csv")
    with pytest.raises(SubmitError, match="no manifest"):
        predict_mod.predict(spec, tmp_path, "test", tmp_path / "x.csv", runs_dir=world["runs"], progress=False)
    assert not (tmp_path / "x.csv").exists()


def test_weight_grid_skips_zero_and_proportional_duplicates() -> None:
    grid = predict_mod.weight_grid(2, (0.0, 1.0, 2.0))
    assert grid == [(0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (1.0, 2.0), (2.0, 1.0)]


def test_fit_weights_writes_a_spec_that_reproduces_its_score(world, tmp_path) -> None:
    (tmp_path / "specs").mkdir()
    spec = _spec(tmp_path / "specs", """
        members:
          - {run: '${RUNS}/tiny-0'}
          - {run: ../runs_copy/tiny-1, checkpoint: last, train: {recipe: ../runs_copy/tiny-1/recipe.yaml}}
        fusion: rank
        """)
    (tmp_path / "runs_copy").symlink_to(world["runs"], target_is_directory=True)
    out = tmp_path / "fitted" / "deeper" / "fit.yaml"
    result = predict_mod.fit_weights(spec, world["data"], out, grid=(0.0, 1.0, 3.0), device="cpu",
                                     runs_dir=world["runs"], workers=0, progress=False)
    assert result["tried"] == 5 and tuple(result["weights"]) in predict_mod.weight_grid(2, (0.0, 1.0, 3.0))
    assert result["score"]["mAP"] >= result["spec_score"]["mAP"]
    text = out.read_text()
    assert text.startswith("# fitted on the test split") and "${RUNS}/tiny-0" in text
    assert "run: ../../runs_copy/tiny-1\n" in text and "recipe: ../../runs_copy/tiny-1/recipe.yaml" in text
    again = _predict(world, out, "test", tmp_path / "fitted.csv")
    assert again["scores"]["fused (rank)"]["mAP"] == pytest.approx(result["score"]["mAP"], abs=1e-4)
    with pytest.raises(SubmitError, match="--grid"):
        predict_mod.fit_weights(spec, world["data"], out, grid=(0.0,), runs_dir=world["runs"], progress=False)


def test_fit_weights_cli(world, tmp_path) -> None:
    spec = _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0'}, {run: '${RUNS}/tiny-1'}]\n")
    base = ["fit-weights", "--ensemble", str(spec), "--data", str(world["data"]), "--out", str(tmp_path / "w.yaml"),
            "--runs-dir", str(world["runs"]), "--workers", "0", "--device", "cpu"]
    ok = CliRunner().invoke(main, [*base, "--grid", "1,2"])
    assert ok.exit_code == 0, ok.output
    assert "best of 3 weightings: tiny-0=" in ok.output and (tmp_path / "w.yaml").is_file()
    assert "test mAP (fitted on the split it reports)" in ok.output and "the fitted score is optimistic" in ok.output
    bad = CliRunner().invoke(main, [*base, "--grid", "1,x"])
    assert bad.exit_code == 2 and "error: --grid '1,x': expected comma-separated numbers" in bad.output


def test_jersey_step_moves_distances_by_the_bonus_and_penalty(world, tmp_path) -> None:
    """With true shirt numbers read confidently, agreeing pairs move by -bonus and differing ones by +penalty."""
    import pandas as pd

    df = read_manifest(world["data"])
    truth = pd.read_csv(world["data"] / "numbers.csv")
    number_of = {f"images/{p}": n for p, n in zip(truth["path"], truth["number"])}
    rows = df[df["split"] == "test"]
    pd.DataFrame({"path": rows["path"], "image_id": rows["image_id"],
                  "number": [number_of[p] for p in rows["path"]], "prob": 1.0}).to_csv(tmp_path / "n.csv", index=False)
    spec = _spec(tmp_path, f"""
        members: [{{run: '${{RUNS}}/tiny-0'}}]
        jersey: {{numbers: n.csv, bonus: 0.2, penalty: 0.3}}
    """)
    result = _predict(world, spec, "test", tmp_path / "t.csv")
    assert list(result["scores"])[-1] == "+ shirt numbers"
    plain = _predict(world, _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0'}]\n", "plain.yaml"), "test",
                     tmp_path / "p.csv")
    with_numbers, plain_d = _check_file(world, tmp_path / "t.csv", "test"), _check_file(world, tmp_path / "p.csv", "test")
    q, g = select(df, "test", "query"), select(df, "test", "gallery")
    same = np.equal.outer(q["path"].map(number_of).to_numpy(), g["path"].map(number_of).to_numpy())
    expected = plain_d + np.where(same, -0.2, 0.3)
    assert np.abs(with_numbers - expected).max() < 2e-5  # both files carry 5 decimals
    assert result["scores"]["+ shirt numbers"]["mAP"] >= plain["scores"][list(plain["scores"])[-1]]["mAP"]


def test_jersey_step_needs_one_number_source(world, tmp_path) -> None:
    spec = _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0'}]\njersey: {bonus: 0.1}\n")
    with pytest.raises(SubmitError, match="key 'jersey': give exactly one of 'model'"):
        load_spec(spec, runs_dir=world["runs"])
    spec = _spec(tmp_path, "members: [{run: '${RUNS}/tiny-0'}]\njersey: {numbers: none.csv}\n", "b.yaml")
    with pytest.raises(SubmitError, match=r"key 'jersey.numbers': .*none.csv not found"):
        load_spec(spec, runs_dir=world["runs"])


@pytest.mark.parametrize("on", ["member", "fused"])
def test_whitening_fitted_on_the_train_split_per_member_and_after_fusion(world, tmp_path, on) -> None:
    """pca_whitening with fit_on: train gets each member's features of the manifest's train rows (fused: the
    weighted concatenation of them, like the query and gallery features)."""
    from submit import reranking

    spec = _spec(tmp_path, f"""
        members: [{{run: '${{RUNS}}/tiny-0'}}, {{run: '${{RUNS}}/tiny-1', weight: 3}}]
        postprocess:
          - {{op: pca_whitening, params: {{dim: 12, fit_on: train}}}}
          - {{op: k_reciprocal, params: {{k1: 6, k2: 3}}}}
        postprocess_on: {on}
        """)
    result = _predict(world, spec, "test", tmp_path / "w.csv")
    first = "tiny-0" if on == "member" else "fused (mean)"
    assert [f"{first} + PCA-whiten", f"{first} + PCA-whiten + re-rank"] == [
        label for label in result["scores"] if label.startswith(f"{first} +")]
    assert "PCA-whiten(dim=12, fit_on=train) -> re-rank(k1=6, k2=3)" in result["postprocess"]
    df = read_manifest(world["data"])
    query, gallery, train = select(df, "test", "query"), select(df, "test", "gallery"), select(df, "train", "train")
    spec = load_spec(spec, runs_dir=world["runs"])

    def feats(member, rows):
        return predict_mod.member_features(member, world["data"], rows, "cpu", 0, False)

    members = spec.members if on == "fused" else spec.members[:1]
    weights = [m.weight for m in members]
    q, g, t = (predict_mod.weighted_concat([feats(m, rows) for m in members], weights)
               for rows in (query, gallery, train))
    q, g = reranking.pca_whitening(q, g, dim=12, fit_on="train", train_feats=t)
    want = evaluate_distances(cosine_distance(q, g), query["pid"], gallery["pid"])
    assert result["scores"][f"{first} + PCA-whiten"]["mAP"] == pytest.approx(want["mAP"], abs=1e-12)
    _check_file(world, tmp_path / "w.csv", "test")
