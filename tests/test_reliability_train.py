"""Fault campaign, round 3 (issue 23): what training leaves behind when it is killed, bounded or resumed, and two
leftovers of classes 1 and 4.

- class 2 (second half): `kill -9` at each phase of a run (mid-epoch, during validation, while best.pt or the
  metrics are written, right after an epoch's checkpoint), then `--resume`: TensorBoard holds the event history
  of a run never interrupted (every step once, every validation once, the same values), and metrics.json and
  best.pt the same rows.
- class 6: `--max-steps` bounds the work whatever `train.epochs` says (training and `--dry-run --data`): epoch
  lengths are drawn when needed, the schedule's length exactly up to `EXACT_EPOCHS` epochs, else extrapolated.
- class 8: `--resume` of a run that `--max-steps` stopped appends no validation twice; every log line is
  printed once, even after a library warned on the root logger (which installs a root handler).
- `report` reads the manifest first: a ranking file larger than one for the data can be is refused unread.
- the synthetic zip's scratch folder is created exclusively: a link or folder planted at its name is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, one_error_line
from click.testing import CliRunner
from test_reporting import FAST, read_events, tiny

from submit import atomic, ranking_file, training
from submit.cli import main
from submit.distributed import DistInfo
from submit.errors import SubmitError
from submit.manifest import read_manifest, write_manifest
from submit.optimisation import EXACT_EPOCHS, EpochLengths
from submit.preflight import dry_run
from submit.sampler import PairBatchSampler
from submit.synthetic import make_dataset
from submit.train_data import make_splits

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
SAME_VALUES = ("train/loss", "train/lr", "train/temperature", "val/mAP", "val/rank1", "val/mINP")


def curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of a run folder's event files: tag -> [(step, value)] as TensorBoard shows it."""
    acc = read_events(run / "tb")
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def history(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())["history"]


# ---------------------------------------------------------------- class 2: kill -9 at each phase, then --resume


# Trains FAST into sys.argv[3]; at (phase, step) it says so and waits to be killed. Phases: "step" after that
# step, "validate" as validation starts, "best" / "metrics" before best.pt / the metrics files are written,
# "last" right after the epoch's last.pt is written.
KILLED_AT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from submit import training
    from submit.recipe import load_recipe

    phase, at = sys.argv[4], int(sys.argv[5])
    seen = {"step": 0}

    def hold(name):
        if name == phase and seen["step"] == at:
            print(f"at {name}", flush=True)
            time.sleep(300)

    def on_step(self, step):
        seen["step"] = step
        hold("step")

    def wrap(fn, name, after=False):
        def wrapped(*args, **kwargs):
            if not after:
                hold(name)
            out = fn(*args, **kwargs)
            if after:
                hold(name)
            return out
        return wrapped

    training._Trainer.on_step = on_step
    training.validate = wrap(training.validate, "validate")
    training.write_metrics = wrap(training.write_metrics, "metrics")
    training._Trainer.save_best = wrap(training._Trainer.save_best, "best")
    last = training._Trainer.save_last
    def save_last(self):
        last(self)
        if self.state.batch_in_epoch == 0:
            hold("last")
    training._Trainer.save_last = save_last
    recipe = training.apply_overrides(load_recipe(sys.argv[1]), sys.argv[6:])
    training.train(recipe, sys.argv[2], sys.argv[3], progress=False)
""")


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> Path:
    """The run never interrupted."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight") / "run"
    training.train(tiny(), data_dir, out, progress=False)
    return out


