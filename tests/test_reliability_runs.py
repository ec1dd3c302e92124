"""Fault campaign (issue 12), classes 4, 7 and 9: runs mixed up, loader-worker errors, packaging.

- class 4: an exclusive lock per run folder (`train`) and per DATA_DIR (`prepare`): a second writer is refused
  at once with one line naming the holder, a dead holder's lock is taken over, nothing is left behind;
  a checkpoint whose backbone differs from its folder's recipe.yaml is refused by predict, explain and export.
- class 7: an error raised in a DataLoader worker is its one line (training, validation, predict), exit 2.
- class 9: a built wheel carries models/ and ensembles/, and its demo runs from outside the checkout.
Plus the funnel's wording for an OSError that names no file.
"""

from __future__ import annotations

import errno
import filecmp
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml
from cli_helpers import invoke, one_error_line, tiny_world

from submit import atomic, bundled, locks, training
from submit.distributed import DistInfo
from submit.errors import SubmitError, loader_errors, worker_message
from submit.manifest import read_manifest
from submit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
HOLDER = re.compile(r"in use by (?P<cmd>\w+) \(pid (?P<pid>\d+) on (?P<host>\S+), since [\w :]+\); "
                    r"wait for it or choose another --out$")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A synthetic source and DATA_DIR, and one one-step tiny run with a spec naming it."""
    root = tmp_path_factory.mktemp("runs-reliability")
    src, data, _ = tiny_world(root)
    spec = root / "spec.yaml"
    spec.write_text("members: [{run: '${RUNS}/tiny'}]\nfusion: mean\n")
    return {"root": root, "src": src, "data": data, "run": root / "runs" / "tiny", "spec": spec}


_invoke = invoke
_one_error_line = one_error_line


def _everything_below(folder: Path) -> list[str]:
    """Every file and folder below `folder`, relative, sorted (hidden ones included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- class 4: one writer per folder


_HOLD = textwrap.dedent("""
    import sys, time
    from submit import locks
    kind, target = sys.argv[1], sys.argv[2]
    lock = locks.run_lock(target, "train") if kind == "run" else locks.sibling_lock(target, "prepare")
    with lock:
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin (or kills us)
""")


class _Holder:
    """Another process holding a run-folder (`run`) or sibling (`sibling`) lock until released or killed."""

    def __init__(self, kind: str, target: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, kind, str(target)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=120) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=120)


LOCK_CASES = [("run", lambda d: locks.run_lock(d, "train"), "train"),
              ("sibling", lambda d: locks.sibling_lock(d, "prepare"), "prepare")]


@pytest.mark.parametrize("kind,take,command", LOCK_CASES)
def test_a_held_lock_refuses_a_second_writer_naming_the_holder(tmp_path, kind, take, command) -> None:
    target = tmp_path / "out"
    holder = _Holder(kind, target)
    try:
        with pytest.raises(SubmitError) as err:
            with take(target):
                pytest.fail("a second writer got the lock")
        m = HOLDER.search(str(err.value))
        assert str(err.value).startswith(f"{target}: ") and m, err.value
        assert (m["cmd"], int(m["pid"])) == (command, holder.proc.pid)
    finally:
        holder.release()
    assert _everything_below(tmp_path) == [], "the lock file (and a folder made for it) outlive the holder"
    with take(target):  # released: the next writer gets it
        pass


@pytest.mark.parametrize("kind,take,command", LOCK_CASES)
def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path, kind, take, command) -> None:
    target = tmp_path / "out"
    _Holder(kind, target).kill()
    assert [p.name for p in tmp_path.rglob("*lock")], "kill -9 leaves the lock file (the kernel frees the lock)"
    with take(target):
        pass
    assert not list(tmp_path.rglob("*lock"))


def test_a_run_lock_keeps_a_folder_the_block_wrote_into(tmp_path) -> None:
    with locks.run_lock(tmp_path / "a" / "run", "train") as run:
        (run / "recipe.yaml").write_text("x")
    assert _everything_below(tmp_path) == ["a", "a/run", "a/run/recipe.yaml"]


def _train_args(world: dict, out: Path) -> list:
    return ["train", TINY, "--data", world["data"], "--out", out, "--max-steps", "1", "--device", "cpu",
            "--set", "data.workers=0"]


@pytest.mark.parametrize("name", ["train", "train --resume", "prepare", "prepare --force"])
def test_a_second_command_into_a_held_folder_is_one_line_and_writes_nothing(world, tmp_path, name) -> None:
    out = tmp_path / ("run" if name.startswith("train") else "data")
    holder = _Holder("run" if name.startswith("train") else "sibling", out)
    try:
        before = _everything_below(tmp_path)
        args = _train_args(world, out) if name.startswith("train") else ["prepare", world["src"], "--out", out]
        code, stderr = _invoke(args + name.split()[1:])
        assert code == 2
        line = _one_error_line(stderr)
        assert line.startswith(f"error: {out}: in use by ") and HOLDER.search(line), line
        assert _everything_below(tmp_path) == before
    finally:
        holder.release()


