"""Fault campaign (issue 12): every bad input and fault is one line on stderr, exit 2, nothing half-written.

Tables of cases per class: output-side OS errors on a real tiny tmpfs (full, read-only) for every command,
range checks of recipe/spec fields and CLI options, devices, binary configs, stale temps of killed runs,
silently-wrong data (16-bit crops, huge ids, duplicates), and the smaller ones (folder modes, jersey's
--out on a refusal, decode messages, constant distance matrices).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from cli_helpers import KILLED_WRITE, invoke, one_error_line
from click.testing import CliRunner
from PIL import Image

from submit import atomic, config, training
from submit.cli import MIN_DEMO_PLAYERS, main
from submit.ensembling import load_spec
from submit.errors import SubmitError
from submit.manifest import read_manifest, select, write_manifest
from submit.prepare import prepare
from submit.ranking_file import read_ranking, write_ranking
from submit.recipe import Recipe, _yaml_value, load_recipe
from submit.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
CLIP = "reident-tiny-vit"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Synthetic source and DATA_DIR, two one-step tiny runs, a two-member spec and a test ranking file."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reliability")
    src = make_dataset(root / "src", players=20, seqs=2, frames=3, seed=5)
    data = prepare(src, root / "data", progress=False).data_dir
    for seed in (0, 1):
        recipe = training.apply_overrides(load_recipe(TINY), ["data.workers=0", "train.checkpoint_every=0",
                                                              "train.epochs=1", f"seed={seed}"])
        training.train(recipe, data, root / "runs" / f"tiny-{seed}", max_steps=1, progress=False)
    spec = root / "spec.yaml"
    spec.write_text("members: [{run: '${RUNS}/tiny-0'}, {run: '${RUNS}/tiny-1'}]\nfusion: mean\n")
    df = read_manifest(data)
    q, g = select(df, "test", "query"), select(df, "test", "gallery")
    ranking = write_ranking(root / "test.csv", np.random.default_rng(0).random((len(q), len(g))),
                            q["image_id"], g["image_id"])
    crops = [str(data / p) for p in q["path"][:2]]
    return {"root": root, "src": src, "data": data, "runs": root / "runs", "spec": spec, "ranking": ranking,
            "crops": crops}


_invoke = invoke
_one_error_line = one_error_line


def _files_below(folder: Path) -> list[str]:
    """Every file (not folder) below `folder`, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


# ---------------------------------------------------------------- class 1: output-side OS errors


def _can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN); chmod does not stop root."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/reident-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok


CAN_MOUNT = _can_mount()