@pytest.mark.parametrize("phase, at, checkpoint", [
    ("step", 5, None),  # before any checkpoint (checkpoint_every 0): nothing to resume, a fresh run in the folder
    ("step", 15, 14),  # mid-epoch: step 15 was logged after the last checkpoint
    ("validate", 13, 12),  # the epoch's steps are done, nothing of its end written yet
    ("best", 13, 12),  # the validation is done, best.pt not written yet
    ("metrics", 13, 12),
    ("last", 13, 13),  # the epoch's checkpoint written, its log line not yet
    ("validate", 26, 24),  # the last epoch's validation
])
def test_killed_at_any_phase_then_resumed_leaves_the_history_of_a_run_never_interrupted(
        data_dir, tmp_path, straight, phase, at, checkpoint):
    out = tmp_path / "run"
    extra = ["train.checkpoint_every=0"] if checkpoint is None else []
    proc = subprocess.Popen([sys.executable, "-c", KILLED_AT, str(TINY), str(data_dir), str(out), phase, str(at),
                             *FAST, *extra], stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip() == f"at {phase}":
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    if checkpoint is None:
        assert not (out / "last.pt").exists() and curves(out)["train/loss"][0] == (1, pytest.approx(
            curves(straight)["train/loss"][0][1]))  # the killed run's events are there
    else:
        assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == checkpoint

    resume = checkpoint is not None
    assert training.train(tiny(), data_dir, out, resume=resume, progress=False)["steps"] == 26
    got, want = curves(out), curves(straight)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag  # every step once, none missing
    assert [s for s, _ in want["val/mAP"]] == [13, 26]
    for tag in SAME_VALUES:
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], abs=1e-6), tag
    rows, rows_straight = history(out), history(straight)
    assert [r["step"] for r in rows] == [r["step"] for r in rows_straight] == [13, 26]
    assert [r["mAP"] for r in rows] == pytest.approx([r["mAP"] for r in rows_straight], abs=1e-9)
    best = torch.load(out / "best.pt", weights_only=True)["metrics"]
    best_straight = torch.load(straight / "best.pt", weights_only=True)["metrics"]
    assert (best["step"], best["mAP"]) == (best_straight["step"], pytest.approx(best_straight["mAP"], abs=1e-9))


def _event_file(log_dir: Path, steps: range, opened: int, host: str = "zzzz-last-host") -> Path:
    """An event file with `train/loss` = 1.0 at `steps`, named as a writer on `host` opened at second `opened`."""
    from torch.utils.tensorboard import SummaryWriter

    scratch = log_dir.parent / "scratch"
    writer = SummaryWriter(str(scratch))
    for step in steps:
        writer.add_scalar("train/loss", 1.0, global_step=step)
    writer.close()
    (made,) = scratch.iterdir()
    log_dir.mkdir(exist_ok=True)
    return made.rename(log_dir / f"events.out.tfevents.{opened}.{host}.99999999.0")


@pytest.mark.parametrize("ahead, start_step, want", [
    (0, 3, [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]),  # opened this second: sorts first
    (1, 3, [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]),  # a second ahead: waited for
    (0, 0, [(1, 2.0), (2, 2.0), (3, 2.0), (4, 2.0), (5, 2.0), (6, 2.0)]),  # a fresh start purges everything
])
def test_a_new_event_file_sorts_after_the_ones_a_killed_run_left(tmp_path, ahead, start_step, want):
    """Readers take event files in name order, which starts with the second the writer was opened: a file a
    killed run opened in the same second (here under a host name that sorts last) must still be read first."""
    log_dir = tmp_path / "run" / "tb"
    _event_file(log_dir, range(1, 6), int(time.time()) + ahead)
    reporter = training.reporting.TensorBoardReporter(tmp_path / "run", start_step, {"name": "x"})
    for step in range(start_step + 1, 7):
        reporter.step(step, {"loss": 2.0})
    reporter.close()
    assert curves(tmp_path / "run")["train/loss"] == want


def test_an_event_file_from_a_clock_far_ahead_is_not_waited_for(tmp_path):
    log_dir = tmp_path / "run" / "tb"
    _event_file(log_dir, range(1, 3), int(time.time()) + 3600)
    start = time.monotonic()
    reporter = training.reporting.TensorBoardReporter(tmp_path / "run", 1, {})
    reporter.step(2, {"loss": 2.0})
    reporter.close()
    assert time.monotonic() - start < 10  # waits at most a few seconds: it cannot reorder such a file