def test_train_leaves_no_lock_and_a_refused_train_no_folder(world, tmp_path) -> None:
    code, stderr = _invoke(_train_args(world, tmp_path / "run"))
    assert code == 0, stderr
    assert not (tmp_path / "run" / locks.RUN_LOCK).exists()
    code, stderr = _invoke(_train_args(world, tmp_path / "new" / "run") + ["--resume"])
    assert code == 2 and "nothing to resume" in _one_error_line(stderr)
    assert _everything_below(tmp_path).count("new") == 0, _everything_below(tmp_path)


def test_under_torchrun_only_rank_0_locks_and_every_rank_hears_a_refusal(tmp_path, monkeypatch) -> None:
    """Rank 1 takes no lock (no file of its own) and raises rank 0's refusal instead of waiting at a barrier."""
    refusal = f"{tmp_path / 'run'}: in use by train (pid 1 on h, since 10:00); wait for it or choose another --out"
    monkeypatch.setattr(training, "gather_objects", lambda obj, info: [refusal, obj])
    with pytest.raises(SubmitError, match=re.escape(refusal)):
        with training._run_lock(tmp_path / "run", DistInfo(world_size=2, rank=1)):
            pytest.fail("rank 1 went on after rank 0 was refused")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(training, "gather_objects", lambda obj, info: [None, obj])
    with training._run_lock(tmp_path / "run", DistInfo(world_size=2, rank=1)):
        assert list(tmp_path.iterdir()) == []  # rank 0 holds it; rank 1 writes no lock


MIXED = [("backbone.name", "timm:resnet10t"), ("backbone.image_size", [48, 32]),
         ("backbone.embedding", "token")]