@contextlib.contextmanager
def _faulty_fs(where: Path, kind: str, free_kib: int = 0) -> Iterator[Path]:
    """A real tiny tmpfs at `where`: 'full' (a ballast file leaves `free_kib` free) or 'readonly' (remounted ro)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={64 + free_kib}k", "tmpfs", str(where)], check=True)
    try:
        if kind == "full":
            fd = os.open(where / "ballast", os.O_WRONLY | os.O_CREAT)
            with contextlib.suppress(OSError):
                for _ in range(16):  # 64 KiB of ballast
                    os.write(fd, b"\0" * 4096)
                if not free_kib:
                    while True:
                        os.write(fd, b"\0" * 4096)
            os.close(fd)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _command(name: str, world: dict, out: Path) -> list[str]:
    """The command line of `name` writing its output under `out`."""
    w = world
    return {
        "prepare": ["prepare", w["src"], "--out", out / "data"],
        "train": ["train", TINY, "--data", w["data"], "--out", out / "run", "--max-steps", "1", "--device", "cpu",
                  "--set", "data.workers=0"],
        "predict": ["predict", "--ensemble", w["spec"], "--data", w["data"], "--split", "test", "--out",
                    out / "r.csv", "--runs-dir", w["runs"], "--workers", "0", "--device", "cpu"],
        "report": ["report", w["ranking"], "--data", w["data"], "--out", out / "rep"],
        "explain": ["explain", *w["crops"], "--model", f"open_clip:{CLIP}", "--out", out / "pair.png",
                    "--device", "cpu", "--max-maps", "8"],
        "jersey": ["jersey", "--data", w["data"], "--split", "test", "--role", "query", "--model", CLIP,
                   "--out", out / "numbers.csv", "--device", "cpu"],
        "fit-weights": ["fit-weights", "--ensemble", w["spec"], "--data", w["data"], "--out", out / "w.yaml",
                        "--runs-dir", w["runs"], "--workers", "0", "--device", "cpu", "--grid", "0,1"],
        "demo": ["demo", "--out", out / "demo", "--device", "cpu"],
        "export": ["export", w["runs"] / "tiny-0", "--out", out / "m.onnx"],
        "runs": ["runs", w["runs"], "--plot", out / "curves.png"],
    }[name]


WRITERS = ["prepare", "train", "predict", "report", "explain", "jersey", "fit-weights", "demo", "export", "runs"]


@pytest.mark.skipif(not CAN_MOUNT, reason="needs root allowed to mount a tmpfs (see test_atomic_layer_* below)")
@pytest.mark.parametrize("kind", ["full", "readonly"])
@pytest.mark.parametrize("name", WRITERS)
def test_output_on_a_full_or_read_only_file_system_is_one_line_and_leaves_nothing(world, tmp_path, name,
                                                                                  kind) -> None:
    with _faulty_fs(tmp_path / "mnt", kind) as mnt:
        before = _files_below(mnt)
        code, stderr = _invoke(_command(name, world, mnt))
        assert code == 2, stderr
        line = _one_error_line(stderr)
        reason = os.strerror(errno.ENOSPC if kind == "full" else errno.EROFS)
        assert line.endswith(f"cannot write ({reason})") and str(mnt) in line, line
        assert "ballast" not in line and ".tmp" not in line, line
        assert _files_below(mnt) == before  # no partial file, no temp


@pytest.mark.skipif(not CAN_MOUNT, reason="needs root allowed to mount a tmpfs")
@pytest.mark.parametrize("name", ["train", "prepare"])
def test_a_disk_that_fills_mid_run_is_one_line_and_leaves_no_temp(world, tmp_path, name) -> None:
    """192 KiB free: the small first writes fit, the checkpoint or the images do not (torch.save reports a
    failed write as a RuntimeError: the atomic layer still names the full disk)."""
    with _faulty_fs(tmp_path / "mnt", "full", free_kib=192) as mnt:
        code, stderr = _invoke(_command(name, world, mnt))
        assert code == 2, stderr
        line = _one_error_line(stderr)
        assert line.endswith(f"cannot write ({os.strerror(errno.ENOSPC)})") and str(mnt) in line, line
        assert not [p for p in mnt.rglob(".*")], "a temp was left behind"


def test_evaluate_reads_a_ranking_file_on_a_read_only_file_system(world, tmp_path) -> None:
    if not CAN_MOUNT:
        pytest.skip("needs root allowed to mount a tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        shutil.copy(world["ranking"], mnt / "test.csv")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        code, stderr = _invoke(["evaluate", mnt / "test.csv", "--data", world["data"]])
        assert code == 0, stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.parametrize("name,target", [("train", "run"), ("predict", "r.csv"), ("explain", "pair.png"), ("jersey", "numbers.csv"),
                                         ("fit-weights", "w.yaml"), ("prepare", "data"), ("report", "rep")])
def test_out_of_the_wrong_kind_is_one_line(world, tmp_path, name, target) -> None:
    """A folder where a file is expected, or a file where a folder is expected: one line, nothing changed."""
    wrong = tmp_path / target
    if "." in target:
        wrong.mkdir()
    else:
        wrong.write_text("not a folder")
    code, stderr = _invoke(_command(name, world, tmp_path))
    assert code == 2
    line = _one_error_line(stderr)
    assert str(wrong) in line and ("folder" in line or "file" in line), line
    assert wrong.is_dir() == ("." in target) and _files_below(tmp_path) == ([] if "." in target else [target])


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
@pytest.mark.parametrize("writer", ["ranking", "manifest", "checkpoint", "text", "folder"])
def test_atomic_layer_turns_write_errors_into_one_line_and_removes_the_temp(tmp_path, monkeypatch, writer,
                                                                            fault) -> None:
    """Patch the write layer (works without root): the error names the target, never the temp; no leftovers."""
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(fault, os.strerror(fault), str(src))

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    target = tmp_path / {"ranking": "r.csv", "manifest": "manifest.csv", "checkpoint": "last.pt",
                         "text": "metrics.json", "folder": "report"}[writer]
    with pytest.raises(SubmitError) as err:
        if writer == "ranking":
            write_ranking(target, np.zeros((1, 2)) + [[0.1, 0.2]], [1], [2, 3])
        elif writer == "manifest":
            write_manifest(pd.DataFrame([{"path": "a.jpg", "split": "train", "role": "train", "pid": 1, "seq": 1,
                                          "frame": 0, "image_id": 1}]), tmp_path)
        elif writer == "checkpoint":
            training.save_atomic({"x": torch.zeros(3)}, target)
        elif writer == "text":
            atomic.write_text(target, "{}")
        else:
            with atomic.atomic_dir(target) as tmp:
                (tmp / "index.html").write_text("x")
    assert str(err.value) == f"{target}: cannot write ({os.strerror(fault)})"
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc,expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/o/.r.csv.123-0123abcd.tmp"),
     "/o/r.csv: cannot write (No space left on device)"),
    (OSError(errno.EROFS, "Read-only file system", "/o/.w.yaml.tmp"), "/o/w.yaml: cannot write (Read-only file system)"),
    (PermissionError(errno.EACCES, "Permission denied", "/o/x.png"), "/o/x.png: Permission denied"),
    (FileExistsError(errno.EEXIST, "File exists", "/o/run"), "/o/run: exists and is not a folder; expected a folder path"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/o/f/run"),
     "/o/f/run: a part of the path is a file; expected folders"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/img.jpg"), "/d/img.jpg: No such file or directory"),
    (OSError(errno.ENOSPC, "No space left on device", b"/r/tb/events.out.tfevents.1"),  # a library's bytes name
     "/r/tb/events.out.tfevents.1: cannot write (No space left on device)"),
])
def test_the_funnel_names_the_target_of_a_stray_os_error(exc, expected) -> None:
    assert atomic.describe(exc) == expected


# ---------------------------------------------------------------- class 2: ranges at load


RECIPE_CASES = [
    ("train.lr=-1", "train.lr", "expected > 0"),
    ("train.lr=.nan", "train.lr", "expected a finite number"),
    ("train.lr=.inf", "train.lr", "expected a finite number"),
    ("train.epochs=0", "train.epochs", "expected >= 1"),
    ("train.pairs_per_batch=0", "train.pairs_per_batch", "expected >= 1"),
    ("backbone.image_size=[0, 0]", "backbone.image_size[0]", "expected >= 1"),
    ("backbone.image_size=[32, -4]", "backbone.image_size[1]", "expected >= 1"),
    ("train.warmup_epochs=-1", "train.warmup_epochs", "expected >= 0"),
    ("train.min_lr=-1e-5", "train.min_lr", "expected >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay", "expected >= 0"),
    ("train.accum_steps=0", "train.accum_steps", "expected >= 1"),
    ("train.label_smoothing=1", "train.label_smoothing", "expected in [0, 1)"),
    ("train.ema_decay=1.5", "train.ema_decay", "expected in [0, 1)"),
    ("train.layer_decay=0", "train.layer_decay", "expected in (0, 1]"),
    ("train.grad_clip=0", "train.grad_clip", "expected > 0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every", "expected >= 0"),
    ("train.augment.hflip=1.5", "train.augment.hflip", "expected in [0, 1]"),
    ("train.augment.random_erasing=-0.1", "train.augment.random_erasing", "expected in [0, 1]"),
    ("data.workers=-1", "data.workers", "expected >= 0"),
    ("data.folds=1", "data.folds", "expected >= 2"),
    ("tta.scales=[1.0, 0]", "tta.scales[1]", "expected > 0"),
    ("tta.batch_size=0", "tta.batch_size", "expected >= 1"),
    ("backbone.std=[0.5, 0, 0.5]", "backbone.std[1]", "expected > 0"),
    ("seed=-1", "seed", "expected in [0, 4294967295]"),
]


@pytest.mark.parametrize("override,key,expected", RECIPE_CASES)
def test_recipe_numbers_out_of_range_are_refused_naming_the_key(tmp_path, override, key, expected) -> None:
    with pytest.raises(SubmitError) as err:
        training.apply_overrides(load_recipe(TINY), [override])
    assert f"key {key!r}: {expected}" in str(err.value)
    # the same check when the value comes from the YAML file itself
    data = config.to_mapping(load_recipe(TINY))
    section, _, field = override.partition("=")[0].rpartition(".")
    node = data
    for part in section.split(".") if section else []:
        node = node[part]
    node[field] = _yaml_value(override.partition("=")[2], "t", key)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SubmitError, match=re.escape(f"bad.yaml: key {key!r}: {expected}")):
        load_recipe(path)


def test_shipped_recipes_are_in_range() -> None:
    for path in sorted((REPO / "models").glob("*.yaml")):
        assert isinstance(load_recipe(path), Recipe)


SPEC_CASES = [
    ("members: [{run: r, weight: .nan}]", "members[0].weight", "expected a finite number"),
    ("members: [{run: r, weight: .inf}]", "members[0].weight", "expected a finite number"),
    ("members: [{run: r, weight: -1}]", "members[0].weight", "expected >= 0"),
    ("members: [{run: r}]\nreliability_k: 0", "reliability_k", "expected >= 1"),
    ("members: [{run: r, train: {recipe: x.yaml, seed: -3}}]", "members[0].train.seed", "expected in [0, 4294967295]"),
    ("members: [{run: r, tta: {scales: [0]}}]", "members[0].tta.scales[0]", "expected > 0"),
    ("members: [{run: r, tta: {batch_size: 0}}]", "members[0].tta.batch_size", "expected >= 1"),
    ("members: [{run: r}]\njersey: {numbers: n.csv, threshold: 2}", "jersey.threshold", "expected in [0, 1]"),
    ("members: [{run: r}]\njersey: {numbers: n.csv, bonus: -0.1}", "jersey.bonus", "expected >= 0"),
    ("members: [{run: r}]\njersey: {numbers: n.csv, penalty: .nan}", "jersey.penalty", "expected a finite number"),
    ("members: [{run: r}]\npostprocess: [{op: k_reciprocal, params: {k1: .inf}}]", "postprocess[0].params.k1",
     "expected a finite number"),
]


@pytest.mark.parametrize("body,key,expected", SPEC_CASES)
def test_spec_numbers_out_of_range_are_refused_naming_the_key(tmp_path, body, key, expected) -> None:
    (tmp_path / "r").mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(body + "\n")
    with pytest.raises(SubmitError) as err:
        load_spec(spec, require_runs=False)
    assert f"key {key!r}: {expected}" in str(err.value), str(err.value)


OPTION_CASES = [
    (["predict", "--ensemble", "demo", "--data", "D", "--out", "o.csv", "--workers", "-1"], "--workers"),
    (["fit-weights", "--ensemble", "demo", "--data", "D", "--out", "o.yaml", "--workers", "-1"], "--workers"),
    (["fit-weights", "--ensemble", "demo", "--data", "D", "--out", "o.yaml", "--grid", "nan,1"], "--grid"),
    (["fit-weights", "--ensemble", "demo", "--data", "D", "--out", "o.yaml", "--grid", "1,inf"], "--grid"),
    (["fit-weights", "--ensemble", "demo", "--data", "D", "--out", "o.yaml", "--grid", "-1,1"], "--grid"),
    (["jersey", "--data", "D", "--model", CLIP, "--out", "n.csv", "--batch-size", "0"], "--batch-size"),
    (["explain", "q", "g", "--model", "m", "--out", "p.png", "--batch-size", "0"], "--batch-size"),
    (["explain", "q", "g", "--model", "m", "--out", "p.png", "--max-maps", "0"], "--max-maps"),
    (["train", "r.yaml", "--data", "D", "--out", "o", "--max-steps", "0"], "--max-steps"),
    (["train", "r.yaml", "--data", "D", "--out", "o", "--epochs", "0"], "--epochs"),
    (["report", "r.csv", "--data", "D", "--out", "o", "--top-k", "0"], "--top-k"),
    (["report", "r.csv", "--data", "D", "--out", "o", "--per-page", "-3"], "--per-page"),
    (["prepare", "s.zip", "--out", "o", "--test-fraction", "1.5"], "--test-fraction"),
    (["demo", "--out", "o", "--players", "0"], "--players"),
    (["demo", "--out", "o", "--players", str(MIN_DEMO_PLAYERS - 1)], "--players"),
    (["demo", "--out", "o", "--players", "-5"], "--players"),
    (["demo", "--out", "o", "--seed", "-1"], "--seed"),
    (["prepare", "s.zip", "--out", "o", "--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("args,option", OPTION_CASES)
def test_cli_options_out_of_range_are_one_line_before_any_work(tmp_path, monkeypatch, args, option) -> None:
    monkeypatch.chdir(tmp_path)
    code, stderr = _invoke(args)
    assert code == 2
    line = _one_error_line(stderr)
    assert option in line, line
    assert list(tmp_path.iterdir()) == []


def test_set_overrides_on_the_command_line_go_through_the_same_checks(world, tmp_path) -> None:
    code, stderr = _invoke(["train", TINY, "--data", world["data"], "--out", tmp_path / "run",
                            "--set", "train.lr=-1e-4"])
    assert code == 2 and "train.lr" in _one_error_line(stderr) and "expected > 0" in stderr
    assert not (tmp_path / "run").exists()


def test_demo_player_minimum_matches_what_the_demo_recipe_needs() -> None:
    pairs = load_recipe(REPO / "models" / "demo-cnn.yaml").train.pairs_per_batch
    assert int(MIN_DEMO_PLAYERS * 0.6) >= pairs > int((MIN_DEMO_PLAYERS - 1) * 0.6)


# ---------------------------------------------------------------- class 6: devices


DEVICE_COMMANDS = {
    "train": ["train", TINY, "--data", "{data}", "--out", "{out}/run"],
    "predict": ["predict", "--ensemble", "demo", "--data", "{data}", "--out", "{out}/r.csv"],
    "fit-weights": ["fit-weights", "--ensemble", "demo", "--data", "{data}", "--out", "{out}/w.yaml"],
    "jersey": ["jersey", "--data", "{data}", "--model", CLIP, "--out", "{out}/n.csv"],
    "explain": ["explain", "q.jpg", "g.jpg", "--model", "m", "--out", "{out}/p.png"],
    "demo": ["demo", "--out", "{out}/demo"],
}
BAD_DEVICES = ["tpu9", "cuda:99", "banana"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", BAD_DEVICES)
@pytest.mark.parametrize("name", sorted(DEVICE_COMMANDS))
def test_unusable_devices_are_one_line_before_any_work(world, tmp_path, name, device) -> None:
    args = [str(a).format(data=world["data"], out=tmp_path) for a in DEVICE_COMMANDS[name]]
    code, stderr = _invoke([*args, "--device", device])
    assert code == 2
    line = _one_error_line(stderr)
    assert line.startswith(f"error: --device {device}: "), line
    assert list(tmp_path.iterdir()) == []  # demo made no synthetic data, train no run folder


# ---------------------------------------------------------------- class 8: binary files as configs


BINARY = b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x81binary"


@pytest.mark.parametrize("name", ["recipe", "spec", "ranking", "manifest", "truth"])
def test_binary_files_given_as_configs_or_csvs_are_one_line(world, tmp_path, name) -> None:
    blob = tmp_path / f"blob.{'csv' if name in ('ranking', 'truth') else 'yaml'}"
    blob.write_bytes(BINARY)
    if name == "manifest":
        data = tmp_path / "data"
        data.mkdir()
        (data / "manifest.csv").write_bytes(BINARY)
        args = ["evaluate", world["ranking"], "--data", data]
        blob = data / "manifest.csv"
    else:
        args = {"recipe": ["train", blob, "--data", world["data"], "--out", tmp_path / "run"],
                "spec": ["predict", "--ensemble", blob, "--data", world["data"], "--out", tmp_path / "r.csv"],
                "ranking": ["evaluate", blob, "--data", world["data"]],
                "truth": ["jersey", "--data", world["data"], "--model", CLIP, "--out", tmp_path / "n.csv",
                          "--truth", blob]}[name]
    code, stderr = _invoke(args)
    assert code == 2
    line = _one_error_line(stderr)
    assert str(blob) in line and ("UTF-8" in line or "readable CSV" in line), line
    assert not (tmp_path / "n.csv").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- class 5: stale temps of killed runs


def _dead_pid() -> int:
    """The pid of a process that has exited (a killed run's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("writer", ["ranking", "checkpoint", "manifest", "prepare", "report"])
def test_a_rerun_removes_the_temps_a_killed_run_left(world, tmp_path, writer) -> None:
    out = tmp_path / {"ranking": "r.csv", "checkpoint": "last.pt", "manifest": "manifest.csv",
                      "prepare": "data", "report": "rep"}[writer]
    kind = "dir" if writer in ("prepare", "report") else "file"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, kind, str(out)], cwd=REPO)
    assert killed.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]
    assert len(left) == 1 and not out.exists()
    live = out.with_name(f".{out.name}.{os.getpid()}-0123abcd.tmp")  # a live writer's temp is not touched
    live.write_text("in use")
    if writer == "ranking":
        write_ranking(out, np.array([[0.5]]), [1], [1])
    elif writer == "checkpoint":
        training.save_atomic({"x": 1}, out)
    elif writer == "manifest":
        write_manifest(read_manifest(world["data"]), tmp_path)
    elif writer == "prepare":
        prepare(world["src"], out, progress=False)
    else:
        assert _invoke(["report", world["ranking"], "--data", world["data"], "--out", out])[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name])