def test_the_reporter_is_flushed_before_every_checkpoint(data_dir, tmp_path, monkeypatch):
    """What a checkpoint covers is on disk before it: a kill -9 right after it loses no event."""
    order: list[str] = []
    flush = training.reporting.TensorBoardReporter.flush
    monkeypatch.setattr(training.reporting.TensorBoardReporter, "flush",
                        lambda self: (order.append("flush"), flush(self))[1])
    save = training.save_atomic
    monkeypatch.setattr(training, "save_atomic",
                        lambda obj, path: (order.append(Path(path).name), save(obj, path))[1])
    training.train(tiny("train.epochs=1"), data_dir, tmp_path / "run", progress=False)
    lasts = [i for i, name in enumerate(order) if name == "last.pt"]
    assert len(lasts) == 7  # steps 2, 4, ..., 12 and the epoch's end
    assert all(order[i - 1] == "flush" for i in lasts), order
    assert order.index("best.pt") < lasts[-1]  # best.pt before the epoch's checkpoint


# ---------------------------------------------------------------- class 6: a bounded step count bounds the work


class Counted:
    """A per-epoch length function that counts its calls; lengths vary by epoch, as drawn ones do."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, epoch: int) -> int:
        self.calls.append(epoch)
        return 13 + (epoch % 3 == 0)


@pytest.mark.parametrize("epochs", [1, 2, 7, EXACT_EPOCHS, EXACT_EPOCHS + 1, 10 ** 9, 10 ** 18])
def test_epoch_lengths_are_drawn_when_needed_and_the_total_is_bounded_work(epochs):
    length = Counted()
    lengths = EpochLengths(length, epochs)
    assert len(lengths) == epochs and length.calls == []  # nothing drawn up front
    assert lengths[epochs - 1] == length(epochs - 1) and lengths[epochs - 1] == length(epochs - 1)
    length.calls.clear()
    exact = min(epochs, EXACT_EPOCHS)
    drawn = sum(13 + (e % 3 == 0) for e in range(exact))
    want = drawn + round((epochs - exact) * drawn / exact)
    assert lengths.total == want and lengths.total == want
    assert sorted(length.calls) == sorted(set(range(exact)) - {epochs - 1})  # each epoch asked once, if at all
    if epochs <= EXACT_EPOCHS:
        assert lengths.total == sum(lengths)  # exact: the sum of every epoch's length
    with pytest.raises(IndexError):
        lengths[epochs]


def _recipe_total(data_dir: Path, epochs: int) -> int:
    """The schedule's length for FAST with `epochs`, counted beside the loop (its own sampler over the rows)."""
    recipe = tiny(f"train.epochs={epochs}")
    splits = make_splits(read_manifest(data_dir), recipe.data, recipe.seed)
    sampler = PairBatchSampler(splits.train["pid"].tolist(), 8, 1, 0, recipe.seed)
    return EpochLengths(lambda e: len(sampler.global_batches(e)), epochs).total


@pytest.fixture()
def draws(monkeypatch) -> list[int]:
    """The epochs whose batches the pair sampler draws (each draw is a pass over the training rows)."""
    seen: list[int] = []
    draw = PairBatchSampler._draw

    def counted(self, epoch):
        seen.append(epoch)
        return draw(self, epoch)

    monkeypatch.setattr(PairBatchSampler, "_draw", counted)
    return seen


@pytest.mark.parametrize("command", ["train", "train --dry-run --data"])
@pytest.mark.parametrize("epochs", ["--epochs", "--set train.epochs="])
def test_max_steps_and_dry_runs_end_quickly_whatever_the_epochs(data_dir, tmp_path, draws, command, epochs):
    huge = 10 ** 9
    steps = _recipe_total(data_dir, huge)
    assert 12 * huge <= steps <= 14 * huge  # this data gives about 13 batches of 8 pairs per epoch
    draws.clear()
    how = ["--epochs", str(huge)] if epochs == "--epochs" else ["--set", f"train.epochs={huge}"]
    out = tmp_path / "run"
    args = (["train", TINY, "--data", data_dir, "--out", out, "--max-steps", "2"] if command == "train" else
            ["train", TINY, "--dry-run", "--data", data_dir, "--steps", "1"])
    start = time.monotonic()
    res = CliRunner().invoke(main, [str(a) for a in [*args, *how, "--set", "data.workers=0",
                                                     "--set", "train.pairs_per_batch=8"]])
    assert res.exit_code == 0, res.output
    assert time.monotonic() - start < 60  # it used to run without end
    assert len(set(draws)) <= EXACT_EPOCHS + 1  # bounded by the schedule's exact epochs, not train.epochs
    if command == "train":
        assert [(r["step"], r["epoch"]) for r in history(out)] == [(2, 1)]
        assert torch.load(out / "last.pt", weights_only=True)["schedule"]["total_steps"] == steps
        assert f"{steps} steps" in res.stderr
    else:
        assert f"{steps} steps" in res.output