def _mixed_run(world: dict, tmp_path: Path, key: str, value: object) -> Path:
    """A copy of the tiny run whose recipe.yaml says another backbone than its checkpoints."""
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(world["run"], run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["backbone"][key.split(".")[1]] = value
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run


@pytest.mark.parametrize("key,value", MIXED)
@pytest.mark.parametrize("name", ["predict", "explain", "export"])
def test_a_checkpoint_from_another_backbone_than_recipe_yaml_is_refused(world, tmp_path, name, key, value) -> None:
    run = _mixed_run(world, tmp_path, key, value)
    crops = sorted(str(p) for p in (world["data"] / "images").rglob("*.jp*g"))[:2]
    out = tmp_path / "out"
    out.mkdir()
    args = {"predict": ["predict", "--ensemble", world["spec"], "--data", world["data"], "--split", "test", "--out",
                        out / "r.csv", "--runs-dir", run.parent, "--workers", "0", "--device", "cpu"],
            "explain": ["explain", *crops, "--run", run, "--out", out / "pair.png", "--device", "cpu",
                        "--max-maps", "4"],
            "export": ["export", run, "--out", out / "m.onnx"]}[name]
    code, stderr = _invoke(args)
    assert code == 2
    line = _one_error_line(stderr)
    assert line.startswith(f"error: {run / 'best.pt'}: trained with {key} ") and "recipe.yaml says" in line, line
    assert list(out.iterdir()) == []


def test_a_run_whose_recipe_agrees_still_loads(world) -> None:
    from submit.trained import load_trained

    embedder, recipe = load_trained(world["run"])
    assert recipe.backbone == load_recipe(world["run"] / "recipe.yaml").backbone


# ---------------------------------------------------------------- class 7: loader-worker errors


def _wrapped(exc: BaseException) -> BaseException:
    """`exc` as torch's DataLoader re-raises it in the main process (worker traceback as its text)."""
    from torch._utils import ExceptionWrapper

    try:
        raise exc
    except BaseException:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except BaseException as again:  # noqa: BLE001 - whatever type torch rebuilt
        return again
    raise AssertionError("reraise returned")


WORKER_CASES = [
    (SubmitError("/d/a.jpg: cannot decode image (truncated)"), "/d/a.jpg: cannot decode image (truncated)"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/a.jpg"), "/d/a.jpg: No such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied", "/d/b.jpg"), "/d/b.jpg: Permission denied"),
    (ValueError("bad pixel"), "ValueError: bad pixel (raised in a data-loader worker)"),
    (KeyError("k"), "KeyError: 'k' (raised in a data-loader worker)"),
]


@pytest.mark.parametrize("exc,expected", WORKER_CASES)
def test_a_worker_error_becomes_its_one_line(exc, expected) -> None:
    wrapped = _wrapped(exc)
    assert "Traceback" in str(wrapped)  # what used to reach the user
    assert worker_message(wrapped) == expected
    with pytest.raises(SubmitError) as err:
        with loader_errors():
            raise wrapped
    assert str(err.value) == expected


def test_a_killed_worker_and_other_errors() -> None:
    died = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    assert worker_message(died).startswith("data-loader worker (pid 4242) exited unexpectedly")
    plain = SubmitError("x.yaml: expected a mapping")
    assert worker_message(plain) is None
    with pytest.raises(SubmitError, match="^x.yaml: expected a mapping$"):
        with loader_errors():
            raise plain
    with pytest.raises(ZeroDivisionError):  # not from a worker: untouched
        with loader_errors():
            raise ZeroDivisionError("bug")


def _broken_data(world: dict, tmp_path: Path, how: str, split: str) -> Path:
    """A copy of DATA_DIR whose `split` crops are all removed or replaced by garbage (the first batch meets one)."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data, ignore=shutil.ignore_patterns(".cache"))
    df = read_manifest(data)
    for rel in df.loc[df["split"] == split, "path"]:
        if how == "missing":
            (data / rel).unlink()
        else:
            (data / rel).write_bytes(b"not an image at all")
    return data


@pytest.mark.parametrize("how,reason", [("missing", "image file not found"), ("garbage", "cannot decode image")])
@pytest.mark.parametrize("name", ["train", "predict"])
def test_a_bad_crop_read_by_a_loader_worker_is_one_line(world, tmp_path, name, how, reason) -> None:
    data = _broken_data(world, tmp_path, how, "train" if name == "train" else "test")
    out = tmp_path / "out"
    if name == "train":
        args = ["train", TINY, "--data", data, "--out", out, "--max-steps", "2", "--device", "cpu",
                "--set", "data.workers=1", "--set", "train.pairs_per_batch=8"]
    else:
        args = ["predict", "--ensemble", world["spec"], "--data", data, "--split", "test", "--out", out / "r.csv",
                "--runs-dir", world["run"].parent, "--workers", "1", "--device", "cpu"]
    code, stderr = _invoke(args)
    assert code == 2, stderr
    line = _one_error_line(stderr)
    assert re.fullmatch(rf"error: {re.escape(str(data / 'images'))}/\S+\.jpe?g: {reason}( \(.*\))?", line), line


# ---------------------------------------------------------------- the funnel: an OSError naming no file


@pytest.mark.parametrize("exc,output,command,expected", [
    (OSError(errno.ENOSPC, "No space left on device"), "/o/r.csv", "predict",
     "/o/r.csv: cannot write (No space left on device)"),
    (OSError(errno.EROFS, "Read-only file system"), "/o/run", "train", "/o/run: cannot write (Read-only file system)"),
    (OSError(errno.ENOSPC, "No space left on device"), None, "evaluate",
     "evaluate: No space left on device (the operating system named no file)"),
    (OSError(errno.EIO, "Input/output error"), "/o/r.csv", "predict",
     "predict: Input/output error (the operating system named no file)"),
    (OSError("image file is truncated"), None, None, "reident-submit: image file is truncated (the operating system "
                                                     "named no file)"),
])
def test_an_os_error_naming_no_file_names_the_output_or_the_command(exc, output, command, expected) -> None:
    assert atomic.describe(exc, output, command) == expected


def test_the_cli_funnel_passes_the_command_and_its_out(world, tmp_path, monkeypatch) -> None:
    import submit.report

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(submit.report, "make_report", full)
    ranking = tmp_path / "r.csv"
    ranking.write_text("0\n")
    code, stderr = _invoke(["report", ranking, "--data", world["data"], "--out", tmp_path / "rep"])
    assert code == 2 and _one_error_line(stderr) == f"error: {tmp_path / 'rep'}: cannot write (No space left on device)"


# ---------------------------------------------------------------- class 9: packaging


def test_the_checkout_finds_its_own_models_and_ensembles() -> None:
    assert bundled.ROOT == REPO and bundled.MODELS == REPO / "models" and bundled.ENSEMBLES == REPO / "ensembles"
    from submit.predict import resolve_spec_path

    assert resolve_spec_path("demo") == REPO / "ensembles" / "demo.yaml"
    assert bundled.recipe_path("demo-cnn") == REPO / "models" / "demo-cnn.yaml"
    assert bundled.recipe_path("nosuch") == Path("nosuch")  # left to the loader's own 'not found'


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel `pip install .` would build, from a copy of the sources (the checkout stays untouched)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("submit", "models", "ensembles"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_bundled"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


def _fresh_env(tmp_path: Path, wheel: Path) -> Path:
    """A new virtualenv with the wheel installed (no deps); the heavy dependencies come from this one's
    site-packages through a .pth line (which does not run the editable install's finder)."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = subprocess.run([env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "reident-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    return env


@pytest.mark.slow
def test_a_plain_install_runs_the_demo_outside_the_checkout(tmp_path) -> None:
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("models", "ensembles"):
        shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith(f"submit/_bundled/{folder}/"))
        assert shipped == sorted(p.name for p in (REPO / folder).glob("*.yaml")), folder
    env = _fresh_env(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = dict(cwd=outside, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    where = subprocess.run([env / "bin" / "python", "-c", "import submit.bundled as b; print(b.ROOT)"], **run)
    root = Path(where.stdout.strip())
    assert where.returncode == 0 and root.parts[-2:] == ("submit", "_bundled") and REPO not in root.parents, where
    assert not filecmp.dircmp(root / "models", REPO / "models").diff_files
    demo = subprocess.run([env / "bin" / "reident-submit", "demo", "--out", outside / "demo", "--players", "27",
                           "--device", "cpu"], **run)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (outside / "demo" / "test.csv").is_file() and (outside / "demo" / "challenge.csv").is_file()