def test_stale_temp_names_are_matched_exactly(tmp_path) -> None:
    target = tmp_path / "r.csv"
    dead = _dead_pid()
    stale = tmp_path / f".r.csv.{dead}-deadbeef.tmp"
    reused = tmp_path / f".r.csv.{os.getpid()}-1-deadbeef.tmp"  # our pid, another start time: a container's pid 1
    live = atomic.temp_for(target)  # this very process
    other = tmp_path / f".r.csv.bak.{dead}-deadbeef.tmp"  # another target's temp
    user = tmp_path / ".r.csv.notes"  # a user's file
    for p in (stale, reused, live, other, user):
        p.write_text("x")
    assert sorted(atomic.remove_stale(target)) == sorted([stale, reused])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, user.name])


# ---------------------------------------------------------------- class 3: silently wrong data


def _official_zip(path: Path, crops: dict[str, bytes], duplicate: str | None = None) -> Path:
    """A minimal official-layout zip of the given members (one name added twice when asked)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in crops.items():
            zf.writestr(f"data_reid/{name}", data)
        if duplicate:
            with pytest.warns(UserWarning):
                zf.writestr(f"data_reid/{duplicate}", crops[duplicate])
    return path


def _jpeg(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 16), (value, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _official_crops(**overrides: bytes) -> dict[str, bytes]:
    crops = {"reid_training/1_1_0.jpeg": _jpeg(), "reid_training/1_1_1.jpeg": _jpeg(),
             "reid_training/2_1_0.jpeg": _jpeg(), "reid_training/2_1_1.jpeg": _jpeg(),
             "reid_test/query/3_1_0.jpeg": _jpeg(), "reid_test/gallery/3_1_1.jpeg": _jpeg(),
             "reid_challenge/query/1.jpeg": _jpeg(), "reid_challenge/gallery/2.jpeg": _jpeg()}
    crops.update(overrides)
    return crops


def test_a_16_bit_grey_crop_keeps_its_contrast(tmp_path) -> None:
    grey = np.zeros((16, 8), np.uint16)
    grey[:, 4:] = 40000  # half black, half 61% grey
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    src = _official_zip(tmp_path / "src.zip", _official_crops(**{"reid_training/1_1_0.png": buf.getvalue()}))
    data = prepare(src, tmp_path / "data", progress=False).data_dir
    with Image.open(data / "images" / "reid_training" / "1_1_0.png") as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 7].tolist() == [156, 156, 156]  # not white


@pytest.mark.parametrize("case,expected", [
    ("pid", "pid 12345678901234567890123 is out of range"),
    ("challenge id", "image_id 99999999999999999999 is out of range"),
    ("duplicate member", "appears twice"),
    ("float pixels", "floating-point"),
    ("not an image", "not a decodable image (cannot identify image file);"),
])
def test_silently_wrong_sources_are_refused_naming_the_file(tmp_path, case, expected) -> None:
    crops, dup = _official_crops(), None
    if case == "pid":
        crops["reid_training/12345678901234567890123_1_0.jpeg"] = _jpeg()
    elif case == "challenge id":
        crops["reid_challenge/gallery/99999999999999999999.jpeg"] = _jpeg()
    elif case == "duplicate member":
        dup = "reid_training/1_1_0.jpeg"
    elif case == "float pixels":
        buf = io.BytesIO()
        Image.fromarray(np.ones((16, 8), np.float32)).save(buf, format="TIFF")
        crops["reid_training/1_1_0.jpeg"] = buf.getvalue()
    else:
        crops["reid_training/1_1_0.jpeg"] = b"GIF? no, just bytes"
    src = _official_zip(tmp_path / "src.zip", crops, dup)
    code, stderr = _invoke(["prepare", src, "--out", tmp_path / "data"])
    assert code == 2
    line = _one_error_line(stderr)
    assert str(src) in line and expected in line and "BytesIO" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.zip"]


@pytest.mark.parametrize("edit,expected", [
    (lambda df: pd.concat([df, df.iloc[[3]]]), "is listed twice"),
    (lambda df: df.assign(pid=df["pid"].astype(object).where(df.index != 2, "12345678901234567890123")),
     "row 4: pid 12345678901234567890123 is out of range"),
    (lambda df: df.assign(seq=df["seq"].where(df.index != 1, -7)), "row 3: seq -7 is out of range"),
])
def test_bad_manifest_rows_are_refused_naming_the_row(world, tmp_path, edit, expected) -> None:
    data = tmp_path / "data"
    data.mkdir()
    edit(pd.read_csv(world["data"] / "manifest.csv")).to_csv(data / "manifest.csv", index=False)
    code, stderr = _invoke(["evaluate", world["ranking"], "--data", data])
    assert code == 2
    line = _one_error_line(stderr)
    assert f"{data / 'manifest.csv'}: " in line and expected in line, line


# ---------------------------------------------------------------- class 10: smaller ones


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_prepared_and_report_folders_follow_the_umask(world, tmp_path, umask, mode) -> None:
    old = os.umask(umask)
    try:
        data = prepare(world["src"], tmp_path / "data", progress=False).data_dir
        assert _invoke(["report", world["ranking"], "--data", world["data"], "--out", tmp_path / "rep"])[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(data.stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "rep").stat().st_mode) == mode


@pytest.mark.parametrize("truth", ["binary", "no columns", "missing"])
def test_jersey_writes_no_out_file_when_it_refuses(world, tmp_path, truth) -> None:
    bad = tmp_path / "truth.csv"
    if truth == "binary":
        bad.write_bytes(BINARY)
    elif truth == "no columns":
        bad.write_text("a,b\n1,2\n")
    out = tmp_path / "numbers.csv"
    code, stderr = _invoke(["jersey", "--data", world["data"], "--split", "test", "--role", "query", "--model",
                            CLIP, "--out", out, "--truth", bad, "--device", "cpu"])
    assert code == 2 and str(bad) in _one_error_line(stderr)
    assert not out.exists()


@pytest.mark.parametrize("fill,warned", [("constant", "every distance in the file is 0.5"),
                                         ("one flat row", "1 of"), ("random", None)])
def test_evaluate_warns_about_distances_that_rank_nothing(world, tmp_path, fill, warned) -> None:
    df = read_manifest(world["data"])
    q, g = select(df, "test", "query"), select(df, "test", "gallery")
    dist = np.random.default_rng(1).random((len(q), len(g)))
    if fill == "constant":
        dist[:] = 0.5
    elif fill == "one flat row":
        dist[0] = 0.25
    path = write_ranking(tmp_path / "r.csv", dist, q["image_id"], g["image_id"])
    res = CliRunner().invoke(main, ["evaluate", str(path), "--data", str(world["data"])])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    if warned is None:
        assert not any("distance" in w for w in warnings)
    else:
        assert any(warned in w for w in warnings), res.stderr


def test_train_report_to_none_trains_without_curves(world, tmp_path) -> None:
    """`--report-to none` was parsed twice (CLI, then train) and refused as `--report-to ''`."""
    code, stderr = _invoke(["train", TINY, "--data", world["data"], "--out", tmp_path / "run", "--max-steps", "1",
                            "--device", "cpu", "--set", "data.workers=0", "--report-to", "none"])
    assert code == 0, stderr
    assert (tmp_path / "run" / "last.pt").is_file() and not (tmp_path / "run" / "tb").exists()


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_every_image_reader_keeps_16_bit_grey_contrast(tmp_path, mode) -> None:
    """transforms.open_image (training, embedding, explain) and the report's thumbnails share prepare.to_8bit."""
    from submit.transforms import open_image

    grey = np.zeros((16, 8), np.uint16 if mode == "I;16" else np.int32)
    grey[:, 4:] = 40000
    path = tmp_path / ("crop.png" if mode == "I;16" else "crop.tif")  # PIL writes mode I as TIFF, not PNG
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode == mode
    rgb = np.asarray(open_image(path))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 7].tolist() == [156, 156, 156]