def test_the_dry_run_counts_the_steps_the_loop_schedules(data_dir):
    for epochs in (2, EXACT_EPOCHS + 5):
        recipe = tiny(f"train.epochs={epochs}")
        loop = training._Trainer(recipe, data_dir, data_dir / "unused", torch.device("cpu"), DistInfo())
        assert dry_run(recipe, device="cpu", steps=1, data_dir=data_dir).total_steps == \
            loop.steps_per_epoch.total == loop.schedule.total_steps


def test_a_batch_no_epoch_can_fill_is_still_refused_in_one_line(data_dir, tmp_path):
    code, stderr = invoke(["train", TINY, "--data", data_dir, "--out", tmp_path / "run", "--max-steps", "2",
                           "--epochs", str(10 ** 9), "--set", "train.pairs_per_batch=64", "--set", "data.workers=0"])
    assert code == 2
    assert "train.pairs_per_batch': the global batch needs 64 distinct identities" in one_error_line(stderr)


# ---------------------------------------------------------------- class 8: no validation twice, no line twice


@pytest.mark.parametrize("first, then, rows", [
    (3, 3, [3]),  # stopped mid-epoch, resumed to the same step: nothing to do
    (13, 13, [13]),  # stopped at an epoch's end
    (16, 16, [13, 16]),  # the campaign's "39, 60, 60"
    (3, 5, [3, 5]),  # resumed further: a new row, none twice
    (16, None, [13, 16, 26]),  # resumed to the end
])
def test_resuming_a_run_max_steps_stopped_validates_nothing_twice(data_dir, tmp_path, first, then, rows):
    out = tmp_path / "run"
    training.train(tiny(), data_dir, out, max_steps=first, progress=False)
    before = (out / "metrics.json").read_text(), sorted((out / "tb").iterdir())
    result = training.train(tiny(), data_dir, out, resume=True, max_steps=then, progress=False)
    assert [r["step"] for r in history(out)] == rows
    assert [r["step"] for r in torch.load(out / "last.pt", weights_only=True)["history"]] == rows
    assert [s for s, _ in curves(out)["val/mAP"]] == rows
    assert result["last"]["step"] == rows[-1]
    if then == first:  # a no-op: no file rewritten, no empty event file
        assert ((out / "metrics.json").read_text(), sorted((out / "tb").iterdir())) == before


LOGS_TWICE = textwrap.dedent("""
    import logging, sys
    import torch
    torch.set_num_threads(1)
    from submit.cli import main
    if sys.argv[1] == "warned":
        logging.warning("a library warns on the root logger")  # as open_clip does: basicConfig adds a handler
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("before", ["warned", "quiet"])
def test_every_log_line_is_printed_once(data_dir, tmp_path, before):
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-c", LOGS_TWICE, before, "train", str(TINY), "--data", str(data_dir),
                          "--out", str(out), "--max-steps", "2", "--set", "data.workers=0"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    ours = [line for line in lines if line.startswith(("training tiny-test on", "epoch 1 (stopped mid-epoch)"))]
    assert len(ours) == 2, run.stderr
    assert not any("submit.training" in line for line in lines), run.stderr  # not again through the root handler


def test_the_cli_leaves_the_callers_logging_as_it_was(data_dir, tmp_path, caplog):
    logger = logging.getLogger("submit")
    state = (logger.level, logger.propagate, list(logger.handlers))
    res = CliRunner().invoke(main, ["train", str(TINY), "--data", str(data_dir), "--out", str(tmp_path / "run"),
                                    "--max-steps", "1", "--set", "data.workers=0"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("epoch 1 (stopped mid-epoch)") == 1
    assert (logger.level, logger.propagate, list(logger.handlers)) == state
    with caplog.at_level("INFO", logger="submit.training"):  # a library caller still sees the lines
        training.train(tiny("train.epochs=1"), data_dir, tmp_path / "lib", max_steps=1, progress=False)
    assert any("stopped mid-epoch" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- report: the manifest first, the file bounded


def _no_open(monkeypatch) -> None:
    def no_read(*args, **kwargs):
        raise AssertionError(f"opened {args[0]}")

    monkeypatch.setattr(ranking_file, "open", no_read, raising=False)


@pytest.mark.parametrize("split", ["auto", "test", "challenge"])
def test_report_refuses_a_ranking_file_larger_than_the_data_allows_before_reading_it(
        data_dir, tmp_path, monkeypatch, split):
    df = read_manifest(data_dir)
    limit = ranking_file.manifest_size_limit(df, None if split == "auto" else split)  # auto: the largest split's
    assert limit is not None and (split == "auto" or f"the {split} split" in limit.basis)
    big = tmp_path / "big.csv"
    with open(big, "wb") as fh:
        fh.truncate(limit.max_bytes + 1)
    _no_open(monkeypatch)
    out = tmp_path / "report"
    code, stderr = invoke(["report", big, "--data", data_dir, "--out", out, "--split", split])
    assert code == 2 and not out.exists()
    assert one_error_line(stderr) == (
        f"error: {big}: {limit.max_bytes + 1} bytes, more than a ranking file for {limit.basis} can be (at most "
        f"{limit.max_bytes} bytes); expected the ranking file of this data (wrong --data?)")


def test_report_on_data_without_the_split_is_refused_before_reading(data_dir, tmp_path, monkeypatch):
    data = tmp_path / "no-challenge"
    data.mkdir()
    df = read_manifest(data_dir)
    write_manifest(df[df["split"] != "challenge"], data)
    ranking = tmp_path / "r.csv"
    ranking.write_text("0,1\n1,0.5\n")
    _no_open(monkeypatch)
    code, stderr = invoke(["report", ranking, "--data", data, "--out", tmp_path / "report", "--split", "challenge"])
    assert code == 2
    assert one_error_line(stderr) == (f"error: {ranking}: the manifest in {data} has no challenge query and "
                                      "gallery images to compare with")


# ---------------------------------------------------------------- the synthetic zip's scratch folder


class Tokens:
    """Stands in for `secrets.token_hex` in `atomic`: the given tokens in turn, then the last one forever."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)

    def __call__(self, nbytes: int | None = None) -> str:
        return self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]


@pytest.mark.parametrize("planted", ["symlink to a folder", "dangling symlink", "folder"])
def test_a_link_planted_at_the_synthetic_zips_scratch_name_is_never_followed(tmp_path, monkeypatch, planted):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("the user's")
    target = tmp_path / "players.zip"
    monkeypatch.setattr(atomic.secrets, "token_hex", Tokens("deadbeef", "0badf00d", "feedface"))
    trap = atomic.temp_for(target)
    monkeypatch.setattr(atomic.secrets, "token_hex", Tokens("deadbeef", "0badf00d", "feedface"))
    if planted == "folder":
        trap.mkdir()
        (trap / "theirs.txt").write_text("not ours")
    else:
        trap.symlink_to(victim if planted == "symlink to a folder" else tmp_path / "not-yet-there")
    assert make_dataset(target, players=6, seqs=1, frames=2, seed=0, as_zip=True) == target
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "not-yet-there").exists()
    if planted == "folder":
        assert sorted(p.name for p in trap.iterdir()) == ["theirs.txt"]
    else:
        assert trap.is_symlink()
    with zipfile.ZipFile(target) as zf:
        assert "numbers.csv" in zf.namelist() and any(n.startswith("data_reid/") for n in zf.namelist())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([victim.name, target.name, trap.name])


def test_the_synthetic_zip_on_a_folder_it_cannot_write_is_one_line(tmp_path, monkeypatch):
    def refused(path, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(atomic.os, "mkdir", refused)
    with pytest.raises(SubmitError, match=rf"^{tmp_path / 'players.zip'}: cannot write \(Permission denied\)$"):
        make_dataset(tmp_path / "players.zip", players=6, seqs=1, frames=2, seed=0, as_zip=True)