@pytest.mark.parametrize("name", ["recipe", "spec", "ranking", "truth"])
def test_a_folder_given_as_an_input_file_is_one_line(world, tmp_path, name) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    args = {"recipe": ["train", folder, "--data", world["data"], "--out", tmp_path / "run"],
            "spec": ["predict", "--ensemble", folder, "--data", world["data"], "--out", tmp_path / "r.csv"],
            "ranking": ["evaluate", folder, "--data", world["data"]],
            "truth": ["jersey", "--data", world["data"], "--model", CLIP, "--out", tmp_path / "n.csv",
                      "--truth", folder]}[name]
    code, stderr = _invoke(args)
    assert code == 2
    line = _one_error_line(stderr)
    assert str(folder) in line and ("is a folder" in line or "not found" in line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


@pytest.mark.parametrize("body,key", [("name: a\nname: b\nbackbone: {name: timm:resnet10t}\n", "name"),
                                      ("name: a\nbackbone: {name: timm:resnet10t}\ntrain:\n  lr: 1.0e-4\n"
                                       "  lr: 1.0e-3\n", "lr")])
def test_a_key_given_twice_in_yaml_is_refused_not_silently_the_last(tmp_path, body, key) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(body)
    with pytest.raises(SubmitError, match=re.escape(f"r.yaml: key {key!r} appears twice (line")):
        load_recipe(path)


@pytest.mark.parametrize("exc,expected", [
    (OSError(errno.ENOSPC, "No space left on device", "{tmp}/img.jpg"), "{target}: cannot write (No space left on device)"),
    (OSError(errno.EACCES, "Permission denied", "/src/in.jpg"), "/src/in.jpg: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/elsewhere/x"), "{target}: cannot write (No space left on device)"),
    (OSError(errno.EIO, "Input/output error"), "{target}: cannot write (Input/output error)"),
])
def test_write_errors_blame_the_output_only_for_the_outputs_faults(tmp_path, exc, expected) -> None:
    """An input the block read is named with its own reason; a disk-level fault is always the output's."""
    target, tmp = tmp_path / "out", tmp_path / ".out.1-0123abcd.tmp"
    if exc.filename:
        exc.filename = exc.filename.format(tmp=tmp)
    assert str(atomic.write_error(exc, target, tmp)) == expected.format(target=target)


@pytest.mark.parametrize("name", ["recipe", "manifest", "ranking"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_key(world, tmp_path, name) -> None:
    """Editors and Excel on Windows save UTF-8 with a BOM: it must not become part of 'name', 'path' or '0'."""
    bom = b"\xef\xbb\xbf"
    if name == "recipe":
        path = tmp_path / "r.yaml"
        path.write_bytes(bom + TINY.read_bytes())
        assert load_recipe(path).name == "tiny-test"
    elif name == "manifest":
        (tmp_path / "manifest.csv").write_bytes(bom + (world["data"] / "manifest.csv").read_bytes())
        assert len(read_manifest(tmp_path)) == len(read_manifest(world["data"]))
    else:
        path = tmp_path / "r.csv"
        path.write_bytes(bom + world["ranking"].read_bytes())
        assert read_ranking(path)[0].shape == read_ranking(world["ranking"])[0].shape
